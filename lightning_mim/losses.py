"""Losses as pure functions. Targets and reductions run in float32, also under bf16/fp16 autocast."""
from __future__ import annotations

import torch


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MAE's norm_pix target: per-patch (x - mean) / sqrt(var + eps), with the unbiased variance over the patch."""
    patches = patches.float()
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked patches (mask = 1) of the per-patch mean squared error. pred/target (B, L, P), mask (B, L)."""
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)
    mask = mask.float()
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


def byol_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over samples of 2 - 2 cos(prediction, target) (BYOL's normalised MSE), in [0, 4]; the target is
    detached. prediction/target (N, D)."""
    prediction = torch.nn.functional.normalize(prediction.float(), dim=-1)
    target = torch.nn.functional.normalize(target.detach().float(), dim=-1)
    return (2.0 - 2.0 * (prediction * target).sum(dim=-1)).mean()
