"""`lightning-mim tokenizer fit`: sample per-patch features of a frozen extractor from a DataModule source and fit a
k-means codebook with faiss (GPU when faiss has one), written as safetensors with its recipe in the metadata.

Memory: the sampled features are held in RAM (points x dim x 4 bytes, printed before any work); the rest are
dropped as they stream past (a fixed fraction of every batch is kept, as the official k-CLIP script does).
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from lightning_mim.data import MIMDataModule
from lightning_mim.targets.base import centre_square_view, require
from lightning_mim.targets.kmeans import build_extractor, default_input_size, save_codebook


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def fit_datamodule(source: str, data_dir: str | None, train_shards: str | None, max_images: int | None,
                   batch_size: int, num_workers: int, seed: int) -> MIMDataModule:
    """The training split of a DataModule source, every image read once (webdataset: `max_images` samples, else
    the manifest's count, drawn as its training loader draws them)."""
    webdataset = source == "webdataset"
    return MIMDataModule(source=source, data_dir=data_dir, train_shards=train_shards,
                         train_samples=max_images if webdataset else None, batch_size=batch_size,
                         num_workers=num_workers, persistent_workers=False, pin_memory=False, drop_last=False,
                         train_subset=None if webdataset else max_images, knn_bank_size=None, seed=seed)


def available_memory() -> int | None:
    """Bytes of physical memory free now (Linux), None where unknown."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def sample_plan(total: int, max_points: int) -> tuple[int, float]:
    """(points kept, fraction of every batch kept): all patches when they fit in max_points."""
    kept = min(total, max_points)
    return kept, kept / total


def fit_codebook(output: str | Path, features: str = "pixels", vocab_size: int = 512, *, weights: str | None = None,
                 patch_size: int = 16, input_size: int | None = None, in_chans: int | None = None,
                 source: str = "fashion_mnist", data_dir: str | None = None, train_shards: str | None = None,
                 max_images: int | None = None, max_points: int | None = None, niter: int = 20, nredo: int = 1,
                 max_points_per_centroid: int = 256, seed: int = 0, batch_size: int = 256, num_workers: int = 2,
                 device: str = "auto", compute_dtype: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Fit `vocab_size` L2 k-means centroids on per-patch `features` of the source's training images (the centre
    square at `input_size`, [0, 1]) and write them to `output`. Returns the recorded metadata plus timings."""
    faiss = require("faiss", "lightning-mim tokenizer fit")
    started = time.perf_counter()
    dm = fit_datamodule(source, data_dir, train_shards, max_images, batch_size, num_workers, seed)
    in_chans = in_chans or (dm.native_format() or (None, 3))[1]
    mean = std = None
    if features == "timm":  # an exported encoder expects the data's normalisation
        mean, std = dm.mean_for(in_chans), dm.std_for(in_chans)
    extractor = build_extractor(features, weights, patch_size, in_chans, mean, std)
    in_chans = extractor.in_chans
    input_size = input_size or default_input_size(extractor) or dm.image_size
    grid = extractor.grid(input_size)
    dm.bind(input_size, in_chans, centre_square_view(input_size, "L" if in_chans == 1 else "RGB"))
    dm.setup("fit")
    images = dm.train_dataset_size
    total = images * grid[0] * grid[1]
    max_points = max_points or vocab_size * max_points_per_centroid
    kept, fraction = sample_plan(total, max_points)
    if kept < vocab_size:
        raise ValueError(f"{kept} patch features cannot fit {vocab_size} centroids: use more images or a smaller "
                         f"vocabulary")
    gib = 2 ** 30
    free = available_memory()
    if free is not None and kept * extractor.dim * 4 > free:
        raise ValueError(f"keeping {kept} {extractor.dim}-d patch features needs {kept * extractor.dim * 4 / gib:.1f} "
                         f"GiB of RAM but {free / gib:.1f} GiB are free: lower --max-points (faiss samples at most "
                         f"V x --max-points-per-centroid points anyway)")
    print(f"tokenizer fit: {features} features, {extractor.dim}-d on a {grid[0]} x {grid[1]} grid at {input_size} px, "
          f"{images} images = {total} patches ({total * extractor.dim * 4 / gib:.2f} GiB as float32); keeping "
          f"{kept} ({fraction:.2%} of each batch, sub-sampled while streaming) = "
          f"{kept * extractor.dim * 4 / gib:.2f} GiB in RAM; k-means V={vocab_size}, niter={niter}, nredo={nredo}",
          flush=True)

    run_device = resolve_device(device)
    extractor = extractor.to(run_device).eval().requires_grad_(False)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(compute_dtype or "")
    points = np.empty((kept, extractor.dim), dtype=np.float32)
    generator = torch.Generator().manual_seed(seed)
    filled = seen = 0
    loader = dm.train_dataloader()
    with torch.no_grad(), tqdm(total=images, unit="img", desc="features", disable=not progress) as bar:
        for views, _ in loader:
            with torch.autocast(run_device.type, dtype=dtype, enabled=dtype is not None):
                batch = extractor(views.to(run_device)).flatten(0, 2).float()
            seen += batch.shape[0]
            take = min(round(fraction * seen), kept) - filled
            rows = torch.randperm(batch.shape[0], generator=generator)[:take].sort().values
            points[filled:filled + take] = batch[rows.to(batch.device)].cpu().numpy()
            filled += take
            bar.update(views.shape[0])
    points = points[:filled]
    sampled = time.perf_counter()

    use_gpu = run_device.type == "cuda" and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    kmeans = faiss.Kmeans(extractor.dim, vocab_size, niter=niter, nredo=nredo, seed=seed, gpu=use_gpu,
                          max_points_per_centroid=max_points_per_centroid, verbose=progress)
    kmeans.train(np.ascontiguousarray(points))
    metadata = {"kind": "kmeans", "features": features, "weights": weights, "input_size": input_size,
                "patch_size": extractor.reduction, "in_chans": in_chans,
                "vocab_size": vocab_size, "dim": extractor.dim, "grid": list(grid),
                "mean": list(mean) if mean else None, "std": list(std) if std else None,
                "source": {"source": source, "data_dir": data_dir, "train_shards": train_shards,
                           "images": images, "view": "centre square"},
                "seed": seed, "points": int(filled), "niter": niter, "nredo": nredo,
                "max_points_per_centroid": max_points_per_centroid, "faiss_gpu": use_gpu,
                "objective": float(kmeans.obj[-1]) if len(kmeans.obj) else math.nan}
    save_codebook(torch.from_numpy(kmeans.centroids), output, metadata)
    done = time.perf_counter()
    return {**metadata, "sample_s": sampled - started, "kmeans_s": done - sampled, "total_s": done - started}
