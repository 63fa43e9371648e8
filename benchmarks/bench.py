"""Benchmark every MIM method's train step and the data pipelines; writes Markdown + JSON and prints the Markdown.

Per method: train-step throughput (forward + backward + AdamW step), peak memory, FLOPs per image (FlopCounterMode over
one forward + backward), achieved FLOP/s, and its ratio to a dense matmul of the model's width measured in the same
run next to the method ("MFU vs matmul"). Per method and data source: decode + augment throughput of the
MIMDataModule train loader (ImageFolder, WebDataset) with that method's train transform. Per worker count: the
throughput of writing the generated images as WebDataset shards (`make-shards`). See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning
import timm
import torch

from benchmarks.data import DATA_SOURCES, bench_data, prepare_data
from benchmarks.decoders import bench_decode
from benchmarks.device import device_name
from benchmarks.methods import bench_methods, build_method, method_kwargs
from benchmarks.report import to_markdown
from benchmarks.step import bench_train_step
from lightning_mim.backbone import BackboneConfig

# OpenMP settings that change CPU results: with the default spin-waiting, a 2-core machine shared with other jobs
# runs small ops many times slower (README, "CPU"); recorded in the header.
OPENMP_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


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
