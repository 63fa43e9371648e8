"""The ImageNet-C corruptions (Hendrycks and Dietterich 2019) of evaluation images, through `imagecorruptions`
(Michaelis et al. 2019: the ImageNet-C definitions and parameters for images of any size), seeded per image.

`imagecorruptions` 1.1.2 (its last release) predates four library changes; `load_imagecorruptions` adapts them
without changing a corruption: `pkg_resources.resource_filename` (gone with setuptools 81; it locates the frost
images shipped in the package), `skimage.filters.gaussian(multichannel=True)` (now `channel_axis=-1`; glass blur,
elastic transform), `np.float_` (gone with NumPy 2; fog's plasma fractal) and `skimage.util.random_noise`, which
no longer draws from NumPy's seeded global generator (impulse noise): it gets a seed drawn from it.

Images smaller than the package's 32 px minimum (Fashion-MNIST's 28 px) are reflect-padded to 32 px, corrupted and
cropped back. Grey images go through the package as three equal channels; the result is the luminance (ITU-R 601),
except for the noises, which draw per channel: their first channel keeps the noise's stated strength.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import io
import json
import sys
import types
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from lightning_mim.reliability import atomic_write
from lightning_mim.targets.base import MissingExtraError

# the 15 ImageNet-C corruptions, by family (the package's `get_corruption_names("common")`, in its order)
FAMILIES = {"noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
            "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
            "weather": ("snow", "frost", "fog", "brightness"),
            "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression")}
CORRUPTIONS = tuple(name for names in FAMILIES.values() for name in names)
PER_CHANNEL_NOISE = ("gaussian_noise", "shot_noise", "impulse_noise")
SEVERITIES = (1, 2, 3, 4, 5)
MIN_SIZE = 32  # imagecorruptions refuses smaller images
INSTALL = "pip install 'lightning_mim[robustness]' (or `make install`, which installs it)"
LUMINANCE = np.array([0.299, 0.587, 0.114])


class _NumpyWithFloatAlias(types.ModuleType):
    """NumPy as imagecorruptions' module sees it: with the `np.float_` alias NumPy 2 removed."""

    float_ = np.float64

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)


def _resource_filename(package: str, name: str) -> str:
    """pkg_resources' `resource_filename` for a module of an installed package: the file beside that module."""
    return str(Path(sys.modules[package].__file__).parent / name)


def _seeded_random_noise(image: np.ndarray, **kwargs: Any) -> np.ndarray:
    """scikit-image's `random_noise` with its generator seeded from NumPy's global one (scikit-image >= 0.19 draws
    from a fresh, unseeded generator by default; older versions drew from the global one)."""
    from skimage.util import random_noise

    return random_noise(image, rng=np.random.randint(2**31), **kwargs)


def _gaussian(image: np.ndarray, sigma: float, multichannel: bool = False, **kwargs: Any) -> np.ndarray:
    from skimage.filters import gaussian

    return gaussian(image, sigma=sigma, channel_axis=-1 if multichannel else None, **kwargs)


def _import_imagecorruptions() -> types.ModuleType:
    missing_pkg_resources = importlib.util.find_spec("pkg_resources") is None
    if missing_pkg_resources:  # only while the package imports: nobody else sees this stand-in
        sys.modules["pkg_resources"] = types.SimpleNamespace(resource_filename=_resource_filename)
    try:
        return importlib.import_module("imagecorruptions")
    except ImportError as error:
        raise MissingExtraError(f"the robustness protocol needs the Python package 'imagecorruptions', which is not "
                                f"installed ({error}): {INSTALL}") from None
    finally:
        if missing_pkg_resources:
            sys.modules.pop("pkg_resources", None)


def load_imagecorruptions() -> Callable[..., np.ndarray]:
    """The package's `corrupt(image, severity, corruption_name)`, adapted to today's setuptools, scikit-image and
    NumPy; a one-line error naming the install command when the package is missing."""
    package = sys.modules.get("imagecorruptions")
    if package is None:
        package = _import_imagecorruptions()
    module = package.corruptions
    if not isinstance(module.np, _NumpyWithFloatAlias):  # once per process
        module.gaussian = _gaussian
        module.np = _NumpyWithFloatAlias("numpy")
        module.sk = types.SimpleNamespace(util=types.SimpleNamespace(random_noise=_seeded_random_noise),
                                          color=module.sk.color)
    return package.corrupt


def corruption_seed(seed: int, index: int, corruption: str, severity: int) -> int:
    """The NumPy seed of one corrupted image: a function of the run's seed, the image's index in the validation
    split, the corruption and the severity only (not of the batch, the order or the workers)."""
    return zlib.crc32(f"{seed}/{corruption}/{severity}/{index}".encode())


def corrupt_image(image: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
    """One (H, W) grey or (H, W, 3) RGB uint8 image corrupted at `severity` (1-5) with NumPy's global generator
    seeded with `seed` (its previous state restored afterwards). Same shape and dtype as `image`."""
    if corruption not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {corruption!r}: choose from {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity {severity} is outside 1-5")
    corrupt = load_imagecorruptions()
    height, width = image.shape[:2]
    pad_h, pad_w = max(0, MIN_SIZE - height), max(0, MIN_SIZE - width)
    padding = ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2))
    padded = np.pad(image, padding + ((0, 0),) * (image.ndim - 2), mode="reflect")
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        output = corrupt(np.ascontiguousarray(padded), severity=severity, corruption_name=corruption)
    finally:
        np.random.set_state(state)
    output = output[padding[0][0]:padding[0][0] + height, padding[1][0]:padding[1][0] + width]
    if image.ndim == 3:
        return output
    if corruption in PER_CHANNEL_NOISE:
        return output[..., 0]
    return np.clip(np.rint(output.astype(np.float64) @ LUMINANCE), 0, 255).astype(np.uint8)


def to_pixels(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """Normalised (B, C, H, W) images -> uint8 (B, C, H, W) pixels on the CPU."""
    mean_t, std_t = _stats(mean, std)
    return ((images.float().cpu() * std_t + mean_t) * 255.0).round().clamp(0, 255).to(torch.uint8)


def from_pixels(pixels: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 (B, C, H, W) pixels -> normalised float32 images."""
    mean_t, std_t = _stats(mean, std)
    return (pixels.float() / 255.0 - mean_t) / std_t


def _stats(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[Tensor, Tensor]:
    return (torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1),
            torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))


def corrupt_pixels(pixels: Tensor, indices: Tensor, corruption: str, severity: int, seed: int) -> Tensor:
    """uint8 (B, C, H, W) pixels (C = 1 or 3) of the validation images `indices`, corrupted one by one
    (`corrupt_image`, seeded by `corruption_seed`)."""
    arrays = pixels.permute(0, 2, 3, 1).numpy()
    if arrays.shape[-1] == 1:
        arrays = arrays[..., 0]
    corrupted = np.stack([corrupt_image(array, corruption, severity,
                                        corruption_seed(seed, int(index), corruption, severity))
                          for array, index in zip(arrays, indices.tolist())])
    output = torch.from_numpy(corrupted)
    return output.unsqueeze(1) if output.ndim == 3 else output.permute(0, 3, 1, 2).contiguous()


@dataclass
class CorruptionCache:
    """Corrupted uint8 pixels on disk, `<folder>/<key>.pt` per corruption and severity: every encoder evaluated on the
    same images (`data`: the evaluation data's identity; the image indices, seed and package version) reads them
    back instead of corrupting them again (the corruptions cost far more than a micro encoder's forward pass)."""

    folder: Path
    data: dict[str, Any]

    def corrupted(self, pixels: Tensor, indices: Tensor, corruption: str, severity: int, seed: int) -> Tensor:
        version = importlib.metadata.version("imagecorruptions")
        identity = json.dumps({"data": self.data, "indices": hashlib.sha256(indices.numpy().tobytes()).hexdigest(),
                               "corruption": corruption, "severity": severity, "seed": seed,
                               "imagecorruptions": version, "shape": list(pixels.shape)}, sort_keys=True)
        path = self.folder / f"{hashlib.sha256(identity.encode()).hexdigest()[:32]}.pt"
        if path.is_file():
            stored = torch.load(path, map_location="cpu", weights_only=True)
            if stored["identity"] == identity:
                return stored["pixels"]
        output = corrupt_pixels(pixels, indices, corruption, severity, seed)
        buffer = io.BytesIO()
        torch.save({"pixels": output, "identity": identity}, buffer)
        atomic_write(path, lambda handle: handle.write(buffer.getbuffer()))
        return output


def parse_corruptions(text: str | None) -> tuple[str, ...]:
    """`--corruptions`: comma-separated names or family names (noise, blur, weather, digital); None: all 15; `none`:
    no corruption (the shift sets only)."""
    if text is None:
        return CORRUPTIONS
    if text.strip() == "none":
        return ()
    chosen: list[str] = []
    for name in (part.strip() for part in text.split(",") if part.strip()):
        names = FAMILIES.get(name, (name,))
        unknown = [item for item in names if item not in CORRUPTIONS]
        if unknown:
            raise ValueError(f"unknown corruption {unknown[0]!r}: choose from {', '.join(CORRUPTIONS)} or a family "
                             f"({', '.join(FAMILIES)})")
        chosen += [item for item in names if item not in chosen]
    if not chosen:
        raise ValueError("--corruptions is empty: name at least one corruption or family (or none)")
    return tuple(chosen)


__all__ = ["CORRUPTIONS", "FAMILIES", "INSTALL", "SEVERITIES", "CorruptionCache", "corrupt_image", "corrupt_pixels",
           "corruption_seed", "from_pixels", "load_imagecorruptions", "parse_corruptions", "to_pixels"]
