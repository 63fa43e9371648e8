"""Fixed sine-cosine position embeddings."""
from __future__ import annotations

import torch


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[sin | cos] embedding of `positions` (N,) with frequencies 10000^(-k/(dim/2)), k < dim/2. Returns (N, dim)."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int, cls_token: bool = True) -> torch.Tensor:
    """MAE's 2-D table, shape (1 + grid_h*grid_w, dim) with a zero cls row first when `cls_token`.

    Channels [0, dim/2) encode the column index and [dim/2, dim) the row index (MAE's meshgrid(w, h) order);
    each half is [sin | cos]. Rows are in raster order (row-major over the patch grid).
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    table = torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, dim, dtype=table.dtype), table], dim=0)
    return table.float()


def sincos_1d_interleaved(num_positions: int, dim: int) -> torch.Tensor:
    """The transformer's 1-D table (BEiT / MAE-pytorch `get_sinusoid_encoding_table`), shape (num_positions, dim):
    entry (n, j) is sin(n / 10000^(2 floor(j/2) / dim)) for even j and cos(...) for odd j, i.e. sine and cosine
    interleaved (not the [sin | cos] halves of `sincos_1d`). Computed in float64, returned in float32."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {dim}")
    exponent = 2 * (torch.arange(dim, dtype=torch.float64) // 2) / dim
    angles = torch.arange(num_positions, dtype=torch.float64)[:, None] / 10000 ** exponent[None, :]
    table = torch.empty_like(angles)
    table[:, 0::2] = angles[:, 0::2].sin()
    table[:, 1::2] = angles[:, 1::2].cos()
    return table.float()
