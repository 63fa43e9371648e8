"""Mask generators. Every mask is (B, L) with 1 = removed and 0 = visible, over patches in raster order.

Each generator accepts its random draw explicitly (`noise`, `generator`) so tests can feed known draws.
"""
from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch


def check_mask_ratio(mask_ratio: float) -> None:
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask ratio must lie in (0, 1), got {mask_ratio}: e.g. 0.75 for MAE, 0.6 for SimMIM")


class RandomMask(NamedTuple):
    """MAE random masking. `keep_idx` (B, K) lists visible patches in shuffled order; `restore_idx` (B, L) puts a
    sequence in shuffled order back in raster order; `shuffle_idx` (B, L) is the full permutation."""

    keep_idx: torch.Tensor
    mask: torch.Tensor
    restore_idx: torch.Tensor
    shuffle_idx: torch.Tensor


def random_masking(batch_size: int, num_patches: int, mask_ratio: float, noise: torch.Tensor | None = None,
                   device: torch.device | str | None = None, generator: torch.Generator | None = None,
                   count_rule: Literal["keep", "mask"] = "keep") -> RandomMask:
    """Keep the patches with the smallest noise (argsort of uniform noise, as in MAE). How many: `count_rule`
    "keep" keeps int(L * (1 - mask_ratio)) (MAE; L = 9, r = 0.75: 2 kept, 7 masked), "mask" masks
    int(L * mask_ratio) (MAE-pytorch's generator, Beyond Masking's (m); 6 masked). Both mask 147 of 196 at 0.75."""
    check_mask_ratio(mask_ratio)
    if count_rule not in ("keep", "mask"):
        raise ValueError(f"unknown count_rule {count_rule!r}: 'keep' (keep int(L (1 - r)), MAE) or 'mask' "
                         f"(mask int(r L), MAE-pytorch's generator)")
    if noise is None:
        noise = torch.rand(batch_size, num_patches, device=device, generator=generator)
    elif noise.shape != (batch_size, num_patches):
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected ({batch_size}, {num_patches})")
    if count_rule == "keep":
        num_keep = int(num_patches * (1 - mask_ratio))
    else:
        num_keep = num_patches - int(num_patches * mask_ratio)
    shuffle_idx = torch.argsort(noise, dim=1)
    restore_idx = torch.argsort(shuffle_idx, dim=1)
    mask = torch.ones(batch_size, num_patches, device=noise.device)
    mask[:, :num_keep] = 0
    mask = torch.gather(mask, 1, restore_idx)
    return RandomMask(shuffle_idx[:, :num_keep], mask, restore_idx, shuffle_idx)


def check_cell_size(grid_size: tuple[int, int], cell: int, what: str = "mask") -> tuple[int, int]:
    """The (rows, cols) of `cell` x `cell` patch cells tiling the patch grid; a clear error when they do not."""
    grid_h, grid_w = grid_size
    if cell < 1 or grid_h % cell or grid_w % cell:
        divisors = [d for d in range(1, min(grid_size) + 1) if grid_h % d == 0 and grid_w % d == 0]
        raise ValueError(f"{what}: a cell of {cell} x {cell} patches does not tile the {grid_h} x {grid_w} patch grid; "
                         f"use a mask cell of {divisors} patches (mask_patch_size = cell x patch size) or an image "
                         f"size whose patch grid is a multiple of {cell}")
    return grid_h // cell, grid_w // cell


def _upsample_cells(cells: torch.Tensor, cell: int) -> torch.Tensor:
    """(B, h, w) cell values -> (B, h * cell * w * cell) patch values in raster order."""
    return cells.repeat_interleave(cell, dim=1).repeat_interleave(cell, dim=2).flatten(1)


def simmim_masking(batch_size: int, grid_size: tuple[int, int], cell: int, mask_ratio: float,
                   noise: torch.Tensor | None = None, device: torch.device | str | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """SimMIM's random masking of `cell` x `cell` patch groups (its mask patch size over the ViT patch size):
    ceil(cells * mask_ratio) cells per image are masked, those with the smallest noise (a uniform random subset, as
    the official permutation draws it). noise: (B, cells) in the cells' raster order. Returns (B, L) float."""
    check_mask_ratio(mask_ratio)
    cells_h, cells_w = check_cell_size(grid_size, cell, "SimMIM masking")
    num_cells = cells_h * cells_w
    if noise is None:
        noise = torch.rand(batch_size, num_cells, device=device, generator=generator)
    elif noise.shape != (batch_size, num_cells):
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected ({batch_size}, {num_cells})")
    num_masked = math.ceil(num_cells * mask_ratio)
    rank = torch.argsort(torch.argsort(noise, dim=1), dim=1)
    cells = (rank < num_masked).float().view(batch_size, cells_h, cells_w)
    return _upsample_cells(cells, cell)


def checkerboard_mask(grid_size: tuple[int, int], cell: int = 1, phase: int = 0,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """SymMIM's fixed checkerboard: M(i, j) = (i // cell + j // cell + phase) mod 2 over the patch grid, (L,) float,
    built on `device` (a copy from the host would wait for the device). cell 1 is the small-scale mask M1, cell k the
    large-scale M2."""
    check_cell_size(grid_size, cell, "checkerboard mask")
    rows, cols = torch.meshgrid(torch.arange(grid_size[0], device=device), torch.arange(grid_size[1], device=device),
                                indexing="ij")
    return ((rows // cell + cols // cell + phase) % 2).float().flatten()


def checkerboard_masking(batch_size: int, grid_size: tuple[int, int], cell: int = 1,
                         phase: torch.Tensor | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """The checkerboard for a batch, (B, L). `phase` (B,) of 0 / 1 flips each image's mask to its complement where
    1 (SymMIM's `mask_phase="random"`); None keeps the formula's fixed phase for every image."""
    mask = checkerboard_mask(grid_size, cell, device=device).expand(batch_size, -1)
    if phase is None:
        return mask
    if phase.shape != (batch_size,):
        raise ValueError(f"phase has shape {tuple(phase.shape)}, expected ({batch_size},)")
    flip = phase.to(mask.dtype).unsqueeze(1)
    return mask + flip - 2.0 * mask * flip


def gather_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tokens (B, L, D), index (B, K) -> (B, K, D)."""
    return torch.gather(tokens, 1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def block_mask(grid_h: int, grid_w: int, num_masked: int, min_block: int = 16, max_block: int | None = None,
               min_aspect: float = 0.3, max_aspect: float | None = None, exact: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """BEiT block-wise masking of one image, (grid_h * grid_w,) float with 1 = masked.

    Rectangles of area U(min_block, remaining budget) and log-uniform aspect ratio are added, counting only new
    patches, until `num_masked` is reached or ten draws in a row add nothing (BEiT then stops short). With
    `exact=True` the shortfall is filled with random unmasked patches so that exactly `num_masked` are masked.
    """
    if not 0 < num_masked <= grid_h * grid_w:
        raise ValueError(f"num_masked must be in [1, {grid_h * grid_w}], got {num_masked}")
    max_block = num_masked if max_block is None else max_block
    max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
    log_aspect = (math.log(min_aspect), math.log(max_aspect))

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * torch.rand((), generator=generator).item()

    def randint(high: int) -> int:  # in [0, high]
        return int(torch.randint(0, high + 1, (), generator=generator).item())

    mask = torch.zeros(grid_h, grid_w)
    count = 0
    while count < num_masked:
        budget = min(num_masked - count, max_block)
        added = 0
        for _ in range(10):
            area = uniform(min_block, budget)
            aspect = math.exp(uniform(*log_aspect))
            height = int(round(math.sqrt(area * aspect)))
            width = int(round(math.sqrt(area / aspect)))
            if width < grid_w and height < grid_h:
                top, left = randint(grid_h - height), randint(grid_w - width)
                window = mask[top:top + height, left:left + width]
                new = height * width - int(window.sum().item())
                if 0 < new <= budget:
                    window.fill_(1.0)
                    added = new
                    break
        if added == 0:
            break
        count += added
    mask = mask.flatten()
    if exact and count < num_masked:
        free = torch.nonzero(mask == 0).flatten()
        pick = free[torch.randperm(free.numel(), generator=generator)[: num_masked - count]]
        mask[pick] = 1.0
    return mask


def block_masking(batch_size: int, grid_size: tuple[int, int], num_masked: int, exact: bool = False,
                  generator: torch.Generator | None = None, **kwargs: float) -> torch.Tensor:
    """Independent BEiT block masks for a batch, (B, L). Drawn on the CPU (it is a sequential loop)."""
    return torch.stack([block_mask(*grid_size, num_masked, exact=exact, generator=generator, **kwargs)
                        for _ in range(batch_size)])


class PairedMask(NamedTuple):
    """LUT's two disjoint random masks from one permutation. View 1 keeps `keep_idx1` = shuffle[:, :K] and view 2
    keeps `keep_idx2` = shuffle[:, K:2K]; `restore_idx` unshuffles view 1 (the only decoded view)."""

    keep_idx1: torch.Tensor
    keep_idx2: torch.Tensor
    mask1: torch.Tensor
    mask2: torch.Tensor
    restore_idx: torch.Tensor
    shuffle_idx: torch.Tensor


def check_paired_mask_ratio(mask_ratio: float) -> None:
    check_mask_ratio(mask_ratio)
    if mask_ratio < 0.5:
        raise ValueError(f"paired disjoint masking needs mask_ratio >= 0.5 so that the two views' kept sets (each "
                         f"L * (1 - mask_ratio) patches) fit disjointly in the L patches; got {mask_ratio}")


def paired_disjoint_masking(batch_size: int, num_patches: int, mask_ratio: float, noise: torch.Tensor | None = None,
                            device: torch.device | str | None = None,
                            generator: torch.Generator | None = None) -> PairedMask:
    """Two masks from one noise draw whose kept sets (K = int(L * (1 - mask_ratio)) patches each) are disjoint.

    View 1's mask is exactly `random_masking`'s for the same noise.
    """
    check_paired_mask_ratio(mask_ratio)
    first = random_masking(batch_size, num_patches, mask_ratio, noise=noise, device=device, generator=generator)
    num_keep = first.keep_idx.shape[1]
    keep_idx2 = first.shuffle_idx[:, num_keep:2 * num_keep]
    mask2 = torch.ones_like(first.mask).scatter_(1, keep_idx2, 0.0)
    return PairedMask(first.keep_idx, keep_idx2, first.mask, mask2, first.restore_idx, first.shuffle_idx)


def permutation_ranks(batch_size: int, num_patches: int, num_prefix_tokens: int = 1,
                      noise: torch.Tensor | None = None, device: torch.device | str | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """XLNet / MaPeT factorisation order as ranks, (B, prefix + L) int64: token t is the r(t)-th of the order.
    Prefix tokens (cls) come first (ranks 0..prefix-1); the patches follow in the order of their `noise` (B, L)
    (uniform noise: a uniform random permutation), drawn on `device` when not given."""
    if noise is None:
        noise = torch.rand(batch_size, num_patches, device=device, generator=generator)
    elif noise.shape != (batch_size, num_patches):
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected ({batch_size}, {num_patches})")
    patch_ranks = torch.argsort(torch.argsort(noise, dim=1), dim=1) + num_prefix_tokens
    prefix = torch.arange(num_prefix_tokens, device=noise.device).expand(batch_size, -1)
    return torch.cat([prefix, patch_ranks], dim=1)


def check_permutation_ranks(ranks: torch.Tensor, batch_size: int, num_tokens: int,
                            num_prefix_tokens: int = 1) -> None:
    """Refuse `ranks` that are not a factorisation order: (B, N) integers, each row a permutation of 0..N-1 with the
    prefix tokens (cls) first, at ranks 0..prefix-1. Reads the ranks on the host (a device sync): for ranks given
    from outside (tests, debugging), never for the draws of `permutation_ranks`, which are valid by construction."""
    prefix_first = (f" with the prefix token(s) at ranks 0..{num_prefix_tokens - 1} in columns "
                    f"0..{num_prefix_tokens - 1}" if num_prefix_tokens else "")
    valid = (f"a valid draw is one permutation of 0..{num_tokens - 1} per row{prefix_first}, e.g. "
             f"masking.permutation_ranks({batch_size}, {num_tokens - num_prefix_tokens}, {num_prefix_tokens})")
    if ranks.shape != (batch_size, num_tokens) or ranks.is_floating_point() or ranks.is_complex():
        raise ValueError(f"ranks must be an integer tensor of shape ({batch_size}, {num_tokens}) (batch, prefix + "
                         f"patches), got {ranks.dtype} of shape {tuple(ranks.shape)}: {valid}")
    rows = ranks.detach().long().cpu()
    expected = torch.arange(num_tokens)
    for row, values in enumerate(rows):
        in_range = (values >= 0) & (values < num_tokens)
        counts = torch.bincount(values[in_range], minlength=num_tokens)
        out_of_range = values[~in_range].tolist()
        duplicates, missing = expected[counts > 1].tolist(), expected[counts == 0].tolist()
        if out_of_range or duplicates or missing:
            found = "; ".join(f"{what} {items}" for what, items in (("out of range", out_of_range),
                              ("duplicated", duplicates), ("missing", missing)) if items)
            raise ValueError(f"ranks row {row} is not a permutation of 0..{num_tokens - 1}: {found}; {valid}")
        if not torch.equal(values[:num_prefix_tokens], expected[:num_prefix_tokens]):
            raise ValueError(f"ranks row {row} gives the prefix (cls) token(s) ranks "
                             f"{values[:num_prefix_tokens].tolist()}: the cls token must come first (it is always "
                             f"context); {valid}")


class TwoStreamLayout(NamedTuple):
    """MaPeT's split of a token sequence by ranks. `predicted_idx` (B, K): token indices (prefix included) with
    rank >= num_context, in raster order; `content_mask` (B, N + K, N + K) and `query_mask` (B, K, N + K): bool,
    True = may attend, over keys = the N real tokens then the K mask tokens of `predicted_idx`."""

    predicted_idx: torch.Tensor
    content_mask: torch.Tensor
    query_mask: torch.Tensor

    def joint_attention_mask(self) -> torch.Tensor:
        """(B, 1, T, T) bool over one joint sequence [N real tokens, K mask tokens, K query tokens], T = N + 2K:
        content rows and query rows attend keys of the content stream only (query tokens are never keys), so one
        fused attention call per block runs both streams with every weight shared."""
        batch, num_queries = self.query_mask.shape[:2]
        rows = torch.cat([self.content_mask, self.query_mask], dim=1)
        never_keys = rows.new_zeros(batch, rows.shape[1], num_queries)
        return torch.cat([rows, never_keys], dim=2)[:, None]


def two_stream_layout(ranks: torch.Tensor, num_context: int) -> TwoStreamLayout:
    """The attention rule of two-stream permuted prediction (MPNet / MaPeT), built on the device from ranks (B, N).

    Every query slot q has a horizon e_q: it may attend a real token j iff r(j) <= e_q and the mask token of a
    predicted token k iff r(k) > e_q. Content rows: a context token or an appended mask token has e = num_context - 1
    (the whole context and every mask token), a predicted token e = r(i) (itself and what precedes it, and the mask
    tokens of later ones); query rows: the query of predicted token k has e = r(k) - 1 (what strictly precedes it,
    its own mask token and later ones)."""
    batch, num_tokens = ranks.shape
    if not 1 <= num_context < num_tokens:
        raise ValueError(f"num_context must lie in [1, {num_tokens - 1}] for {num_tokens} tokens, got {num_context}")
    position = torch.arange(num_tokens, device=ranks.device)
    predicted = ranks >= num_context
    raster_first = torch.where(predicted, position, position + num_tokens)  # predicted tokens first, in raster order
    predicted_idx = torch.argsort(raster_first, dim=1)[:, :num_tokens - num_context]
    predicted_ranks = torch.gather(ranks, 1, predicted_idx)
    key_ranks = torch.cat([ranks, predicted_ranks], dim=1)[:, None, :]
    is_mask_key = (torch.arange(key_ranks.shape[-1], device=ranks.device) >= num_tokens)[None, None, :]

    def attends(horizon: torch.Tensor) -> torch.Tensor:
        horizon = horizon[:, :, None]
        return torch.where(is_mask_key, key_ranks > horizon, key_ranks <= horizon)

    context_horizon = torch.full_like(predicted_ranks, num_context - 1)
    content = attends(torch.cat([ranks.clamp_min(num_context - 1), context_horizon], dim=1))
    return TwoStreamLayout(predicted_idx, content, attends(predicted_ranks - 1))
