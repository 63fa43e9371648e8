"""Decoders and heads that predict targets from encoder tokens."""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

from lightning_mim.backbone.pos_embed import sincos_1d_interleaved, sincos_2d
from lightning_mim.backbone.vit import fix_key_bias_at_zero, init_clipped_normal_weights, init_mae_weights


class MAEDecoder(nn.Module):
    """MAE's lightweight decoder: embed the visible tokens, append mask tokens, unshuffle, add fixed sin-cos
    positions, run transformer blocks and predict `out_dim` values per patch.

    Input: encoder output (B, prefix + K, D_enc) with patch tokens in shuffled order, and `restore_idx` (B, L).
    Output: (B, L, out_dim) in raster order (prefix outputs dropped).

    Options for other variants (MAE-pytorch / Beyond Masking: 4 x 384): `embed_bias=False` (no bias on the input
    projection), `pos_embed="sincos_1d"` (the interleaved 1-D table, see `BackboneConfig`), `qkv_bias="qv"` (BEiT
    attention, k bias fixed at 0) and `init="clipped_normal"` (Linear weights N(0, .02) truncated at +-.02, the mask
    token too; the input projection keeps PyTorch's default init).
    """

    def __init__(self, encoder_dim: int, grid_size: tuple[int, int], out_dim: int, dim: int = 512, depth: int = 8,
                 num_heads: int = 16, mlp_ratio: float = 4.0, num_prefix_tokens: int = 1, embed_bias: bool = True,
                 pos_embed: str = "sincos", qkv_bias: str = "qkv", init: str = "mae") -> None:
        super().__init__()
        for name, value, choices in (("pos_embed", pos_embed, ("sincos", "sincos_1d")),
                                     ("qkv_bias", qkv_bias, ("qkv", "qv")), ("init", init, ("mae", "clipped_normal"))):
            if value not in choices:
                raise ValueError(f"MAEDecoder: unknown {name} {value!r}: choose one of {choices}")
        self.num_prefix_tokens = num_prefix_tokens
        self.num_patches = grid_size[0] * grid_size[1]
        self.embed = nn.Linear(encoder_dim, dim, bias=embed_bias)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        if pos_embed == "sincos":
            table = sincos_2d(dim, *grid_size, cls_token=False)
        else:
            table = sincos_1d_interleaved(self.num_patches, dim)
        if num_prefix_tokens:
            table = torch.cat([torch.zeros(num_prefix_tokens, dim), table])
        self.register_buffer("pos_embed", table[None], persistent=False)
        self.blocks = nn.ModuleList(
            [Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
             for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, out_dim)
        if init == "mae":
            init_mae_weights(self)
            nn.init.normal_(self.mask_token, std=0.02)
        else:
            init_clipped_normal_weights(self)
            self.embed.reset_parameters()
            nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)
        if qkv_bias == "qv":
            fix_key_bias_at_zero(self)

    def forward(self, latent: torch.Tensor, restore_idx: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(latent)
        prefix, visible = tokens[:, : self.num_prefix_tokens], tokens[:, self.num_prefix_tokens:]
        num_missing = self.num_patches - visible.shape[1]
        filler = self.mask_token.to(visible.dtype).expand(visible.shape[0], num_missing, -1)
        shuffled = torch.cat([visible, filler], dim=1)
        patches = torch.gather(shuffled, 1, restore_idx.unsqueeze(-1).expand(-1, -1, shuffled.shape[-1]))
        tokens = torch.cat([prefix, patches], dim=1) + self.pos_embed.to(patches.dtype)
        for block in self.blocks:
            tokens = block(tokens)
        return self.pred(self.norm(tokens))[:, self.num_prefix_tokens:]


class ProjectionMLP(nn.Sequential):
    """BYOL / MoCo v3 MLP: `num_layers` Linears without bias, each but the last followed by BatchNorm1d and ReLU,
    xavier-uniform. Two layers is BYOL's (LUT's projector and predictor; 768 -> 4096 -> 768 has 6,299,648
    parameters); MoCo v3's ViT projector is three layers with `last_bn` (a BatchNorm without affine parameters on
    the output), its predictor two without.

    BatchNorm normalises over the batch it is called with, so call it once per view to keep per-view statistics."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, last_bn: bool = False) -> None:
        if num_layers < 2:
            raise ValueError(f"a projection MLP needs at least 2 layers, got {num_layers}")
        layers: list[nn.Module] = []
        for index in range(num_layers - 1):
            layers += [nn.Linear(in_dim if index == 0 else hidden_dim, hidden_dim, bias=False),
                       nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(hidden_dim, out_dim, bias=False))
        if last_bn:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
        super().__init__(*layers)
        init_mae_weights(self)


def learned_mask_token(width: int) -> nn.Parameter:
    """A (1, 1, width) mask token, trunc-normal 0.02 (BEiT, MaPeT)."""
    token = nn.Parameter(torch.zeros(1, 1, width))
    nn.init.trunc_normal_(token, std=0.02)
    return token


def token_classifier(width: int, vocab_size: int) -> nn.Linear:
    """`Linear(width, V)` over a tokenizer's vocabulary, weight trunc-normal 0.02 and bias 0 (BEiT, MaPeT)."""
    classifier = nn.Linear(width, vocab_size)
    nn.init.trunc_normal_(classifier.weight, std=0.02)
    nn.init.zeros_(classifier.bias)
    return classifier
