"""Batched photometric augmentations on the device: (B, C, H, W) float images in [0, 1], C = 1 or 3, with
per-sample parameters.

Each op takes its parameters explicitly, one value per sample; each `draw_*` function draws them on the images'
device from torch's generator (or the one passed), without reading anything on the host, so a training step can
augment a batch with no host-device synchronisation and a test can feed known draws. The ops follow torchvision's
float-tensor kernels (`torchvision.transforms.v2.functional.adjust_*`, `rgb_to_grayscale`, `solarize`); the blur is a
true Gaussian of standard deviation `sigma` (what PIL's `GaussianBlur(radius)` approximates with three box blurs).

Colour jitter applies brightness, contrast, saturation and hue in a per-sample random order (`JitterDraw.order`), as
torchvision's ColorJitter draws a fresh order for every image. A method with ColorJitter(0.4, 0.4, 0.4) on its view
(BEiT, MaPeT) overrides `MIMMethod.augment_views` with

    draws = draws or draw_color_jitter(len(views), 0.4, 0.4, 0.4, device=views.device)
    return color_jitter(views, draws, hue=False)

and `train_transform` with the per-image reference (`loader_views` + v2.ColorJitter + ToDtype + Normalize). Inputs are [0, 1] images, not ImageNet-normalised
ones: the data path normalises after augmenting (`MIMDataModule.on_after_batch_transfer`).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

# torchvision's (and ITU-R 601-2's) luma weights, as `rgb_to_grayscale` uses them on tensors
LUMA = (0.2989, 0.587, 0.114)
# the jitter ops in torchvision's ColorJitter numbering (its `fn_idx`)
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


def _per_sample(values: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1) in the images' dtype, so it broadcasts over channels and pixels."""
    if values.shape != images.shape[:1]:
        raise ValueError(f"expected one value per sample, shape ({images.shape[0]},), got {tuple(values.shape)}")
    return values.to(images.dtype).view(-1, 1, 1, 1)


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    factor = _per_sample(factor, images)
    return (factor * images + (1.0 - factor) * other).clamp(0.0, 1.0)


def grayscale(images: torch.Tensor, num_output_channels: int | None = None) -> torch.Tensor:
    """Luma of RGB images (0.2989 R + 0.587 G + 0.114 B), repeated to `num_output_channels` (default: the input's);
    one-channel images are returned as they are."""
    channels = images.shape[1]
    if channels == 1:
        return images if num_output_channels in (None, 1) else images.expand(-1, num_output_channels, -1, -1)
    red, green, blue = images.unbind(dim=1)
    luma = (red * LUMA[0] + green * LUMA[1] + blue * LUMA[2]).unsqueeze(1)
    return luma.expand(-1, num_output_channels or channels, -1, -1)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor * image, clipped to [0, 1]."""
    return _blend(images, torch.zeros_like(images), factor)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the image's mean luma: factor * image + (1 - factor) * mean, clipped."""
    mean = grayscale(images, 1).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(images, mean, factor)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the image's luma; identity for one-channel images (as torchvision)."""
    if images.shape[1] == 1:
        return images
    return _blend(images, grayscale(images, 1), factor)


def _rgb_to_hsv(images: torch.Tensor) -> torch.Tensor:
    red, green, blue = images.unbind(dim=1)
    high, low = images.amax(dim=1), images.amin(dim=1)
    spread = high - low
    grey = spread == 0
    saturation = spread / torch.where(grey, torch.ones_like(high), high)
    safe_spread = torch.where(grey, torch.ones_like(spread), spread)
    # hue in sixths of the circle, from whichever channel is the largest (red first, then green, as PIL)
    hue = torch.where(high == red, (green - blue) / safe_spread,
                      torch.where(high == green, 2.0 + (blue - red) / safe_spread, 4.0 + (red - green) / safe_spread))
    hue = torch.where(grey, torch.zeros_like(hue), hue)
    return torch.stack((torch.remainder(hue / 6.0, 1.0), saturation, high), dim=1)


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    hue, saturation, value = hsv.unbind(dim=1)
    # standard formula: channel n = v - v s max(0, min(k, 4 - k, 1)) with k = (n + 6 h) mod 6, n = 5, 3, 1
    channels = []
    for offset in (5.0, 3.0, 1.0):
        k = torch.remainder(offset + hue * 6.0, 6.0)
        channels.append(value - value * saturation * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0))
    return torch.stack(channels, dim=1)


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by `shift` turns (in [-0.5, 0.5]) through HSV; identity for one-channel images."""
    if images.shape[1] == 1:
        return images
    hsv = _rgb_to_hsv(images)
    hue = torch.remainder(hsv[:, 0] + _per_sample(shift, images)[:, 0], 1.0)
    return _hsv_to_rgb(torch.stack((hue, hsv[:, 1], hsv[:, 2]), dim=1)).clamp(0.0, 1.0)


def solarize(images: torch.Tensor, threshold: float) -> torch.Tensor:
    """1 - x where x >= threshold (PIL's ImageOps.solarize at threshold * 255 on 8-bit images)."""
    return torch.where(images >= threshold, 1.0 - images, images)


def gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """(B, 2 radius + 1) normalised 1-D Gaussian weights, one row per sample's sigma."""
    offsets = torch.arange(-radius, radius + 1, device=sigma.device, dtype=torch.float32)
    weights = torch.exp(-0.5 * (offsets / sigma.float().clamp_min(1e-6).unsqueeze(1)) ** 2)
    return weights / weights.sum(dim=1, keepdim=True)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur of standard deviation sigma[b] per sample, truncated at `radius` pixels (pick
    radius >= 3 x the largest sigma), image edges extended by replication (as PIL's blur)."""
    batch, channels, height, width = images.shape
    if sigma.shape != (batch,):
        raise ValueError(f"sigma must have one value per sample, shape ({batch},), got {tuple(sigma.shape)}")
    kernels = gaussian_kernels(sigma, radius).to(images.dtype).repeat_interleave(channels, dim=0)
    flat = images.reshape(1, batch * channels, height, width)
    flat = F.pad(flat, (radius, radius, radius, radius), mode="replicate")
    flat = F.conv2d(flat, kernels.view(-1, 1, 1, 2 * radius + 1), groups=batch * channels)
    flat = F.conv2d(flat, kernels.view(-1, 1, 2 * radius + 1, 1), groups=batch * channels)
    return flat.view(batch, channels, height, width)


def blur_radius(sigma_high: float) -> int:
    """Kernel radius that keeps a Gaussian of standard deviation up to sigma_high to within 0.3 % of its mass."""
    return max(1, math.ceil(3.0 * sigma_high))


class JitterDraw(NamedTuple):
    """Per-sample colour-jitter parameters: factors (B,) and the order (B, 4) in which the four ops run (a
    permutation of BRIGHTNESS, CONTRAST, SATURATION, HUE per row)."""

    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    order: torch.Tensor


def _uniform(batch: int, low: float, high: float, device: torch.device | str | None,
             generator: torch.Generator | None) -> torch.Tensor:
    return low + (high - low) * torch.rand(batch, device=device, generator=generator)


def draw_color_jitter(batch: int, brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0,
                      hue: float = 0.0, device: torch.device | str | None = None,
                      generator: torch.Generator | None = None) -> JitterDraw:
    """ColorJitter(brightness, contrast, saturation, hue)'s draws for `batch` images: factors uniform in
    [1 - b, 1 + b] (likewise contrast, saturation), hue shift in [-hue, hue], and a uniformly random order per image."""
    for name, value in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
        if not 0.0 <= value:
            raise ValueError(f"colour jitter {name} must be >= 0, got {value}")
    if not 0.0 <= hue <= 0.5:
        raise ValueError(f"colour jitter hue must lie in [0, 0.5], got {hue}")
    return JitterDraw(
        _uniform(batch, max(0.0, 1.0 - brightness), 1.0 + brightness, device, generator),
        _uniform(batch, max(0.0, 1.0 - contrast), 1.0 + contrast, device, generator),
        _uniform(batch, max(0.0, 1.0 - saturation), 1.0 + saturation, device, generator),
        _uniform(batch, -hue, hue, device, generator),
        torch.rand(batch, 4, device=device, generator=generator).argsort(dim=1),
    )


def color_jitter(images: torch.Tensor, draw: JitterDraw, hue: bool = True) -> torch.Tensor:
    """Brightness, contrast, saturation and hue with per-sample factors, in each sample's own order.

    Brightness, contrast and saturation are each a blend of the image with something else (black, its mean luma,
    its luma), so each of the four positions runs one blend whose partner and factor every sample picks by its own
    op, and the hue rotation where a sample's op is hue: a fixed-shape computation, no host reads. `hue=False` skips
    the hue op (a jitter configured with hue 0), the costliest one, whose HSV round trip is not exactly the
    identity at shift 0."""
    colour = images.shape[1] == 3
    factors = torch.stack((draw.brightness, draw.contrast, draw.saturation, draw.hue), dim=1).to(images.dtype)
    for position in range(4):
        op = draw.order[:, position]
        factor = factors.gather(1, op.unsqueeze(1)).view(-1, 1, 1, 1)
        op = op.view(-1, 1, 1, 1)
        luma = grayscale(images, 1)
        partner = torch.where(op == BRIGHTNESS, torch.zeros_like(luma),
                              torch.where(op == CONTRAST, luma.mean(dim=(1, 2, 3), keepdim=True), luma))
        blended = (factor * images + (1.0 - factor) * partner).clamp(0.0, 1.0)
        unchanged = (op == HUE) if colour else (op == HUE) | (op == SATURATION)  # grey images have no saturation
        images = torch.where(unchanged, images, blended)
        if hue and colour:
            images = torch.where(op == HUE, adjust_hue(images, draw.hue), images)
    return images


def draw_apply(batch: int, p: float, device: torch.device | str | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) booleans, each True with probability p (RandomApply's draw)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"probability must lie in [0, 1], got {p}")
    return torch.rand(batch, device=device, generator=generator) < p


def draw_choice(batch: int, options: int, device: torch.device | str | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) indices, each uniform over `options` choices (RandomChoice with equal probabilities)."""
    return torch.randint(options, (batch,), device=device, generator=generator)


def apply_where(chosen: torch.Tensor, augmented: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """`augmented` for the samples where chosen (B,) is True, `images` for the others."""
    return torch.where(chosen.view(-1, 1, 1, 1), augmented, images)


def one_of(choice: torch.Tensor, *outputs: torch.Tensor) -> torch.Tensor:
    """outputs[choice[b]][b] for every sample b: each sample keeps the op it drew (all ops run on the batch)."""
    result = outputs[0]
    for index, output in enumerate(outputs[1:], start=1):
        result = apply_where(choice == index, output, result)
    return result


def to_unit_float(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 images -> floats in [0, 1], as torchvision's ToDtype(scale=True) computes them (x * (1 / 255))."""
    return images.to(dtype).mul_(1.0 / 255)


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std per channel; mean and std (C,) on the images' device."""
    return images.sub(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))
