"""Representation analyses of a frozen encoder, as pure functions: the singular-value spectrum of its features (with
the effective rank) and, per layer and head, the mean attention distance and the attention entropy.

The attention maps are the backbone's own: `capture_attention` runs timm's attention layers on their unfused path
(`fused_attn = False`, the same projections, norms, scale and masks) and records the softmax probabilities with a
forward hook on each layer's `attn_drop`, which receives them in timm's code.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn
from torch import Tensor


@dataclass
class Spectrum:
    """Singular values of the centred feature matrix, largest first, and what summarises them.

    `normalised_log`: log(s_i / s_1). `effective_rank`: exp(H) with H the entropy of p_i = s_i / sum(s) (Roy and
    Vetterli 2007), between 1 (one direction) and D (a flat spectrum). `above_threshold`: how many s_i / s_1 exceed
    `threshold`."""

    singular_values: Tensor
    threshold: float

    @property
    def normalised_log(self) -> Tensor:
        return torch.log(self.singular_values / self.singular_values[0])

    @property
    def entropy(self) -> float:
        p = self.singular_values / self.singular_values.sum()
        p = p[p > 0]
        return float(-(p * p.log()).sum())

    @property
    def effective_rank(self) -> float:
        return math.exp(self.entropy)

    @property
    def above_threshold(self) -> int:
        return int((self.singular_values / self.singular_values[0] > self.threshold).sum())


def feature_spectrum(features: Tensor, threshold: float = 1e-2) -> Spectrum:
    """The spectrum of (N, D) features after subtracting their mean, in float64."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"feature_spectrum needs an (N, D) matrix with N >= 2, got shape {tuple(features.shape)}")
    centred = features.double() - features.double().mean(dim=0, keepdim=True)
    return Spectrum(torch.linalg.svdvals(centred), threshold)


def patch_distances(grid_size: tuple[int, int], patch_size: int) -> Tensor:
    """(L, L) Euclidean distances in pixels between the centres of the patches of a raster-ordered grid."""
    rows, cols = torch.meshgrid(torch.arange(grid_size[0]), torch.arange(grid_size[1]), indexing="ij")
    centres = torch.stack([rows.flatten(), cols.flatten()], dim=1).double() * patch_size
    return torch.cdist(centres, centres)


def attention_distance(attention: Tensor, grid_size: tuple[int, int], patch_size: int,
                       prefix_tokens: int = 0) -> Tensor:
    """Mean attention distance per head, in pixels: for each patch query, the distance to each patch key weighted by
    its attention, averaged over queries and samples. `attention` is (B, heads, N, N) with `prefix_tokens` (the cls
    token) first; prefix queries are left out, and prefix keys too, the weights being renormalised over the patches
    (a cls token has no position). Returns (heads,)."""
    patches = attention[:, :, prefix_tokens:, prefix_tokens:].double()
    patches = patches / patches.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    distances = patch_distances(grid_size, patch_size).to(patches.device)
    return (patches * distances).sum(dim=-1).mean(dim=(0, 2))


def attention_entropy(attention: Tensor, prefix_tokens: int = 0) -> Tensor:
    """Mean entropy (nats) of each patch query's attention over every key (prefix keys included), averaged over
    queries and samples. Returns (heads,)."""
    probabilities = attention[:, :, prefix_tokens:].double()
    terms = torch.where(probabilities > 0, probabilities * probabilities.clamp_min(1e-300).log(), 0.0)
    return -terms.sum(dim=-1).mean(dim=(0, 2))


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """The timm attention layers of `model` in forward order (modules with `qkv`, `attn_drop` and `fused_attn`)."""
    return [module for module in model.modules()
            if hasattr(module, "qkv") and hasattr(module, "attn_drop") and hasattr(module, "fused_attn")]


@contextmanager
def capture_attention(model: nn.Module) -> Iterator[list[Tensor]]:
    """Within the block, every forward of `model` appends each attention layer's probabilities (B, heads, N, N) to
    the yielded list, in layer order. The layers run unfused meanwhile and are restored afterwards."""
    layers = attention_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no timm attention layers to analyse")
    maps: list[Tensor] = []
    fused = [layer.fused_attn for layer in layers]
    handles = [layer.attn_drop.register_forward_hook(lambda _module, _inputs, output: maps.append(output.detach()))
               for layer in layers]
    for layer in layers:
        layer.fused_attn = False
    try:
        yield maps
    finally:
        for layer, was_fused, handle in zip(layers, fused, handles):
            layer.fused_attn = was_fused
            handle.remove()


__all__ = ["Spectrum", "attention_distance", "attention_entropy", "attention_layers", "capture_attention",
           "feature_spectrum", "patch_distances"]
