"""Benchmark every MIM method's train step and the data pipelines; writes Markdown + JSON and prints the Markdown.

Per method: train-step throughput (forward + backward + AdamW step), peak memory, FLOPs per image (FlopCounterMode over
one forward + backward), achieved FLOP/s, and its ratio to a dense matmul of the model's width measured in the same
run next to the method ("MFU vs matmul"). Per method and data source: decode + augment throughput of the
MIMDataModule train loader (ImageFolder, WebDataset) with that method's train transform. Per worker count: the
throughput of writing the generated images as WebDataset shards (`make-shards`). See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import inspect
import io
import itertools
import json
import math
import os
import platform
import re
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import lightning
import numpy as np
import timm
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from torchvision.transforms.v2.functional import pil_to_tensor

import lightning_mim.methods as methods_module
from lightning_mim.backbone import BackboneConfig, MIMViT
from lightning_mim.data import MIMDataModule, write_shards
from lightning_mim.data.jpeg_crop import RegionResizedCrop, read_jpeg, turbojpeg
from lightning_mim.data.sources import decode_to_tensor, seeded_generators
from lightning_mim.methods import BeyondMasking, MIMMethod
from lightning_mim.methods.beyond_masking import OBJECTIVES
from lightning_mim.targets.kmeans import random_pixel_codebook

CPU_TARGET_RATIO = 0.5
FLOP_COUNT_BATCH = 2  # >= 2: BatchNorm in train mode (LUT heads) needs two samples
DATA_SOURCES = ("imagefolder", "webdataset")
# OpenMP settings that change CPU results: with the default spin-waiting, a 2-core machine shared with other jobs
# runs small ops many times slower (README, "CPU"); recorded in the header.
OPENMP_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def available_methods() -> dict[str, type[MIMMethod]]:
    """Concrete MIMMethod subclasses exported by `lightning_mim.methods.__all__`, keyed by lower-case name."""
    found: dict[str, type[MIMMethod]] = {}
    for name in methods_module.__all__:
        obj = getattr(methods_module, name)
        if isinstance(obj, type) and issubclass(obj, MIMMethod) and not getattr(obj, "__abstractmethods__", None):
            found[name.lower()] = obj
    return found


def bench_methods() -> dict[str, tuple[type[MIMMethod], dict[str, Any]]]:
    """Every row of the benchmark: (class, constructor arguments) of each concrete method with its defaults, and of
    Beyond Masking once per other objective (`beyondmasking:<objective>`, each its own pre-training; de-colourisation
    with its 1-channel encoder)."""
    rows: dict[str, tuple[type[MIMMethod], dict[str, Any]]] = {name: (cls, {})
                                                               for name, cls in available_methods().items()}
    default = inspect.signature(BeyondMasking).parameters["objective"].default
    for objective in OBJECTIVES:
        if objective != default:
            grey = {"backbone": {"in_chans": 1}} if objective == "decolorize" else {}
            rows[f"beyondmasking:{objective}"] = (BeyondMasking, {"objective": objective, **grey})
    return rows


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


# ------------------------------------------------------------------------------------------------------------ FLOPs
def _attention_flops(query_shape: torch.Size, key_shape: torch.Size, value_shape: torch.Size) -> int:
    """Q K^T and P V of one attention call at 2 FLOPs per multiply-add (torch's formula for the CUDA kernels)."""
    *batch_heads, queries, head_dim = query_shape
    keys, value_dim = key_shape[-2], value_shape[-1]
    return 2 * math.prod(batch_heads) * queries * keys * (head_dim + value_dim)


def _cpu_sdpa_flops(query_shape: torch.Size, key_shape: torch.Size, value_shape: torch.Size, *args: Any,
                    **kwargs: Any) -> int:
    return _attention_flops(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(grad_out_shape: torch.Size, query_shape: torch.Size, key_shape: torch.Size,
                             value_shape: torch.Size, *args: Any, **kwargs: Any) -> int:
    # dV, dP, dQ, dK: four products of the forward's two sizes; the recomputed Q K^T is not counted, as in torch
    return 2 * _attention_flops(query_shape, key_shape, value_shape)


# FlopCounterMode knows the CUDA attention kernels but not the CPU one that F.scaled_dot_product_attention uses.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs that torch's FlopCounterMode records while running `fn`: matmul, conv and attention ops at 2 per
    multiply-add (elementwise ops, norms and softmax are not counted), the CPU attention kernel included."""
    counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
    with counter:
        fn()
    return int(counter.get_total_flops())


def matmul_flops_per_s(rows: int, width: int, dtype: torch.dtype, device: torch.device,
                       min_seconds: float) -> float:
    """Rate of (rows x width) @ (width x 4 width), the ViT MLP's first matmul, in FLOP/s, over a block of repeats
    that lasts at least `min_seconds` (synchronised only at the block's edges)."""
    a = torch.randn(rows, width, device=device, dtype=dtype)
    b = torch.randn(width, 4 * width, device=device, dtype=dtype)
    out = torch.matmul(a, b)
    reps = 1
    while True:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b, out=out)
        synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return 2.0 * rows * width * 4 * width * reps / elapsed
        reps = max(2 * reps, math.ceil(1.2 * reps * min_seconds / max(elapsed, 1e-9)))


# -------------------------------------------------------------------------------------------------------- attention
_SDPA_KERNEL = re.compile(r"aten::_(scaled_dot_product_\w+|efficient_attention_forward|flash_attention_forward)$")


def attention_profile(step: Callable[[], None], device: torch.device) -> tuple[float, str]:
    """Share of one step's wall time spent in `scaled_dot_product_attention` (forward and backward, inclusive of the
    kernels it calls) and the SDPA kernels that ran, from torch.profiler. A math fallback (an attention mask the
    fused kernels refuse) shows as `scaled_dot_product_attention_math`; its backward runs as plain matmuls and
    softmax, which this share leaves out."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    synchronize(device)
    with torch.profiler.profile(activities=activities) as profile:
        start = time.perf_counter()
        step()
        synchronize(device)
        wall_us = 1e6 * (time.perf_counter() - start)
    events = profile.key_averages()
    inclusive = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    attention_us = sum(getattr(event, inclusive) for event in events
                       if event.key == "aten::scaled_dot_product_attention"
                       or ("ScaledDotProduct" in event.key and "Backward" in event.key
                           and not event.key.startswith("autograd::engine")))
    kernels = sorted({event.key.removeprefix("aten::_") for event in events
                      if _SDPA_KERNEL.match(event.key) and "backward" not in event.key})
    return attention_us / wall_us, ", ".join(kernels) or "none"


# ----------------------------------------------------------------------------------------------------------- memory
def _vm_hwm_mib() -> float | None:
    """Linux peak resident set size of this process (VmHWM), MiB."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_memory(device: torch.device) -> bool:
    """Reset the peak-memory counter; False on CPU when the OS does not allow resetting the peak RSS."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        _CLEAR_REFS.write_text("5")  # Linux: "5" resets the peak RSS (VmHWM) to the current RSS
    except OSError:
        return False
    return _vm_hwm_mib() is not None


def peak_memory(device: torch.device, was_reset: bool) -> tuple[float, str]:
    """Peak memory in MiB since the last reset, and what it measures."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "CUDA max allocated"
    if was_reset:
        return float(_vm_hwm_mib()), "peak RSS per method"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS (whole run)"


# ------------------------------------------------------------------------------------------------------- train step
def method_kwargs(cls: type[MIMMethod], method_args: dict[str, Any]) -> dict[str, Any]:
    """The `--method-args` entries that `cls`'s constructor takes (one JSON object serves every method)."""
    parameters = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return dict(method_args)
    return {key: value for key, value in method_args.items() if key in parameters}


def build_method(cls: type[MIMMethod], args: argparse.Namespace, row_args: dict[str, Any] | None = None
                 ) -> MIMMethod:
    """The method at the benchmark's size, resolution and patch size; other arguments default, from --method-args
    (a "backbone" entry adds backbone options) or from the row's own (`bench_methods`), which take precedence.
    A token-predicting method without a `tokenizer` there tokenises in the step with a pixel k-means codebook of
    8192 random centroids (`bench_codebook`): the nearest-code search of a real k-means tokenizer's last stage."""
    kwargs = method_kwargs(cls, args.method_args)
    row_args = dict(row_args or {})
    backbone = {**kwargs.pop("backbone", {}), **row_args.pop("backbone", {})}
    kwargs.update(row_args)
    if "tokenizer" in inspect.signature(cls).parameters and "tokenizer" not in kwargs:
        kwargs["tokenizer"] = {"kind": "kmeans", "path": str(bench_codebook(args.img_size, args.patch_size))}
    return cls(backbone=dict(size=args.size, img_size=args.img_size, patch_size=args.patch_size,
                             grad_checkpointing=args.grad_checkpointing, **backbone), **kwargs)


def bench_codebook(img_size: int, patch_size: int, vocab_size: int = 8192, in_chans: int = 3) -> Path:
    """A pixel codebook of random centroids for the benchmark's size, written once per setting."""
    return random_pixel_codebook(Path(tempfile.gettempdir()) / "lightning_mim_bench" /
                                 f"pixels_p{patch_size}_{img_size}px_v{vocab_size}.st",
                                 patch_size, img_size, in_chans, vocab_size)


def example_views(method: MIMMethod, batch: int, device: torch.device) -> Any:
    """What `method.compute_losses` takes, built from one batch of random normalised images."""
    images = torch.randn(batch, method.in_chans, method.image_size, method.image_size, device=device)
    return method.validation_views(images)


def set_grad_checkpointing(method: MIMMethod, enabled: bool) -> None:
    for module in method.modules():
        if isinstance(module, MIMViT):
            module.set_grad_checkpointing(enabled)


def make_optimizer(method: MIMMethod, device: torch.device) -> torch.optim.AdamW:
    """AdamW on the method's parameter groups, fused as its `configure_optimizers` decides, else foreach."""
    config = method.optim_config
    fused = config.fused_on(device)
    return torch.optim.AdamW(method.parameter_groups(), lr=1e-4, betas=config.betas, eps=config.eps, fused=fused,
                             foreach=None if fused else True)


def bench_train_step(name: str, method: MIMMethod, args: argparse.Namespace, device: torch.device
                     ) -> dict[str, Any]:
    """Time `--steps` train steps after `--warmup` (the first warm-up step, which compiles, is timed on its own)."""
    torch.manual_seed(0)
    method.to(device).train()
    optimizer = make_optimizer(method, device)
    bf16 = args.precision == "bf16"
    compute = torch.compile(method.compute_losses) if args.compile else method.compute_losses

    def forward_backward(losses_fn: Callable[[Any], dict[str, torch.Tensor]], views: Any) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            total = method.weighted_total(losses_fn(views))
        total.backward()

    # Model FLOPs, per image: eager, without the recomputation that gradient checkpointing adds, on a small batch
    # (every counted op scales linearly with the batch) so that it neither costs a full step nor sets the peak memory.
    set_grad_checkpointing(method, False)
    flop_views = example_views(method, FLOP_COUNT_BATCH, device)
    flops_per_image = count_flops(lambda: forward_backward(method.compute_losses, flop_views)) / FLOP_COUNT_BATCH
    method.zero_grad(set_to_none=True)
    del flop_views
    set_grad_checkpointing(method, args.grad_checkpointing)

    rows = args.batch * ((args.img_size // args.patch_size) ** 2 + 1)
    width = method.backbone.embed_dim
    matmul_dtype = torch.bfloat16 if bf16 else torch.float32
    matmul_before = matmul_flops_per_s(rows, width, matmul_dtype, device, args.matmul_seconds)

    memory_reset = reset_peak_memory(device)
    views = example_views(method, args.batch, device)

    def step() -> None:
        forward_backward(compute, views)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    first_step_s = time.perf_counter() - start
    for _ in range(args.warmup - 1):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    elapsed = time.perf_counter() - start
    memory_mib, memory_kind = peak_memory(device, memory_reset)
    attention_share, sdpa_kernels = attention_profile(step, device)
    # allocated plus the caching allocator's reserve: what has to fit on the card
    reserved_mib = torch.cuda.max_memory_reserved(device) / 2**20 if device.type == "cuda" else None
    del views

    matmul_after = matmul_flops_per_s(rows, width, matmul_dtype, device, args.matmul_seconds)
    matmul_rate = (matmul_before + matmul_after) / 2
    images_per_s = args.batch * args.steps / elapsed
    achieved = flops_per_image * images_per_s
    row = {
        "method": name,
        "params_m": sum(p.numel() for p in method.parameters() if p.requires_grad) / 1e6,
        "step_ms": 1000 * elapsed / args.steps,
        "img_per_s": images_per_s,
        "gflops_per_img": flops_per_image / 1e9,
        "achieved_tflops": achieved / 1e12,
        "matmul_tflops": matmul_rate / 1e12,
        "matmul_tflops_before": matmul_before / 1e12,
        "matmul_tflops_after": matmul_after / 1e12,
        "mfu_vs_matmul": achieved / matmul_rate,
        "peak_mem_mib": memory_mib,
        "peak_mem_kind": memory_kind,
        "first_step_s": first_step_s,
        "attention_share": attention_share,
        "sdpa_kernels": sdpa_kernels,
        "cpu_target_met": achieved / matmul_rate >= CPU_TARGET_RATIO,
    }
    if args.compile:
        row["compile_s"] = first_step_s
    if device.type == "cuda":
        row["cuda_max_reserved_mib"] = reserved_mib
    return row


# ------------------------------------------------------------------------------------------------------------- data
def make_image_folder(root: Path, count: int, seed: int = 0) -> float:
    """`count` JPEGs (quality 90, 256-500 px a side) in root/train/<2 classes>/ and one per class in root/val/.

    The content is a bicubically upsampled 12 x 12 random image plus Gaussian noise (sigma 20): smooth regions and
    texture, so file sizes and decode cost are closer to photographs than pure noise. Returns the mean file size in KB.
    """
    rng = np.random.default_rng(seed)
    classes = ("class_a", "class_b")
    sizes = []
    for split, n in (("train", count), ("val", len(classes))):
        for index in range(n):
            folder = root / split / classes[index % len(classes)]
            folder.mkdir(parents=True, exist_ok=True)
            width, height = (int(x) for x in rng.integers(256, 501, size=2))
            coarse = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
            smooth = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.float32)
            pixels = np.clip(smooth + rng.normal(0.0, 20.0, smooth.shape), 0, 255).astype(np.uint8)
            path = folder / f"{index:06d}.jpg"
            Image.fromarray(pixels).save(path, quality=90)
            sizes.append(path.stat().st_size)
    return float(np.mean(sizes)) / 1e3


def bench_shard_writing(image_folder: Path, out_dir: Path, workers: int, max_count: int
                        ) -> tuple[dict[str, Any], str]:
    """One `write_shards` run (read, decode check, tar writing; process pool start-up included) with `workers`
    processes: its row and the brace pattern of the shards it wrote."""
    start = time.perf_counter()
    result = write_shards(str(image_folder), str(out_dir / "train-%06d.tar"), max_count=max_count, workers=workers)
    elapsed = time.perf_counter() - start
    images_per_s = result["written"] / elapsed
    row = {"workers": workers, "images": result["written"], "shards": result["shards"], "max_count": max_count,
           "seconds": elapsed, "img_per_s": images_per_s, "img_per_s_per_worker": images_per_s / workers}
    return row, str(result["pattern"])


def prepare_data(args: argparse.Namespace, sources: list[str], tmp: Path
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The ImageFolder root and the shard pattern the data benchmark reads, and the shard-writing rows.

    `--data-dir` / `--shards` when given, else JPEGs generated in `tmp`. Generated JPEGs are written as shards once
    per `--shard-workers` count (timed; the last run's shards are read), a real folder once, untimed.
    """
    generate = not args.data_dir and ("imagefolder" in sources or args.shards is None)
    root = tmp / "images" if generate else Path(args.data_dir) if args.data_dir else None
    mean_kb = make_image_folder(root, args.data_images) if generate else None
    max_count = max(1, args.data_images // 8)
    shard_rows, shards = [], args.shards
    for run_index, workers in enumerate(args.shard_workers if generate else []):
        # a fresh folder for each run: in a used one, write_shards would keep the complete shards
        row, shards = bench_shard_writing(root / "train", tmp / f"shards_{run_index}", workers, max_count)
        shard_rows.append(row)
    if shards is None and "webdataset" in sources:
        shards = str(write_shards(str(root / "train"), str(tmp / "shards" / "train-%06d.tar"),
                                  max_count=max_count)["pattern"])
    data = {"image_folder": None if root is None else str(root), "shards": shards, "generated": generate,
            "mean_file_kb": mean_kb}
    return data, shard_rows


def _cpu_seconds() -> float:
    """User + system CPU time of this process and of its children that have ended (the loader's workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class _TrainingTrainer:
    """What `MIMDataModule.on_before/after_batch_transfer` read of a trainer: a training batch, the device."""

    training = True

    def __init__(self, device: torch.device) -> None:
        self.strategy = argparse.Namespace(root_device=device)


def _loader_pass(datamodule: MIMDataModule) -> tuple[int, float, float, Any]:
    """One pass over the train loader: images, wall seconds, CPU seconds (this process and the workers, which end
    with the pass) and the last batch."""
    seen, batch = 0, None
    cpu_start, start = _cpu_seconds(), time.perf_counter()
    for batch in datamodule.train_dataloader():
        seen += len(batch[1])  # the labels: the views may still be encoded images
    return seen, time.perf_counter() - start, _cpu_seconds() - cpu_start, batch


def _device_side_ms(datamodule: MIMDataModule, batch: Any, device: torch.device, repeats: int = 3) -> float:
    """Median milliseconds of the device-side part of the views for one batch on `device`: with decode_on "device",
    decoding the JPEGs and cropping (`on_before_batch_transfer`); then to [0, 1], the method's `augment_views` and
    the normalisation (`on_after_batch_transfer`). The copy of the loader's batch to the device is not included."""
    datamodule.trainer = _TrainingTrainer(device)
    views, labels = batch
    if datamodule.hparams.decode_on == "loader":
        views = [view.to(device) for view in views] if isinstance(views, (tuple, list)) else views.to(device)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        datamodule.on_after_batch_transfer(datamodule.on_before_batch_transfer((views, labels), 0), 0)
        synchronize(device)
        times.append(time.perf_counter() - start)
    datamodule.trainer = None
    return 1000 * float(np.median(times))


def _decode_pil(data: bytes, reduce: int = 1) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as image:
        if reduce > 1:  # JPEG DCT scaling: decode at 1/reduce of the size (libjpeg picks 1/2, 1/4 or 1/8)
            image.draft("RGB", (image.width // reduce, image.height // reduce))
        return pil_to_tensor(image.convert("RGB"))


_MAE_CROP = RegionResizedCrop(224, scale=(0.2, 1.0))


def _decode_mae_crop(data: bytes) -> torch.Tensor:
    """Only the region of a MAE crop (drawn with a fixed seed per file) through TurboJPEG 3 (crop_decode)."""
    with seeded_generators(len(data)):
        return _MAE_CROP.crop(read_jpeg(data, "bench", "RGB"))


DECODERS: dict[str, Callable[[bytes], torch.Tensor]] = {
    "PIL, full size": _decode_pil,
    "PIL, draft 1/2 (DCT scaling)": lambda data: _decode_pil(data, 2),
    "PIL, draft 1/4 (DCT scaling)": lambda data: _decode_pil(data, 4),
    "torchvision decode_image": lambda data: decode_to_tensor(data, "RGB"),
    **({"TurboJPEG 3, the region of a MAE crop only (crop_decode)": _decode_mae_crop} if turbojpeg() else {}),
}


def bench_decode(image_folder: Path, limit: int) -> list[dict[str, Any]]:
    """Milliseconds per image (median of 3 passes, main process, page-cached files) of each CPU decoder, from the
    file bytes to a uint8 (3, H, W) tensor, on up to `limit` of the folder's training images."""
    # the first files found, without listing the whole tree (a real ImageNet folder has 1.28 M files)
    paths = (path for path in (image_folder / "train").rglob("*") if path.is_file())
    files = [path.read_bytes() for path in itertools.islice(paths, limit)]
    rows = []
    for name, decode in DECODERS.items():
        passes = []
        for _ in range(3):
            start = time.perf_counter()
            for data in files:
                decode(data)
            passes.append(1000 * (time.perf_counter() - start) / len(files))
        rows.append({"decoder": name, "images": len(files), "ms_per_image": float(np.median(passes))})
    return rows


def bench_data(source: str, name: str, method: MIMMethod, data: dict[str, Any], args: argparse.Namespace,
               augment_on: str = "loader", device: torch.device | None = None) -> dict[str, Any]:
    """Throughput of the MIMDataModule train loader with the method's views, worker start-up included: the median
    of `--data-repeats` passes. `augment_on="loader"`: the whole per-image `train_transform` in the workers (the
    reference pipeline); `"device"`: the workers decode to tensors and crop (`loader_views`), and the rest of the
    views (`augment_views`, normalisation) is timed on `device` for one batch (`device_ms_per_batch`);
    `"device_decode"`: the workers read the files only, and decoding and cropping are timed on `device` too;
    `"device_whole"`: as "device" with crop_decode off (the workers decode whole JPEGs before cropping)."""
    batch = min(args.batch, args.data_images)
    common = dict(batch_size=batch, num_workers=args.workers, pin_memory=False, persistent_workers=False,
                  knn_bank_size=None, augment_on="loader" if augment_on == "loader" else "device",
                  decode_on="device" if augment_on == "device_decode" else "loader",
                  crop_decode=augment_on != "device_whole")
    if source == "imagefolder":
        datamodule = MIMDataModule(source="imagefolder", data_dir=data["image_folder"],
                                   train_subset=args.data_images, **common)
    else:
        datamodule = MIMDataModule(source="webdataset", train_shards=data["shards"], train_samples=args.data_images,
                                   shuffle_buffer=min(1000, args.data_images), **common)
    chans = method.in_chans
    if augment_on != "loader":
        datamodule.bind(method.image_size, chans, method.loader_views(), augment_module=method)
    else:
        datamodule.bind(method.image_size, chans, method.train_transform(datamodule.mean_for(chans),
                                                                         datamodule.std_for(chans)))
    datamodule.setup("fit")
    passes = [_loader_pass(datamodule) for _ in range(args.data_repeats)]
    seen, elapsed, cpu_seconds, last_batch = sorted(passes, key=lambda item: item[1])[len(passes) // 2]
    images_per_s = seen / elapsed
    row = {"method": name, "source": source, "augment_on": augment_on, "workers": args.workers, "images": seen,
           "seconds": elapsed, "img_per_s": images_per_s, "img_per_s_per_worker": images_per_s / max(1, args.workers),
           "cpu_seconds": cpu_seconds, "img_per_cpu_s": seen / cpu_seconds,
           "passes_img_per_s": [item[0] / item[1] for item in passes], "device_ms_per_batch": None}
    if augment_on != "loader":
        row["device_ms_per_batch"] = _device_side_ms(datamodule, last_batch, device or torch.device("cpu"))
    return row


# ----------------------------------------------------------------------------------------------------------- report
def to_markdown(report: dict[str, Any]) -> str:
    header, settings = report["header"], report["header"]["settings"]
    on_cpu = header["device_type"] == "cpu"
    lines = [
        f"# lightning_mim benchmark: ViT-{settings['size']}/{settings['patch_size']} at {settings['img_size']} px, "
        f"batch {settings['batch']}, {'bf16' if settings['precision'] == 'bf16' else 'fp32'}, {header['device_type']}",
        "",
        f"- device: {header['device']}; torch threads {header['torch_threads']}, CPUs {header['cpu_count']}; "
        + (", ".join(f"{key}={value}" for key, value in header["openmp_env"].items() if value is not None)
           or "no OpenMP environment variables set"),
        f"- load average (1, 5, 15 min): start {_triple(header['loadavg_start'])}, "
        f"end {_triple(header['loadavg_end'])}",
        f"- torch {header['torch']}, timm {header['timm']}, lightning {header['lightning']}, "
        f"python {header['python']}; {header['time_utc']}",
        "- settings: " + ", ".join(f"{key}={value}" for key, value in settings.items()),
        f"- dense matmul reference: {header['matmul']}, measured before and after each method's timed steps",
        "",
    ]
    memory_kind = report["methods"][0]["peak_mem_kind"]
    columns = ["method", "params (M)", "step (ms)", "img/s", "GFLOPs/img (fwd+bwd)", "achieved TFLOP/s",
               "matmul TFLOP/s", "MFU vs matmul", f"{memory_kind} (MiB)",
               "compile (s)" if settings["compile"] else "first step (s)", "attention share", "SDPA kernel"]
    if on_cpu:
        columns.append(f"CPU target (>= {CPU_TARGET_RATIO:.0%} of matmul)")
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in report["methods"]:
        cells = [row["method"], f"{row['params_m']:.1f}", f"{row['step_ms']:.1f}", _rate(row["img_per_s"]),
                 f"{row['gflops_per_img']:.2f}", f"{row['achieved_tflops']:.4f}", f"{row['matmul_tflops']:.4f}",
                 f"{row['mfu_vs_matmul']:.1%}", f"{row['peak_mem_mib']:.0f}", f"{row['first_step_s']:.1f}",
                 f"{row['attention_share']:.0%}", row["sdpa_kernels"]]
        if on_cpu:
            cells.append("met" if row["cpu_target_met"] else "not met")
        lines.append("| " + " | ".join(cells) + " |")
    if on_cpu and (settings["size"], settings["patch_size"]) != ("small", 16):
        lines += ["", "The CPU target is defined for ViT-S/16 (`--size small --patch-size 16`); this run uses "
                      "another model, so its target column is indicative only."]
    if report["data"]:
        data = header["data"]
        origin = (f"{settings['data_images']} generated JPEGs, 256-500 px, mean {data['mean_file_kb']:.0f} KB"
                  if data["generated"] else f"up to {settings['data_images']} images of "
                  f"{' and '.join(str(path) for path in (data['image_folder'], data['shards']) if path)}")
        lines += ["", f"Data pipeline: decode + the method's views through the MIMDataModule train loader, "
                      f"{settings['workers']} worker(s), {origin}; worker start-up included; median of "
                      f"{settings['data_repeats']} pass(es). augment_on loader: the whole view per image in the "
                      f"workers (PIL decode, the reference); device: the workers decode to tensors and crop (a "
                      f"RandomResizedCrop decodes only its region of a JPEG), and the rest runs batched on the "
                      f"{header['device_type']} (its time per batch in the last column); device_whole: the same "
                      f"with whole JPEGs decoded before the crop (crop_decode off); "
                      f"device_decode: the workers read the files, and the {header['device_type']} also decodes "
                      f"the JPEGs and crops.",
                  "",
                  "| method | source | augment on | images | seconds | img/s | img/s per worker | img/s per core | "
                  "data / train-step img/s | workers per device at the step rate | device part (ms / batch) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in report["data"]:
            device_ms = "-" if row["device_ms_per_batch"] is None else f"{row['device_ms_per_batch']:.1f}"
            lines.append(f"| {row['method']} | {row['source']} | {row['augment_on']} | {row['images']} | "
                         f"{row['seconds']:.2f} | {_rate(row['img_per_s'])} | {_rate(row['img_per_s_per_worker'])} | "
                         f"{_rate(row['img_per_cpu_s'])} | {row['data_vs_train']:.2f} | {row['workers_per_device']} | "
                         f"{device_ms} |")
    if report.get("decode"):
        lines += ["", "CPU decoders, file bytes to a uint8 tensor, one process (median of 3 passes):", "",
                  "| decoder | images | ms / image |", "|---|---|---|"]
        for row in report["decode"]:
            lines.append(f"| {row['decoder']} | {row['images']} | {row['ms_per_image']:.3f} |")
    if report["shards"]:
        lines += ["", f"Shard writing (`make-shards`: read, decode check, tar writing) of the "
                      f"{settings['data_images']} generated JPEGs, max_count {report['shards'][0]['max_count']}, "
                      f"process pool start-up included.", "",
                  "| shard-writing workers | images | shards | seconds | img/s | img/s per worker |",
                  "|---|---|---|---|---|---|"]
        for row in report["shards"]:
            lines.append(f"| {row['workers']} | {row['images']} | {row['shards']} | {row['seconds']:.2f} | "
                         f"{_rate(row['img_per_s'])} | {_rate(row['img_per_s_per_worker'])} |")
    return "\n".join(lines) + "\n"


def _triple(values: list[float]) -> str:
    return ", ".join(f"{value:.2f}" for value in values)


def _rate(value: float) -> str:
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


# ------------------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="all", help="comma-separated method names (e.g. mae,lut,"
                                                         "beyondmasking:zoom_out), or 'all'")
    parser.add_argument("--size", default="small", help="backbone size: micro, tiny, small, base, large, huge")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--precision", choices=("32", "bf16"), default="32",
                        help="bf16: forward under torch.autocast(device, torch.bfloat16), matmul reference in bf16")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10, help="timed train steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (>= 1; the first one is "
                                                              "reported as first step / compile time)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the method's compute_losses")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--method-args", type=json.loads, default={},
                        help='JSON object of constructor arguments, e.g. \'{"decoder_depth": 1}\'; each method '
                             'takes the ones its constructor accepts')
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--matmul-seconds", type=float, default=1.0,
                        help="minimum duration of each dense matmul measurement")
    parser.add_argument("--data", default="imagefolder,webdataset",
                        help=f"comma-separated data sources to time ({', '.join(DATA_SOURCES)}), or 'none'")
    parser.add_argument("--data-images", type=int, default=512, help="images per data-pipeline pass")
    parser.add_argument("--data-dir", default=None,
                        help="a real ImageFolder root (DIR/train/<class>/*, DIR/val/<class>/*) instead of generated "
                             "JPEGs; its train/ split is written to temporary shards unless --shards is given")
    parser.add_argument("--shards", default=None, help="existing WebDataset train shards (brace pattern)")
    parser.add_argument("--workers", type=int, default=1, help="data loader workers (0: in the main process)")
    parser.add_argument("--augment-on", type=_augment_places, default="loader,device",
                        help="where the views are made, each timed in turn per method and source: 'loader' "
                             "(per image in the workers, the reference), 'device' (workers decode and crop, the rest "
                             "batched on --device), 'device_whole' (the same, JPEGs decoded whole before the crop), "
                             "'device_decode' (workers read files, --device decodes the JPEGs, crops and augments)")
    parser.add_argument("--data-repeats", type=int, default=1,
                        help="passes over the loader per row; the row reports the median pass")
    parser.add_argument("--shard-workers", type=_worker_counts, default="1,2",
                        help="make-shards worker counts to time on the generated JPEGs (comma-separated), or 'none'")
    parser.add_argument("--out", default=None, help="folder for bench.md and bench.json")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be at least 1 (the first warm-up step is timed as first step)")
    if args.data_repeats < 1:
        parser.error("--data-repeats must be at least 1")
    if args.batch < 2 or args.data_images < 1 or args.workers < 0 or args.matmul_seconds <= 0 \
            or (args.threads is not None and args.threads < 1):
        parser.error("need --batch >= 2 (BatchNorm heads), --data-images >= 1, --workers >= 0, --matmul-seconds > 0 "
                     "and --threads >= 1")
    if not isinstance(args.method_args, dict):
        parser.error(f"--method-args must be a JSON object, got {args.method_args!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    return args


def _augment_places(text: str) -> list[str]:
    places = [word.strip() for word in text.split(",") if word.strip()]
    if not places or not set(places) <= {"loader", "device", "device_whole", "device_decode"}:
        raise argparse.ArgumentTypeError(f"--augment-on takes loader, device, device_whole and/or device_decode "
                                         f"(comma-separated), got {text!r}")
    return places


def _worker_counts(text: str) -> list[int]:
    counts = [] if text == "none" else [int(word) for word in text.split(",")]
    if any(count < 1 for count in counts):
        raise argparse.ArgumentTypeError(f"worker counts must be positive, got {text!r}")
    return counts


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Benchmark the selected methods, data sources and shard writing; returns the report (header, methods, data,
    shards)."""
    device = torch.device(args.device)
    known = bench_methods()
    names = list(known) if args.methods == "all" else [n.strip().lower() for n in args.methods.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {sorted(known)} or 'all'")
    sources = [] if args.data == "none" else [s.strip() for s in args.data.split(",") if s.strip()]
    if not set(sources) <= set(DATA_SOURCES):
        raise SystemExit(f"--data takes a subset of {DATA_SOURCES} or 'none', got {args.data!r}")

    loadavg_start = list(os.getloadavg())
    method_rows: list[dict[str, Any]] = []
    data_rows: list[dict[str, Any]] = []
    tmp = Path(tempfile.mkdtemp(prefix="mim_bench_"))
    try:
        data, shard_rows = prepare_data(args, sources, tmp) if sources else (None, [])
        decode_rows = bench_decode(Path(data["image_folder"]), args.data_images) if data and data["image_folder"] \
            else []
        for name in names:
            cls, row_args = known[name]
            method = build_method(cls, args, row_args)
            row = bench_train_step(name, method, args, device)
            row["method_args"] = {**method_kwargs(cls, args.method_args), **row_args}
            method_rows.append(row)
            method.cpu()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            for source in sources:
                for augment_on in args.augment_on:  # interleaved, so both see the same machine load
                    data_row = bench_data(source, name, method, data, args, augment_on, device)
                    data_row["data_vs_train"] = data_row["img_per_s"] / row["img_per_s"]
                    data_row["workers_per_device"] = math.ceil(row["img_per_s"] / data_row["img_per_s_per_worker"])
                    data_rows.append(data_row)
            del method
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    width = BackboneConfig(size=args.size, img_size=args.img_size, patch_size=args.patch_size).width
    tokens = (args.img_size // args.patch_size) ** 2 + 1
    dtype = "bfloat16" if args.precision == "bf16" else "float32"
    return {
        "header": {
            "device": device_name(device), "device_type": device.type, "torch": torch.__version__,
            "timm": timm.__version__, "lightning": lightning.__version__, "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "openmp_env": {key: os.environ.get(key) for key in OPENMP_ENV},
            "loadavg_start": loadavg_start, "loadavg_end": list(os.getloadavg()),
            "matmul": f"({args.batch * tokens} x {width}) @ ({width} x {4 * width}) in {dtype}",
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "settings": vars(args),
            "data": data,
        },
        "methods": method_rows,
        "data": data_rows,
        "decode": decode_rows,
        "shards": shard_rows,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the Markdown table and write `--out`/bench.md and bench.json."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        report = run(args)
    finally:
        torch.set_num_threads(threads)
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
