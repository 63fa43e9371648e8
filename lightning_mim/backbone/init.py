"""Weight initialisations of the shared ViT (the `init` choice of `BackboneConfig`)."""
from __future__ import annotations

import math

import torch.nn as nn


def reset_layer_norm(norm: nn.LayerNorm) -> None:
    """LayerNorm at (1, 0), where it has weights."""
    if norm.weight is not None:
        nn.init.ones_(norm.weight)
    if norm.bias is not None:
        nn.init.zeros_(norm.bias)


def init_mae_weights(module: nn.Module) -> None:
    """MAE's initialisation: xavier-uniform on every Linear (fused qkv as one matrix), zero biases, LayerNorm (1, 0),
    the patch projection xavier-uniform on its flattened (D, C*p*p) view, and N(0, .02) for the cls token."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.xavier_uniform_(sub.weight)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.LayerNorm):
            reset_layer_norm(sub)
    patch_embed = getattr(module, "patch_embed", None)
    if patch_embed is not None:
        weight = patch_embed.proj.weight
        nn.init.xavier_uniform_(weight.data.view(weight.shape[0], -1))
        if patch_embed.proj.bias is not None:
            nn.init.zeros_(patch_embed.proj.bias)
    cls_token = getattr(module, "cls_token", None)
    if cls_token is not None:
        nn.init.normal_(cls_token, std=0.02)


def init_clipped_normal_weights(module: nn.Module, std: float = 0.02) -> None:
    """MAE-pytorch's init (Beyond Masking's trap 13): every Linear weight N(0, std) truncated at +-std (its own
    `trunc_normal_` passes the bounds as absolute values; empirical std about 0.54 x std), zero biases, LayerNorm
    (1, 0). Convolutions (the patch projection) keep their PyTorch default init."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.trunc_normal_(sub.weight, std=std, a=-std, b=std)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.LayerNorm):
            reset_layer_norm(sub)


def depth_rescale_factors(depth: int) -> list[float]:
    """BEiT / SimMIM `fix_init_weight`: block i (0-based) has layer_id i + 1 and its output projections are divided
    by sqrt(2 layer_id)."""
    return [math.sqrt(2.0 * (index + 1)) for index in range(depth)]


def init_simmim_weights(vit: nn.Module, std: float = 0.02) -> None:
    """microsoft/SimMIM's ViT initialisation (`VisionTransformerForSimMIM`, whose `_trunc_normal_` clips at +-std
    in absolute terms): every Linear and Conv2d weight (the patch projection too) and the cls token and a trainable
    absolute position embedding N(0, std) truncated at +-std, zero biases, LayerNorm (1, 0); then the attention
    output projection and the MLP's second linear of each block divided by `depth_rescale_factors`. LayerScale and
    relative-position tables keep their own init (the value, zeros)."""
    for sub in vit.modules():
        if isinstance(sub, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(sub.weight, std=std, a=-std, b=std)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.LayerNorm):
            reset_layer_norm(sub)
    for token in (getattr(vit, "cls_token", None), getattr(vit, "pos_embed", None)):
        if token is not None and token.requires_grad:
            nn.init.trunc_normal_(token, std=std, a=-std, b=std)
    for block, factor in zip(vit.blocks, depth_rescale_factors(len(vit.blocks))):
        block.attn.proj.weight.data.div_(factor)
        block.mlp.fc2.weight.data.div_(factor)


__all__ = ["depth_rescale_factors", "init_clipped_normal_weights", "init_mae_weights", "init_simmim_weights",
           "reset_layer_norm"]
