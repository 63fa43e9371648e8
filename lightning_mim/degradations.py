"""Image degradations of Beyond Masking (Tian et al. 2022) and the alignments that map a prediction grid onto the
loss grid. Pure, batched tensor functions that run on the images' device: every random parameter is an explicit
argument, and the `draw_*` functions draw them on the device (no host synchronisation).

The warp, the blur and the grey mix act on data-normalised images, as in the published code. All resizing is
`F.interpolate(mode="area")`, i.e. adaptive average pooling (output pixel i averages input pixels
floor(i n / s) .. ceil((i + 1) n / s) - 1 with equal weights), in both directions: not an antialiased resize.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

GREY_WEIGHT_HIGH = 0.667  # each grey weight ~ U(0, 0.667), not normalised to sum to 1
ZOOM_IN_CENTRE_WEIGHT, ZOOM_IN_EDGE_WEIGHT = 0.8, 0.2


def area_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size) by area interpolation (adaptive average pooling), in float32."""
    return F.interpolate(images.float(), size=(size, size), mode="area")


# ------------------------------------------------------------------------------------------------ zoom-in, (a)
def centre_crop(images: torch.Tensor, margin: int) -> torch.Tensor:
    """The fixed central crop that drops `margin` pixels on every side (zoom-in: 224 of 288, margin 32)."""
    height, width = images.shape[-2:]
    return images[..., margin:height - margin, margin:width - margin]


def border_bands_mse(prediction: torch.Tensor, target: torch.Tensor, margin: int) -> torch.Tensor:
    """Zoom-in's edge loss: the SUM of four band means of the squared error, top rows [0, m) and bottom rows
    [n - m, n) over every column, left and right columns [0, m) / [n - m, n) over rows [m, n - m)."""
    n = prediction.shape[-1]
    error = (prediction.float() - target.float()).pow(2)
    inner = slice(margin, n - margin)
    return (error[..., :margin, :].mean() + error[..., n - margin:, :].mean()
            + error[..., inner, :margin].mean() + error[..., inner, n - margin:].mean())


# ------------------------------------------------------------------------------------------------ zoom-out, (b)
def draw_zoom_out_offset(pad: int, device: torch.device | str | None = None,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """(left, top), each uniform in {0, ..., pad - 1}, drawn once for the whole batch (left first, as published)."""
    return torch.randint(0, pad, (2,), device=device, generator=generator)


def _symmetric_index(size: int, start: torch.Tensor, source: int) -> torch.Tensor:
    """Source index of each of `size` output positions when a length-`source` axis starts at `start`, mirrored with
    the edge pixel repeated (numpy's 'symmetric')."""
    index = torch.arange(size, device=start.device) - start
    index = torch.where(index < 0, -index - 1, index)
    return torch.where(index >= source, 2 * source - 1 - index, index)


def symmetric_pad(images: torch.Tensor, size: int, offset: torch.Tensor) -> torch.Tensor:
    """Place (B, C, s, s) images at (top, left) = (offset[1], offset[0]) of a (size, size) canvas whose borders are
    mirror copies including the edge pixel: `np.pad(x, ((top, pad - top), (left, pad - left)), 'symmetric')` with
    pad = size - s (torch's 'reflect' drops the edge pixel). Needs pad <= s; offset on the images' device."""
    source = images.shape[-1]
    if not 0 < size - source <= source:
        raise ValueError(f"zoom-out canvas {size} must exceed the image {source} by at most {source} pixels")
    rows = _symmetric_index(size, offset[1], source)
    cols = _symmetric_index(size, offset[0], source)
    return images.index_select(-2, rows).index_select(-1, cols)


# ------------------------------------------------------------------------------------------------ distortion, (c)
def draw_fisheye(batch_size: int, device: torch.device | str | None = None, generator: torch.Generator | None = None,
                 low: float = 0.15, high: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample centres (B, 2) ~ U[-1, 1]^2 as (x, y) and magnitudes (B,) ~ U[low, high]."""
    centres = torch.rand(batch_size, 2, device=device, generator=generator) * 2.0 - 1.0
    magnitudes = low + (high - low) * torch.rand(batch_size, device=device, generator=generator)
    return centres, magnitudes


def fisheye_grid(size: int, centres: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
    """Sampling grid (B, size, size, 2) in grid_sample's (x, y) order: g' = g + m |c - g| (c - g) on the base grid
    g = linspace(-1, 1, size)^2. The factor m |c - g| stays below 1 for m <= 0.25, so g' lies between g and c."""
    axis = torch.linspace(-1.0, 1.0, size, device=centres.device)
    grid_y, grid_x = torch.meshgrid(axis, axis, indexing="ij")
    base = torch.stack([grid_x, grid_y], dim=-1)[None]
    towards = centres[:, None, None, :] - base
    factor = magnitudes[:, None, None, None] * towards.norm(dim=-1, keepdim=True)
    return base + factor * towards


def fisheye(images: torch.Tensor, centres: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
    """Radial magnification around each sample's centre: bilinear grid_sample, align_corners=True, zero padding
    (never used: the grid stays inside [-1, 1]). Far from c the map folds back when m r > 1/2 (reproduced as is)."""
    grid = fisheye_grid(images.shape[-1], centres, magnitudes)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True)


# ------------------------------------------------------------------------------------------------ blur, (d)
def draw_blur_kernels(batch_size: int, channels: int, kernel_size: int = 7, groups: int = 1,
                      device: torch.device | str | None = None, generator: torch.Generator | None = None
                      ) -> torch.Tensor:
    """Per-sample conv weights (B, C, C / groups, k, k), each tap ~ N(1 / k^2, 0.02^2)."""
    shape = (batch_size, channels, channels // groups, kernel_size, kernel_size)
    return 1.0 / kernel_size ** 2 + 0.02 * torch.randn(shape, device=device, generator=generator)


def blur_bias_bound(channels: int, kernel_size: int = 7, groups: int = 1) -> float:
    """PyTorch's default Conv2d bias init is U(+-1/sqrt(fan_in)), fan_in = C / groups x k^2 (0.082 for 3->3, 7x7)."""
    return (channels // groups * kernel_size ** 2) ** -0.5


def blur(images: torch.Tensor, kernels: torch.Tensor, bias: torch.Tensor, groups: int = 1,
         padding: int | None = None) -> torch.Tensor:
    """Each sample convolved with its own kernels (B, C_out, C_in / groups, k, k) plus `bias` (C_out,), stride 1,
    zero padding `padding` (default k // 2; zeros of normalised data, i.e. the mean colour) and detached.
    The published layer, Conv2d(3, 7, 1, padding=3), gives 7 x (H + 6) x (W + 6) (it crashes the patch embedding;
    the default here is the assumed intent, a 7 x 7 kernel with 'same' padding)."""
    batch, channels, height, width = images.shape
    out_channels, kernel_size = kernels.shape[1], kernels.shape[-1]
    padding = kernel_size // 2 if padding is None else padding
    flat = images.detach().float().reshape(1, batch * channels, height, width)
    weight = kernels.reshape(batch * out_channels, *kernels.shape[2:]).to(flat.dtype)
    out = F.conv2d(flat, weight, bias.float().repeat(batch), padding=padding, groups=batch * groups)
    return out.reshape(batch, out_channels, *out.shape[-2:]).detach()


# ------------------------------------------------------------------------------------------------ de-colourisation, (e)
def draw_grey_weights(device: torch.device | str | None = None, generator: torch.Generator | None = None
                      ) -> torch.Tensor:
    """(w_r, w_g, w_b), each ~ U(0, 0.667), drawn once for the whole batch."""
    return GREY_WEIGHT_HIGH * torch.rand(3, device=device, generator=generator)


def decolorize(images: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) = sum_c w_c I_c (weights not normalised: the grey's scale varies per batch)."""
    if images.shape[1] != weights.shape[0]:
        raise ValueError(f"decolorize: {images.shape[1]} image channels but {weights.shape[0]} grey weights")
    return torch.einsum("bchw,c->bhw", images.float(), weights.float()).unsqueeze(1)


__all__ = ["area_resize", "blur", "blur_bias_bound", "border_bands_mse", "centre_crop", "decolorize",
           "draw_blur_kernels", "draw_fisheye", "draw_grey_weights", "draw_zoom_out_offset", "fisheye",
           "fisheye_grid", "symmetric_pad"]
