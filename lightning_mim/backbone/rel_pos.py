"""BEiT's relative position bias (BEiT, SimMIM, BEiT v2) for the shared ViT, on timm's implementation.

Each table holds (2H-1)(2W-1) + 3 entries per head for an H x W patch grid: one per relative offset between two
patches, then cls -> token, token -> cls and cls -> cls. timm's `gen_relative_position_index` maps each (query, key)
pair of the cls + H*W sequence to its entry. "shared": one table for every block, timm's `RelativePositionBias` at
`rel_pos_bias` (key `rel_pos_bias.relative_position_bias_table`, as timm's Beit and the official checkpoints);
"per_block": one table per block, registered on timm's attention module of that block (key
`blocks.<i>.attn.relative_position_bias_table`, BEiT's per-layer key). The blocks stay timm's: the bias reaches
them as the additive float `attn_mask` that timm's Attention hands to fused scaled-dot-product attention. Tables
start at zero.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.models.beit import RelativePositionBias, gen_relative_position_index

REL_POS_BIAS_MODES = ("none", "shared", "per_block")


def num_relative_entries(grid_size: tuple[int, int]) -> int:
    """(2H-1)(2W-1) relative offsets plus the 3 cls entries."""
    return (2 * grid_size[0] - 1) * (2 * grid_size[1] - 1) + 3


def add_relative_position_bias(vit: nn.Module, mode: str) -> None:
    """Give a timm VisionTransformer `mode`'s tables (see the module docstring) and the index table as the
    non-persistent buffer `relative_position_index`; "none" sets `rel_pos_bias` to None and adds nothing."""
    grid = tuple(vit.patch_embed.grid_size)
    heads = vit.blocks[0].attn.num_heads
    vit.rel_pos_bias = RelativePositionBias(grid, heads) if mode == "shared" else None
    if mode == "none":
        return
    if mode == "per_block":
        for block in vit.blocks:
            block.attn.relative_position_bias_table = nn.Parameter(torch.zeros(num_relative_entries(grid), heads))
    vit.register_buffer("relative_position_index", gen_relative_position_index(grid), persistent=False)


def relative_position_tables(vit: nn.Module) -> list[torch.Tensor] | None:
    """The table each block uses (the same one for every block when shared), or None without relative bias."""
    if getattr(vit, "rel_pos_bias", None) is not None:
        return [vit.rel_pos_bias.relative_position_bias_table] * len(vit.blocks)
    tables = [getattr(block.attn, "relative_position_bias_table", None) for block in vit.blocks]
    return None if tables[0] is None else tables


def relative_position_bias(table: torch.Tensor, index: torch.Tensor, positions: torch.Tensor | None = None
                           ) -> torch.Tensor:
    """The additive attention bias: (1, heads, N, N) over the whole cls + patch sequence (N = 1 + H*W), or
    (B, heads, n, n) over the tokens at `positions` (B, n), indices into that sequence (0 = cls, 1 + k = patch k)."""
    pairs = index[None] if positions is None else index[positions[:, :, None], positions[:, None, :]]
    return table[pairs].permute(0, 3, 1, 2).contiguous()


def combine_attention_masks(attn_mask: torch.Tensor | None, bias: torch.Tensor) -> torch.Tensor:
    """`bias` plus an SDPA mask: a bool mask (True = may attend) becomes 0 / -inf, a float mask is added."""
    if attn_mask is None:
        return bias
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=bias.dtype, device=bias.device).masked_fill(
            ~attn_mask, float("-inf"))
    return attn_mask.to(bias.dtype) + bias


__all__ = ["REL_POS_BIAS_MODES", "add_relative_position_bias", "combine_attention_masks", "num_relative_entries",
           "relative_position_bias", "relative_position_tables"]
