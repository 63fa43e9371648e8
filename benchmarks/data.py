"""Data-pipeline throughput: generated JPEGs, shard writing (`make-shards`) and the MIMDataModule train loader with
each method's views, per source and place of augmentation."""
from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks.device import synchronize
from lightning_mim.data import MIMDataModule, write_shards
from lightning_mim.methods import MIMMethod

DATA_SOURCES = ("imagefolder", "webdataset")


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
