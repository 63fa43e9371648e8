"""VQ-KD, BEiT v2's visual tokenizer (`vqkd_encoder_base_decoder_3x768x12_clip`), encoder side only.

Architecture, as the BEiT v2 source defines it (microsoft/unilm beit2 `modeling_vqkd.py`, `modeling_finetune.py`,
`norm_ema_quantizer.py`; read for names and behaviour):
- input [0, 1] images rescaled to [-1, 1] (`process_type='default'`: x * 255 / 127.5 - 1; its `max() <= 1` test is a
  host sync and is dropped: this tokenizer takes [0, 1] images by contract);
- encoder: BEiT's ViT-B/16 with absolute position embeddings and a cls token, q and v biases but no k bias, no
  relative position bias, no layer scale (init_values 0), LayerNorm eps 1e-6, mean-pooling layout (`norm` is an
  Identity, `fc_norm` is applied to the patch tokens, cls dropped); here timm's VisionTransformer with
  global_pool="avg" (same layout) and the q / 0 / v biases fused into `attn.qkv.bias`;
- `encode_task_layer` = Linear(768, 768) - Tanh - Linear(768, 32), run in float32 (autocast off, as official);
- quantizer: the 32-d output is l2-normalised and the id is the nearest row (L2) of `quantize.embedding.weight`
  (8192 x 32, l2-normalised by its EMA updates), i.e. the argmax of the cosine similarity.

The released checkpoint is read with `load_vqkd_state`: released key name -> this module's by an explicit map; the
decoder (`decoder.*`, `decode_task_layer.*`: only ids are needed), the quantizer's EMA statistics and the keys the
official loader drops (`loss*`, `teacher*`, `scaling*`) are dropped and reported; everything else must match.
Key names not confirmed against the released file itself (it cannot be downloaded here): all of them are derived
from the source above; `quantize.cluster_size` / `quantize.embedding.{cluster_size,embed_avg,initted}` are the EMA
buffers that source registers.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from timm.models.vision_transformer import VisionTransformer

from lightning_mim.eval.weights import LoadReport, read_checkpoint
from lightning_mim.targets.base import Tokenizer, TokenizerConfig, nearest_code

DROP_RULES: dict[str, str] = {
    "decoder.": "VQ-KD decoder (only ids are needed)",
    "decode_task_layer.": "VQ-KD decoder task layer (only ids are needed)",
    "quantize.embedding.cluster_size": "codebook EMA statistic (training only)",
    "quantize.embedding.embed_avg": "codebook EMA statistic (training only)",
    "quantize.embedding.initted": "codebook k-means-init flag (training only)",
    "quantize.cluster_size": "code usage EMA statistic (training only)",
    "loss": "dropped by the official tokenizer loader",
    "teacher": "CLIP teacher, dropped by the official tokenizer loader",
    "scaling": "teacher input scaling, dropped by the official tokenizer loader",
}
_QV_BIAS = re.compile(r"^encoder\.(blocks\.\d+\.attn)\.(q_bias|v_bias)$")


class VQKDTokenizer(Tokenizer):
    """VQ-KD ids for [0, 1] images of `input_size` px: (B, input_size / patch, input_size / patch)."""

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__(config.compute_dtype)
        self.input_size = config.input_size or 224
        self.in_chans, self.vocab_size = 3, config.vqkd_vocab_size
        if self.input_size % config.vqkd_patch_size:
            raise ValueError(f"VQ-KD input_size {self.input_size} is not a multiple of its patch size "
                             f"{config.vqkd_patch_size}")
        side = self.input_size // config.vqkd_patch_size
        self.grid_size = (side, side)
        dim = config.vqkd_embed_dim
        self.encoder = VisionTransformer(
            img_size=self.input_size, patch_size=config.vqkd_patch_size, in_chans=3, num_classes=0,
            global_pool="avg", embed_dim=dim, depth=config.vqkd_depth, num_heads=config.vqkd_heads, mlp_ratio=4.0,
            qkv_bias=True, class_token=True)
        self.encode_task_layer = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, config.vqkd_code_dim))
        self.register_buffer("codebook", torch.zeros(config.vqkd_vocab_size, config.vqkd_code_dim))  # loaded
        self.freeze()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, h, w, code_dim) l2-normalised quantizer inputs of [0, 1] images."""
        with self.autocast(images.device.type):
            tokens = self.encoder.forward_features(images * 2.0 - 1.0)
            patches = self.encoder.fc_norm(tokens[:, self.encoder.num_prefix_tokens:])
        with torch.autocast(images.device.type, enabled=False):
            codes = F.normalize(self.encode_task_layer(patches.float()), dim=-1)
        return codes.view(images.shape[0], *self.grid_size, -1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        codes = self.features(images)
        return nearest_code(codes.flatten(0, 2), self.codebook).view(images.shape[0], *self.grid_size)


def released_to_module_key(key: str) -> str:
    """Released name -> this module's name (identical except the codebook; q/v biases are fused separately)."""
    return "codebook" if key == "quantize.embedding.weight" else key


def load_vqkd_state(path: str | Path, tokenizer: VQKDTokenizer) -> LoadReport:
    """Load a released VQ-KD checkpoint ({'model': state}, {'state_dict': state} or a bare state dict) into
    `tokenizer`, strictly: every key is renamed, fused or dropped by rule; a missing, unexpected or mis-shaped key
    raises naming it. Returns the report of what was dropped and fused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VQ-KD checkpoint not found: {path} (the released "
                                f"vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth, saved locally; nothing is "
                                f"downloaded)")
    raw = read_checkpoint(path)
    nested = next((name for name in ("model", "state_dict") if isinstance(raw.get(name), dict)), None)
    released = raw[nested] if nested else raw
    report = LoadReport(f"vqkd:{nested or 'state_dict'}")
    state: dict[str, torch.Tensor] = {}
    biases: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in released.items():
        reason = next((why for prefix, why in DROP_RULES.items() if key.startswith(prefix)), None)
        if reason is not None:
            report.dropped[key] = reason
        elif (match := _QV_BIAS.match(key)) is not None:
            biases.setdefault(f"encoder.{match.group(1)}.qkv.bias", {})[match.group(2)] = value
        else:
            state[released_to_module_key(key)] = value
    for fused, parts in biases.items():
        if set(parts) != {"q_bias", "v_bias"}:
            raise ValueError(f"{path}: {fused[:-9]} has {sorted(parts)} but needs both q_bias and v_bias")
        state[fused] = torch.cat([parts["q_bias"], torch.zeros_like(parts["q_bias"]), parts["v_bias"]])
        report.renamed[f"{fused[:-9]}.{{q_bias,v_bias}}"] = f"{fused} (q, 0, v)"
    if "codebook" in state:
        report.renamed["quantize.embedding.weight"] = "codebook"
    expected = tokenizer.state_dict()
    wrong = [f"{key}: checkpoint {tuple(state[key].shape)}, tokenizer {tuple(expected[key].shape)}"
             for key in state if key in expected and state[key].shape != expected[key].shape]
    report.missing = [key for key in expected if key not in state]
    report.unexpected = [key for key in state if key not in expected]
    if wrong or report.missing or report.unexpected:
        raise ValueError(
            f"{path} does not match the VQ-KD tokenizer configured (embed_dim, depth, heads, patch size, vocabulary "
            f"{tokenizer.vocab_size}, code dim, input size {tokenizer.input_size}): "
            + "; ".join([*(f"shape {line}" for line in wrong[:3]), *(f"missing {key}" for key in report.missing[:3]),
                         *(f"unexpected {key}" for key in report.unexpected[:3])])
            + ". Set tokenizer.vqkd_* to the checkpoint's architecture")
    tokenizer.load_state_dict(state, strict=True)
    return report


def build_vqkd_tokenizer(config: TokenizerConfig) -> VQKDTokenizer:
    if config.path is None:
        raise ValueError("a VQ-KD tokenizer needs `path`: the released vqkd_encoder_base_decoder_3x768x12_clip .pth")
    tokenizer = VQKDTokenizer(config)
    report = load_vqkd_state(config.path, tokenizer)
    reasons = Counter(report.dropped.values())
    rank_zero_info(f"VQ-KD tokenizer loaded from {config.path}: {len(tokenizer.state_dict())} tensors, "
                   f"{len(report.renamed)} renamed or fused; dropped "
                   + ", ".join(f"{count} ({reason})" for reason, count in sorted(reasons.items())))
    return tokenizer
