"""The timm `Beit` that holds the same encoder as a MIMViT with a relative position bias, and the conversion of the
MIMViT state dict (timm VisionTransformer keys) to Beit's keys.

The two differ only in names: MIMViT's fused `attn.qkv.bias` (q, 0, v) is Beit's `attn.q_bias` / `attn.v_bias`,
LayerScale `ls1.gamma` / `ls2.gamma` is `gamma_1` / `gamma_2`; the relative position tables already have Beit's keys
(`rel_pos`). Loading the other way (Beit or official BEiT / SimMIM checkpoints into MIMViT) is `eval.weights`.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
import torch.nn as nn
from timm.models.beit import Beit

from lightning_mim.backbone.vit import VIT_SIZES, BackboneConfig

_QKV_BIAS = re.compile(r"^(blocks\.\d+\.attn)\.qkv\.bias$")
_LAYER_SCALE = re.compile(r"^(blocks\.\d+)\.ls([12])\.gamma$")
SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"


def beit_kwargs(config: BackboneConfig, rel_pos_bias: str | None = None) -> dict[str, Any]:
    """Keyword arguments of timm's `Beit` with the encoder of `config` (no classifier); `rel_pos_bias` "shared" or
    "per_block" overrides the config's (fine-tuning switches SimMIM's shared table to one per block)."""
    mode = rel_pos_bias or config.rel_pos_bias
    if config.rel_pos_bias == "none" or mode not in ("shared", "per_block"):
        raise ValueError(f"timm's Beit holds an encoder with a relative position bias: the backbone has rel_pos_bias "
                         f"{config.rel_pos_bias!r} and {mode!r} was asked for; use timm's VisionTransformer instead")
    extra = dict(config.timm_kwargs)
    init_values = extra.pop("init_values", None)
    if extra:
        raise ValueError(f"backbone.timm_kwargs {sorted(extra)} have no counterpart in timm's Beit: only init_values")
    width, depth, heads = VIT_SIZES[config.size]
    return dict(img_size=config.img_size, patch_size=config.patch_size, in_chans=config.in_chans, num_classes=0,
                global_pool="", embed_dim=width, depth=depth, num_heads=heads, mlp_ratio=4.0, qkv_bias=True,
                drop_path_rate=config.drop_path_rate, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                init_values=init_values, use_abs_pos_emb=config.pos_embed != "none",
                use_rel_pos_bias=mode == "per_block", use_shared_rel_pos_bias=mode == "shared")


def build_timm_beit(config: BackboneConfig, rel_pos_bias: str | None = None, **overrides: Any) -> Beit:
    """timm's `Beit` for `config` (see `beit_kwargs`), with keyword overrides (num_classes, global_pool, ...)."""
    return Beit(**(beit_kwargs(config, rel_pos_bias) | overrides))


def to_beit_state(state: Mapping[str, torch.Tensor], config: BackboneConfig, rel_pos_bias: str | None = None
                  ) -> dict[str, torch.Tensor]:
    """A state dict of the MIMViT of `config` in timm Beit's keys. With `rel_pos_bias` "per_block" for a "shared"
    backbone, its table is copied to every block (microsoft/SimMIM and BEiT do so when fine-tuning starts)."""
    rel_pos_bias = rel_pos_bias or config.rel_pos_bias
    depth = VIT_SIZES[config.size][1]
    converted: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if match := _QKV_BIAS.match(key):
            q_bias, k_bias, v_bias = value.chunk(3)
            if torch.count_nonzero(k_bias):
                raise ValueError(f"{key}: the key bias is not zero, and timm's Beit has none: only a backbone with "
                                 "qkv_bias 'qv' exports to Beit")
            converted[f"{match.group(1)}.q_bias"], converted[f"{match.group(1)}.v_bias"] = q_bias, v_bias
        elif match := _LAYER_SCALE.match(key):
            converted[f"{match.group(1)}.gamma_{match.group(2)}"] = value
        elif key == SHARED_TABLE and rel_pos_bias == "per_block":
            converted |= {f"blocks.{index}.attn.relative_position_bias_table": value.clone() for index in range(depth)}
        else:
            converted[key] = value
    if rel_pos_bias == "shared" and any(key.endswith("attn.relative_position_bias_table") for key in converted):
        raise ValueError("per-block relative position tables cannot become one shared table: use rel_pos_bias "
                         "'per_block'")
    return converted


__all__ = ["SHARED_TABLE", "beit_kwargs", "build_timm_beit", "to_beit_state"]
