"""CPU JPEG decoders, from the file bytes to a uint8 tensor: PIL (full size and DCT-scaled), torchvision, and
TurboJPEG 3's region decode of a MAE crop."""
from __future__ import annotations

import io
import itertools
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

from lightning_mim.data.jpeg_crop import RegionResizedCrop, read_jpeg, turbojpeg
from lightning_mim.data.decode import decode_to_tensor
from lightning_mim.data.seeding import seeded_generators


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
