"""Loading pre-trained encoder weights into timm ViTs, with every dropped, renamed, missing and unexpected key reported.

Layouts read:

- this project's Lightning checkpoints: `state_dict` with the student encoder under `backbone.*`; every other entry
  (a LUT teacher under `teacher.backbone.*`, decoders, projectors, predictors, mask tokens) is dropped by rule;
- MAE / LUT official checkpoints `{"model": state}`, keys optionally prefixed `module.`, `base_encoder.`, `backbone.`
  or `ema.` (Beyond Masking: `encoder.`);
- BEiT / Beyond-Masking / SimMIM / timm `Beit` attention biases: separate `attn.q_bias` / `attn.v_bias` (no k bias)
  fused into timm's `attn.qkv.bias` = (q, 0, v); layer scale `gamma_1` / `gamma_2` renamed to `ls1.gamma` /
  `ls2.gamma`; relative position tables (`rel_pos_bias.*` shared, `blocks.<i>.attn.relative_position_bias_table`)
  kept under their own keys when the target backbone has `rel_pos_bias`, their index buffers dropped;
- MaPeT (`{"state_dict": state}` of timm's train script): separate `attn.q` and `attn.kv` linears fused into
  `attn.qkv` = cat(q, kv); `mask_positional_token` and the `decoder.*` token head are dropped.

Files are read with `torch.load(..., weights_only=True)` or safetensors only, so a pickle cannot run code
(`encoder_files`, whose functions this module re-exports).
`load_into` never loads with a silent `strict=False`: leftover unexpected keys, or missing keys not explicitly allowed,
raise.

    lightning-mim export runs/.../last.ckpt encoder.safetensors
"""
from __future__ import annotations

import argparse
import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from lightning_mim.backbone import BackboneConfig
from lightning_mim.backbone.rel_pos import num_relative_entries
from lightning_mim.backbone.timm_beit import SHARED_TABLE, to_beit_state
from lightning_mim.eval.encoder_files import (
    backbone_config_of, config_hash, pretraining_identity, read_checkpoint, safetensors_metadata, save_encoder,
)

StateDict = dict[str, torch.Tensor]

# Official checkpoints: prefixes stripped from every key (DDP wrapper, MoCo-style wrappers, EMA copies, Beyond
# Masking's pre-training model).
OFFICIAL_PREFIXES = ("module.", "base_encoder.", "backbone.", "ema.", "encoder.")
# Official checkpoints: keys dropped by rule, pattern -> reason. The LUT projector is named `head` in the official
# code; its exact keys are listed so that a classifier `head.weight` / `head.bias` is never dropped silently.
OFFICIAL_DROP_RULES: dict[str, str] = {
    "decoder_*": "MAE/LUT decoder",
    "decoder.*": "decoder (Beyond Masking pixel decoder, MaPeT token head)",
    "encoder_to_decoder.*": "Beyond Masking decoder input projection",
    "mask_token": "pre-training mask token",
    "mask_positional_token": "MaPeT mask token",
    "head.0.weight": "LUT projector",
    "head.1.*": "LUT projector BatchNorm",
    "head.3.weight": "LUT projector",
    "predictor.*": "LUT predictor",
    "lm_head.*": "BEiT masked-token head",
    "*relative_position_index": "relative position index buffer (recomputed from the patch grid)",
}
GLOBAL_POOL_DROP_RULES = {"norm.*": "final norm, replaced by fc_norm under global average pooling"}
_BEIT_QV_BIAS = re.compile(r"^(blocks\.\d+\.attn)\.(q_bias|v_bias)$")
_MAPET_Q_KV = re.compile(r"^(blocks\.\d+\.attn)\.(q|kv)\.(weight|bias)$")
_BEIT_GAMMA = re.compile(r"^(blocks\.\d+)\.gamma_([12])$")
_TIMM_GAMMA = re.compile(r"^blocks\.\d+\.ls[12]\.gamma$")
_REL_POS = re.compile(r"(^rel_pos_bias\.|relative_position_bias_table$)")


@dataclass
class LoadReport:
    """What `load_encoder_state` did: the detected layout and, per key, how it was handled."""

    layout: str
    dropped: dict[str, str] = field(default_factory=dict)
    renamed: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"layout {self.layout}: {len(self.renamed)} renamed, {len(self.dropped)} dropped by rule, "
                 f"{len(self.missing)} missing, {len(self.unexpected)} unexpected"]
        lines += [f"  dropped {key} ({reason})" for key, reason in sorted(self.dropped.items())]
        lines += [f"  renamed {old} -> {new}" for old, new in sorted(self.renamed.items())]
        lines += [f"  missing {key}" for key in self.missing]
        lines += [f"  unexpected {key}" for key in self.unexpected]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in patterns)


def _expected_state(config: BackboneConfig, global_pool: bool, num_classes: int = 0) -> StateDict:
    """The target's keys and shapes (meta tensors): timm's VisionTransformer plus the relative position tables of a
    MIMViT with `rel_pos_bias`, under their MIMViT keys."""
    with torch.device("meta"):
        model = VisionTransformer(**(config.timm_kwargs_full() | {"global_pool": "avg" if global_pool else "",
                                                                  "num_classes": num_classes}))
        state = model.state_dict()
        shape = (num_relative_entries(model.patch_embed.grid_size), model.blocks[0].attn.num_heads)
        if config.rel_pos_bias == "shared":
            state[SHARED_TABLE] = torch.empty(shape)
        elif config.rel_pos_bias == "per_block":
            state |= {f"blocks.{index}.attn.relative_position_bias_table": torch.empty(shape)
                      for index in range(len(model.blocks))}
    return state


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in OFFICIAL_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def _is_lightning(raw: Mapping[str, Any]) -> bool:
    state = raw.get("state_dict")
    return isinstance(state, Mapping) and any(str(key).startswith("backbone.") for key in state)


def _from_lightning(state: Mapping[str, torch.Tensor], report: LoadReport) -> StateDict:
    # The project's contract: the student encoder is the method's `backbone`; everything else is not the encoder.
    encoder: StateDict = {}
    for key, value in state.items():
        if key.startswith("backbone."):
            encoder[key[len("backbone."):]] = value
        else:
            report.dropped[key] = f"{key.split('.')[0]} (not the student encoder)"
    return encoder


def _fuse(parts: dict[str, dict[str, torch.Tensor]], needed: tuple[str, ...],
          fuse: Callable[..., torch.Tensor]) -> StateDict:
    fused: StateDict = {}
    for target, found in parts.items():
        if set(found) != set(needed):
            raise ValueError(f"{target}: found {sorted(found)} but {list(needed)} are needed to build it")
        fused[target] = fuse(*(found[name] for name in needed))
    return fused


def _from_official(state: Mapping[str, torch.Tensor], report: LoadReport, global_pool: bool,
                   has_layer_scale: bool, has_rel_pos: bool) -> StateDict:
    rules = OFFICIAL_DROP_RULES | (GLOBAL_POOL_DROP_RULES if global_pool else {})
    encoder: StateDict = {}
    qv_bias: dict[str, dict[str, torch.Tensor]] = {}
    q_kv: dict[str, dict[str, torch.Tensor]] = {}
    for original, value in state.items():
        key = _strip_prefixes(original)
        reason = next((why for pattern, why in rules.items() if fnmatch.fnmatchcase(key, pattern)), None)
        if reason is not None:
            report.dropped[original] = reason
            continue
        if match := _BEIT_QV_BIAS.match(key):
            qv_bias.setdefault(f"{match.group(1)}.qkv.bias", {})[match.group(2)] = value
            report.renamed[original] = f"{match.group(1)}.qkv.bias"
            continue
        if match := _MAPET_Q_KV.match(key):
            target = f"{match.group(1)}.qkv.{match.group(3)}"
            q_kv.setdefault(target, {})[match.group(2)] = value
            report.renamed[original] = target
            continue
        if match := _BEIT_GAMMA.match(key):
            key = f"{match.group(1)}.ls{match.group(2)}.gamma"
        if _TIMM_GAMMA.match(key) and not has_layer_scale:
            report.unexpected.append(original)
            report.notes.append(f"{original}: layer scale in the checkpoint but the target ViT has none (set "
                                "backbone.timm_kwargs.init_values)")
            continue
        if _REL_POS.search(key) and not has_rel_pos:
            report.unexpected.append(original)
            report.notes.append(f"{original}: relative position bias in the checkpoint but the target ViT has none "
                                "(set backbone.rel_pos_bias and qkv_bias: qv)")
            continue
        if key != original:
            report.renamed[original] = key
        encoder[key] = value
    # BEiT has no key bias: timm's fused bias is (q, 0, v). MaPeT's kv linear holds k then v: cat(q, kv) is q, k, v.
    encoder |= _fuse(qv_bias, ("q_bias", "v_bias"), lambda q, v: torch.cat([q, torch.zeros_like(q), v]))
    encoder |= _fuse(q_kv, ("q", "kv"), lambda q, kv: torch.cat([q, kv]))
    return encoder


def _check_shapes(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    wrong = [f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(expected[key].shape)}"
             for key, value in state.items() if key in expected and tuple(value.shape) != tuple(expected[key].shape)]
    if wrong:
        raise ValueError(f"{len(wrong)} shape mismatches, e.g. " + "; ".join(wrong[:3]) + " (the checkpoint was "
                         "trained with another backbone size, img_size, patch_size or in_chans than the model)")


def load_encoder_state(path_or_state: str | Path | Mapping[str, Any], config: BackboneConfig, *,
                       global_pool: bool = False, num_classes: int = 0) -> tuple[StateDict, LoadReport]:
    """The encoder weights of a checkpoint in timm `VisionTransformer` key names (plus the relative position
    tables of a `rel_pos_bias` backbone: MIMViT's state dict), and a report of every key.

    `config` is the target encoder. `global_pool=True` targets timm's `global_pool="avg"` model: the pretrained
    final `norm.*` is dropped and the new `fc_norm.*` shows up as missing. `num_classes > 0` targets a classifier
    with its `head.*` (a released fine-tuned model, e.g. MaPeT's `vit_standard_*`). Missing and unexpected keys are
    reported, not raised (see `load_into`); a shape mismatch raises naming both shapes.
    """
    raw = read_checkpoint(path_or_state) if isinstance(path_or_state, (str, Path)) else dict(path_or_state)
    expected = _expected_state(config, global_pool, num_classes)
    if _is_lightning(raw):
        report = LoadReport("lightning")
        state = _from_lightning(raw["state_dict"], report)
        if global_pool:
            for key in [k for k in state if _matches(k, GLOBAL_POOL_DROP_RULES)]:
                report.dropped[f"backbone.{key}"] = GLOBAL_POOL_DROP_RULES["norm.*"]
                del state[key]
    else:
        nested = next((name for name in ("model", "state_dict") if isinstance(raw.get(name), Mapping)), None)
        report = LoadReport(f"official:{nested}" if nested else "state_dict")
        state = _from_official(raw[nested] if nested else raw, report, global_pool,
                               has_layer_scale="blocks.0.ls1.gamma" in expected,
                               has_rel_pos=config.rel_pos_bias != "none")
    non_tensors = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if non_tensors:
        raise ValueError(f"not a state dict: entries {non_tensors[:5]} are not tensors")
    _check_shapes(state, expected)
    report.missing = [key for key in expected if key not in state]
    report.unexpected += [key for key in state if key not in expected]
    return state, report


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], report: LoadReport | None = None,
              allow_missing: Iterable[str] = ()) -> LoadReport:
    """Copy `state` into `model`, checked against the model itself.

    Raises if the report or the model shows unexpected keys, or missing keys that match none of the `allow_missing`
    patterns (fnmatch, e.g. `head.*` for a new classifier). Returns the report with the model's missing keys.
    """
    report = report or LoadReport("state_dict")
    allow_missing = tuple(allow_missing)
    target = model.state_dict()
    _check_shapes(state, target)
    missing = [key for key in target if key not in state]
    unexpected = sorted(set(report.unexpected) | {key for key in state if key not in target})
    not_allowed = [key for key in missing if not _matches(key, allow_missing)]
    if unexpected or not_allowed:
        raise ValueError(f"cannot load the encoder into {type(model).__name__}: unexpected keys {unexpected}, "
                         f"missing keys {not_allowed} (allowed missing: {list(allow_missing)})\n{report.summary()}")
    model.load_state_dict(dict(state), strict=False)
    report.missing = missing
    return report


def export_encoder(checkpoint_path: str | Path, output_path: str | Path) -> Path:
    """Write the student encoder of a Lightning checkpoint as a safetensors file that loads with `strict=True` into
    `timm.models.vision_transformer.VisionTransformer(**config.timm_kwargs_full())` (and, for registered sizes, into
    `timm.create_model(timm_model_name(config), num_classes=0)`), or, for a backbone with `rel_pos_bias`, into
    timm's `Beit` (`backbone.timm_beit.build_timm_beit(config)`). The metadata keeps the checkpoint's method, config
    hash and run, so both files are one pre-training in `lightning-mim evaluate`'s results."""
    config = backbone_config_of(checkpoint_path)
    state, report = load_encoder_state(checkpoint_path, config)
    if report.missing or report.unexpected:
        raise ValueError(f"{checkpoint_path}: the encoder does not match its own config\n{report.summary()}")
    if config.rel_pos_bias != "none":
        state = to_beit_state(state, config)
    return save_encoder(state, config, output_path, pretraining_identity(checkpoint_path, config))


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="lightning-mim export", description=export_encoder.__doc__)
    parser.add_argument("checkpoint", help="Lightning checkpoint (.ckpt) of a pre-training run")
    parser.add_argument("output", help="output file, e.g. encoder.safetensors")
    options = parser.parse_args(argv)
    if not options.output.endswith(".safetensors"):
        parser.error("the output file must end in .safetensors")
    path = export_encoder(options.checkpoint, options.output)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return path


__all__ = ["LoadReport", "backbone_config_of", "config_hash", "export_encoder", "load_encoder_state", "load_into",
           "main", "pretraining_identity", "read_checkpoint", "safetensors_metadata", "save_encoder"]
