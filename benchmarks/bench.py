"""Benchmark every MIM method's train step and the data pipelines; writes Markdown + JSON and prints the Markdown.

Per method: train-step throughput (forward + backward + AdamW step), peak memory, FLOPs per image (FlopCounterMode over
one forward + backward), achieved FLOP/s, and the ratio to a dense matmul measured in the same run ("MFU vs matmul").
Data: decode + augment throughput of the ImageFolder and WebDataset train loaders with the first method's transform.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import lightning
import timm
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import lightning_mim.methods as methods_module
from lightning_mim.backbone import BackboneConfig
from lightning_mim.data import MIMDataModule
from lightning_mim.data.shards import write_shards
from lightning_mim.methods import MIMMethod

CPU_TARGET_RATIO = 0.5
DATA_SOURCES = ("imagefolder", "webdataset")


def available_methods() -> dict[str, type[MIMMethod]]:
    """Concrete MIMMethod subclasses exported by `lightning_mim.methods`, keyed by lower-case name."""
    found: dict[str, type[MIMMethod]] = {}
    for name in methods_module.__all__:
        obj = getattr(methods_module, name)
        if isinstance(obj, type) and issubclass(obj, MIMMethod) and obj is not MIMMethod \
                and not getattr(obj, "__abstractmethods__", None):
            found[name.lower()] = obj
    return found


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _attention_flops(query_shape: torch.Size, key_shape: torch.Size, value_shape: torch.Size) -> int:
    """Q K^T and P V of one attention call, 2 FLOPs per multiply-add (torch's formula for the GPU kernels)."""
    *batch_heads, queries, head_dim = query_shape
    keys, value_dim = key_shape[-2], value_shape[-1]
    groups = math.prod(batch_heads)
    return 2 * groups * queries * keys * (head_dim + value_dim)


def _cpu_sdpa_flops(query_shape: torch.Size, key_shape: torch.Size, value_shape: torch.Size, *args: Any,
                    **kwargs: Any) -> int:
    return _attention_flops(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(grad_out_shape: torch.Size, query_shape: torch.Size, key_shape: torch.Size,
                             value_shape: torch.Size, *args: Any, **kwargs: Any) -> int:
    return 2 * _attention_flops(query_shape, key_shape, value_shape)


# FlopCounterMode knows the CUDA attention kernels but not the CPU one that F.scaled_dot_product_attention uses.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


def count_flops(fn: Callable[[], Any]) -> int:
    """Total FLOPs torch's FlopCounterMode records while running `fn` (matmul-type ops and attention: 2 per
    multiply-add), the CPU attention kernel included."""
    counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
    with counter:
        fn()
    return int(counter.get_total_flops())


def matmul_flops_per_s(rows: int, width: int, dtype: torch.dtype, device: torch.device, reps: int = 5) -> float:
    """Rate of (rows x width) @ (width x 4 width), the ViT MLP's first matmul, in FLOP/s."""
    a = torch.randn(rows, width, device=device, dtype=dtype)
    b = torch.randn(width, 4 * width, device=device, dtype=dtype)
    torch.matmul(a, b)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        torch.matmul(a, b)
    synchronize(device)
    elapsed = time.perf_counter() - start
    return 2.0 * rows * width * 4 * width * reps / elapsed


def peak_memory(device: torch.device) -> tuple[float, str]:
    """Peak memory in MiB and what it measures."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"


def bench_method(name: str, cls: type[MIMMethod], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    method = cls(backbone=dict(size=args.size, img_size=args.img_size, patch_size=args.patch_size,
                               grad_checkpointing=args.grad_checkpointing)).to(device).train()
    optimizer = torch.optim.AdamW(method.parameter_groups(), lr=1e-4, fused=device.type == "cuda",
                                  foreach=None if device.type == "cuda" else True)
    images = torch.randn(args.batch, method.in_chans, args.img_size, args.img_size, device=device)
    views = method.validation_views(images)
    autocast_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    compute = torch.compile(method.compute_losses) if args.compile else method.compute_losses

    def step(losses_fn: Callable[[Any], dict[str, torch.Tensor]]) -> None:
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=args.precision == "bf16"):
            total = method.weighted_total(losses_fn(views))
        total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def forward_backward() -> None:
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=args.precision == "bf16"):
            total = method.weighted_total(method.compute_losses(views))
        total.backward()
        method.zero_grad(set_to_none=True)

    flops_per_image = count_flops(forward_backward) / args.batch
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    step(compute)
    synchronize(device)
    first_step_s = time.perf_counter() - start
    for _ in range(max(0, args.warmup - 1)):
        step(compute)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step(compute)
    synchronize(device)
    elapsed = time.perf_counter() - start
    memory_mib, memory_kind = peak_memory(device)
    images_per_s = args.batch * args.steps / elapsed
    result = {
        "method": name,
        "params_m": sum(p.numel() for p in method.parameters() if p.requires_grad) / 1e6,
        "step_ms": 1000 * elapsed / args.steps,
        "img_per_s": images_per_s,
        "gflops_per_img": flops_per_image / 1e9,
        "achieved_tflops": flops_per_image * images_per_s / 1e12,
        "peak_mem_mib": memory_mib,
        "peak_mem_kind": memory_kind,
        "first_step_s": first_step_s,
    }
    if args.compile:
        result["compile_s"] = first_step_s
    del method, optimizer, images, views
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def make_image_folder(root: Path, count: int, seed: int = 0) -> None:
    """`count` random JPEGs of 256-500 px in root/train/<2 classes>/, plus one image per class in root/val/."""
    rng = random.Random(seed)
    classes = ("class_a", "class_b")
    for split, n in (("train", count), ("val", len(classes))):
        for index in range(n):
            folder = root / split / classes[index % len(classes)]
            folder.mkdir(parents=True, exist_ok=True)
            width, height = rng.randint(256, 500), rng.randint(256, 500)
            pixels = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8,
                                   generator=torch.Generator().manual_seed(seed + index)).numpy()
            Image.fromarray(pixels).save(folder / f"{index:06d}.jpg", quality=90)


def bench_data(source: str, root: Path, shard_pattern: str, args: argparse.Namespace,
               transform: Callable, image_size: int, in_chans: int) -> dict[str, Any]:
    """Decode + augment throughput of the MIMDataModule train loader for one source (one pass, first batch timed)."""
    batch = min(args.batch, args.data_images)
    common = dict(batch_size=batch, num_workers=args.workers, pin_memory=False, persistent_workers=False,
                  knn_bank_size=None)
    if source == "imagefolder":
        datamodule = MIMDataModule(source="imagefolder", data_dir=str(root), **common)
    else:
        datamodule = MIMDataModule(source="webdataset", train_shards=shard_pattern, train_samples=args.data_images,
                                   shuffle_buffer=min(1000, args.data_images), **common)
    datamodule.bind(image_size, in_chans, transform)
    datamodule.setup("fit")
    start = time.perf_counter()
    seen = 0
    for views, _ in datamodule.train_dataloader():
        seen += (views[0] if isinstance(views, (tuple, list)) else views).shape[0]
    elapsed = time.perf_counter() - start
    images_per_s = seen / elapsed
    return {"source": source, "images": seen, "seconds": elapsed, "img_per_s": images_per_s,
            "img_per_s_per_worker": images_per_s / max(1, args.workers)}


def run_data(args: argparse.Namespace, method_cls: type[MIMMethod], sources: list[str]) -> list[dict[str, Any]]:
    method = method_cls(backbone=dict(size=args.size, img_size=args.img_size, patch_size=args.patch_size))
    probe = MIMDataModule(source="imagefolder")
    transform = method.train_transform(probe.mean_for(method.in_chans), probe.std_for(method.in_chans))
    tmp = Path(tempfile.mkdtemp(prefix="mim_bench_"))
    try:
        make_image_folder(tmp / "images", args.data_images)
        written = write_shards(str(tmp / "images" / "train"), str(tmp / "shards" / "train-%06d.tar"),
                               max_count=max(1, args.data_images // 4))
        return [bench_data(source, tmp / "images", str(written["pattern"]), args, transform, method.image_size,
                           method.in_chans) for source in sources]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def to_markdown(report: dict[str, Any]) -> str:
    header, settings = report["header"], report["header"]["settings"]
    lines = [
        f"# lightning_mim benchmark: ViT-{settings['size']}/{settings['patch_size']} at {settings['img_size']} px",
        "",
        f"- device: {header['device']} ({header['device_type']}), torch threads {header['torch_threads']}, "
        f"loadavg {', '.join(f'{x:.2f}' for x in header['loadavg'])}",
        f"- torch {header['torch']}, timm {header['timm']}, lightning {header['lightning']}, "
        f"python {header['python']}",
        "- settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()),
        f"- dense matmul reference ({header['matmul_shape']}, {header['matmul_dtype']}): "
        f"{header['matmul_tflops']:.3f} TFLOP/s",
        "",
    ]
    memory_kind = report["methods"][0]["peak_mem_kind"] if report["methods"] else "peak memory"
    columns = ["method", "params (M)", "step (ms)", "img/s", "GFLOPs/img (fwd+bwd)", "achieved TFLOP/s",
               "MFU vs matmul", f"{memory_kind} (MiB)"]
    if settings["compile"]:
        columns.append("compile (s)")
    if header["device_type"] == "cpu":
        columns.append(f"target >= {CPU_TARGET_RATIO:.0%} of matmul")
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in report["methods"]:
        cells = [row["method"], f"{row['params_m']:.1f}", f"{row['step_ms']:.1f}", f"{row['img_per_s']:.2f}",
                 f"{row['gflops_per_img']:.2f}", f"{row['achieved_tflops']:.4f}", f"{row['mfu_vs_matmul']:.1%}",
                 f"{row['peak_mem_mib']:.0f}"]
        if settings["compile"]:
            cells.append(f"{row['compile_s']:.1f}")
        if header["device_type"] == "cpu":
            cells.append("met" if row["target_met"] else "not met")
        lines.append("| " + " | ".join(cells) + " |")
    if report["data"]:
        lines += ["", f"Data pipeline (decode + {report['data_transform_of']} train transform, "
                      f"{settings['workers']} worker(s), {settings['data_images']} JPEGs 256-500 px):", "",
                  "| source | images | seconds | img/s | img/s per worker |", "|---|---|---|---|---|"]
        for row in report["data"]:
            lines.append(f"| {row['source']} | {row['images']} | {row['seconds']:.2f} | {row['img_per_s']:.1f} | "
                         f"{row['img_per_s_per_worker']:.1f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--methods", default="all", help="comma-separated method names, or 'all'")
    parser.add_argument("--size", default="small")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--precision", choices=("32", "bf16"), default="32")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--data", default="imagefolder,webdataset", help="comma-separated sources, or 'none'")
    parser.add_argument("--data-images", type=int, default=256)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", default=None, help="output folder for bench.md and bench.json")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be at least 1 (the first warm-up step is timed as compile/first step)")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    known = available_methods()
    names = list(known) if args.methods == "all" else [n.strip().lower() for n in args.methods.split(",") if n]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {sorted(known)} or 'all'")
    sources = [] if args.data == "none" else [s.strip() for s in args.data.split(",") if s.strip()]
    if any(s not in DATA_SOURCES for s in sources):
        raise SystemExit(f"--data takes a subset of {DATA_SOURCES} or 'none', got {args.data!r}")

    rows = [bench_method(name, known[name], args, device) for name in names]
    width = BackboneConfig(size=args.size, img_size=args.img_size, patch_size=args.patch_size).width
    tokens = (args.img_size // args.patch_size) ** 2 + 1
    matmul_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    matmul_rate = matmul_flops_per_s(args.batch * tokens, width, matmul_dtype, device)
    for row in rows:
        row["mfu_vs_matmul"] = row["achieved_tflops"] * 1e12 / matmul_rate
        row["target_met"] = row["mfu_vs_matmul"] >= CPU_TARGET_RATIO if device.type == "cpu" else None
    data_rows = run_data(args, known[names[0]], sources) if sources else []
    report = {
        "header": {
            "device": device_name(device), "device_type": device.type, "torch": torch.__version__,
            "timm": timm.__version__, "lightning": lightning.__version__, "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "loadavg": list(os.getloadavg()),
            "matmul_shape": f"({args.batch * tokens} x {width}) @ ({width} x {4 * width})",
            "matmul_dtype": str(matmul_dtype).replace("torch.", ""), "matmul_tflops": matmul_rate / 1e12,
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "settings": vars(args),
        },
        "methods": rows,
        "data_transform_of": names[0],
        "data": data_rows,
    }
    markdown = to_markdown(report)
    print(markdown)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.md").write_text(markdown)
        (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
