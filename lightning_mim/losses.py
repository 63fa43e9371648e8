"""Losses as pure functions. Targets and reductions run in float32, also under bf16/fp16 autocast."""
from __future__ import annotations

import torch


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MAE's norm_pix target: per-patch (x - mean) / sqrt(var + eps), with the unbiased variance over the patch."""
    patches = patches.float()
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


def normalize_patches_per_channel(patches: torch.Tensor, channels: int, eps: float = 1e-6) -> torch.Tensor:
    """MAE-pytorch's target (Beyond Masking) on pixels in [0, 1]: each channel of each patch separately,
    (x - mean) / (std + eps), with the unbiased std over the patch's p*p pixels; eps is added to the std, not the
    variance. patches (..., p*p*C) in (row, col, channel) order.

    The statistics are taken after subtracting each patch channel's first pixel, which changes neither x - mean nor
    the std in exact arithmetic but makes a constant patch exactly 0: x - x0 is exactly 0 there, whereas the float32
    mean of equal values can be an ulp off them, and eps = 1e-6 turns that ulp into an error of about 0.03."""
    values = patches.float().unflatten(-1, (-1, channels))
    shifted = values - values[..., :1, :]
    mean = shifted.mean(dim=-2, keepdim=True)
    std = shifted.var(dim=-2, keepdim=True).sqrt()
    return ((shifted - mean) / (std + eps)).flatten(-2)


def denormalize_patches_per_channel(normalized: torch.Tensor, patches: torch.Tensor, channels: int) -> torch.Tensor:
    """Inverse of `normalize_patches_per_channel` (eps left out) with the statistics of `patches` (for display)."""
    values = patches.float().unflatten(-1, (-1, channels))
    mean, std = values.mean(dim=-2, keepdim=True), values.var(dim=-2, keepdim=True).sqrt()
    return (normalized.float().unflatten(-1, (-1, channels)) * std + mean).flatten(-2)


def denormalize_patches(normalized: torch.Tensor, patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Inverse of `normalize_patches` with the statistics of `patches` (to display norm_pix predictions)."""
    patches = patches.float()
    return normalized.float() * (patches.var(dim=-1, keepdim=True) + eps).sqrt() + patches.mean(dim=-1, keepdim=True)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked patches (mask = 1) of the per-patch mean squared error. pred/target (B, L, P), mask (B, L)."""
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)
    mask = mask.float()
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SimMIM's loss: absolute error summed over the pixels and channels of masked patches (mask = 1), divided by
    their count (masked patches x P), i.e. the mean L1 over masked pixels and channels. pred/target (B, L, P)."""
    per_patch = (pred.float() - target.float()).abs().sum(dim=-1)
    mask = mask.float()
    return (per_patch * mask).sum() / (mask.sum() * pred.shape[-1]).clamp_min(1.0)


def info_nce(query: torch.Tensor, keys: torch.Tensor, temperature: float, label_offset: int = 0,
             scale_2tau: bool = False) -> torch.Tensor:
    """MoCo v3's InfoNCE: cross-entropy of the cosine similarities q_i . k_j / temperature, the positive of query i
    being key `label_offset + i` (keys gathered over ranks: offset = rank x local batch). keys are detached.
    `scale_2tau` multiplies by 2 x temperature as MoCo v3's code does. query (..., B, D), keys (..., B_all, D):
    leading dimensions are independent problems (ConMIM's per-image patch contrast), averaged."""
    query = torch.nn.functional.normalize(query.float(), dim=-1)
    keys = torch.nn.functional.normalize(keys.detach().float(), dim=-1)
    logits = query @ keys.transpose(-1, -2) / temperature
    labels = torch.arange(query.shape[-2], device=query.device) + label_offset
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, -2), labels.expand(logits.shape[:-1]).flatten())
    return loss * (2.0 * temperature) if scale_2tau else loss


def byol_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over samples of 2 - 2 cos(prediction, target) (BYOL's normalised MSE), in [0, 4]; the target is
    detached. prediction/target (N, D)."""
    prediction = torch.nn.functional.normalize(prediction.float(), dim=-1)
    target = torch.nn.functional.normalize(target.detach().float(), dim=-1)
    return (2.0 - 2.0 * (prediction * target).sum(dim=-1)).mean()


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """Cross-entropy of token logits (..., V) against integer ids (...), in float32: the plain mean over every
    position, or with `weight` (...) (BEiT: 1 on masked patches) sum(w * ce) / sum(w), a mask of varying size per
    sample without indexing (which would read the count on the host)."""
    per_token = torch.nn.functional.cross_entropy(logits.float().flatten(0, -2), targets.long().flatten(),
                                                  reduction="none").view(targets.shape)
    if weight is None:
        return per_token.mean()
    weight = weight.float()
    return (per_token * weight).sum() / weight.sum().clamp_min(1.0)


@torch.no_grad()
def token_accuracy(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Top-1 accuracy of token logits (..., V) against ids (...), over the positions where `weight` is 1."""
    correct = (logits.argmax(dim=-1) == targets).float()
    if weight is None:
        return correct.mean()
    weight = weight.float()
    return (correct * weight).sum() / weight.sum().clamp_min(1.0)
