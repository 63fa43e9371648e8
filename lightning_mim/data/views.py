"""The DataModule's own views of the images: the normalisation statistics of each source and the evaluation
transform (the training views are the method's)."""
from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torchvision import transforms

from lightning_mim.data.decode import ToMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_STATS = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "synthetic": ((0.5,), (0.5,)),
    "imagefolder": (IMAGENET_MEAN, IMAGENET_STD),
    "webdataset": (IMAGENET_MEAN, IMAGENET_STD),
}


def expand_stats(values: tuple[float, ...], in_chans: int, name: str) -> tuple[float, ...]:
    """Per-channel `values` (a mean or std) for `in_chans` channels: one value repeated, or RGB averaged to grey."""
    values = tuple(float(v) for v in values)
    if len(values) == in_chans:
        return values
    if len(values) == 1:
        return values * in_chans
    if len(values) == 3 and in_chans == 1:
        return (sum(values) / 3,)
    raise ValueError(f"{name} has {len(values)} values; cannot expand it to {in_chans} channels")


def eval_transform(source: str, size: int, native_size: int | None, mode: str, mean: tuple[float, ...],
                   std: tuple[float, ...], resize_ratio: float) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> normalised tensor of `size` in `mode` ('L' or 'RGB').

    imagefolder/webdataset: resize the shorter side to size / resize_ratio, then centre-crop; fashion_mnist/synthetic:
    resize only when `size` differs from the source's `native_size`.
    """
    steps: list[Callable] = [ToMode(mode)]
    if source in ("imagefolder", "webdataset"):
        steps += [transforms.Resize(int(size / resize_ratio), interpolation=transforms.InterpolationMode.BICUBIC),
                  transforms.CenterCrop(size)]
    elif size != native_size:
        steps.append(transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BICUBIC))
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    return transforms.Compose(steps)

