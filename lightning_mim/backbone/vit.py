"""The one ViT every method shares: timm's VisionTransformer plus what masked image modeling needs.

The encoder's state dict uses timm's key names unchanged, so it loads with `strict=True` into
`timm.create_model("vit_<size>_patch<p>_<res>", num_classes=0)` (see `timm_model_name`); with a relative position
bias (`rel_pos`) its tables have timm Beit's keys and the whole encoder converts to timm's `Beit` (`timm_beit`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer
from torch.utils.checkpoint import checkpoint

from lightning_mim.backbone.init import init_clipped_normal_weights, init_mae_weights, init_simmim_weights
from lightning_mim.backbone.pos_embed import sincos_1d_interleaved, sincos_2d
from lightning_mim.backbone.rel_pos import (
    REL_POS_BIAS_MODES, add_relative_position_bias, combine_attention_masks, relative_position_bias,
    relative_position_tables,
)

# width, depth, heads; mlp_ratio 4 everywhere (timm / MAE sizes; "micro" is for tests and CPU demos)
VIT_SIZES: dict[str, tuple[int, int, int]] = {
    "micro": (128, 4, 4),
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}


@dataclass
class BackboneConfig:
    """Everything that defines the shared ViT encoder.

    size: one of `VIT_SIZES`. pos_embed: "sincos" (fixed 2-D sin-cos, MAE), "sincos_1d" (fixed 1-D table over the
    raster index with sine / cosine interleaved, BEiT / MAE-pytorch / Beyond Masking; a cls token gets a zero row),
    "learned" (trainable, timm init) or "none" (no absolute positions, timm's `pos_embed='none'`: SimMIM's ViT-B).
    init: "mae" (xavier-uniform on every Linear and the flattened patch projection, N(0, .02) tokens), "timm",
    "clipped_normal" (MAE-pytorch / Beyond Masking: Linear weights N(0, .02) truncated at +-0.02, i.e. at one std,
    zero biases; the patch projection keeps PyTorch's default init) or "simmim" (microsoft/SimMIM: the same clipped
    draw over every Linear, the patch projection, cls token and learned positions, then block i's attention output
    projection and fc2 divided by sqrt(2(i+1)); `init.init_simmim_weights`).
    qkv_bias: "qkv" (timm) or "qv" (BEiT: the key bias is fixed at zero; it stays in timm's fused `qkv.bias`, so
    state-dict keys are timm's, and a gradient mask keeps its k third at zero through every optimiser step).
    rel_pos_bias: "none", "shared" (one BEiT relative position bias table for all blocks: SimMIM / BEiT
    pre-training) or "per_block" (one per block: BEiT / SimMIM fine-tuning); see `rel_pos`. Needs the cls token and
    qkv_bias "qv" (BEiT's attention, so that the encoder loads into and exports to timm's `Beit` bit-exactly).
    """

    size: str = "base"
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    pos_embed: Literal["sincos", "sincos_1d", "learned", "none"] = "sincos"
    class_token: bool = True
    init: Literal["mae", "timm", "clipped_normal", "simmim"] = "mae"
    drop_path_rate: float = 0.0
    grad_checkpointing: bool = False
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    qkv_bias: Literal["qkv", "qv"] = "qkv"
    rel_pos_bias: Literal["none", "shared", "per_block"] = "none"

    def __post_init__(self) -> None:
        if self.size not in VIT_SIZES:
            raise ValueError(f"unknown backbone size {self.size!r}: choose one of {sorted(VIT_SIZES)}")
        if self.patch_size <= 0 or self.img_size % self.patch_size:
            raise ValueError(
                f"image size {self.img_size} is not divisible by patch size {self.patch_size}: "
                f"pick an image size that is a multiple of {self.patch_size} (e.g. "
                f"{max(self.patch_size, self.img_size // self.patch_size * self.patch_size)}) or another patch size"
            )
        if self.pos_embed not in ("sincos", "sincos_1d", "learned", "none"):
            raise ValueError(f"unknown pos_embed {self.pos_embed!r}: choose 'sincos', 'sincos_1d', 'learned' or 'none'")
        if self.init not in ("mae", "timm", "clipped_normal", "simmim"):
            raise ValueError(f"unknown init {self.init!r}: choose 'mae', 'timm', 'clipped_normal' or 'simmim'")
        if self.qkv_bias not in ("qkv", "qv"):
            raise ValueError(f"unknown qkv_bias {self.qkv_bias!r}: choose 'qkv' (timm) or 'qv' (BEiT, k bias 0)")
        if self.rel_pos_bias not in REL_POS_BIAS_MODES:
            raise ValueError(f"unknown rel_pos_bias {self.rel_pos_bias!r}: choose one of {REL_POS_BIAS_MODES}")
        if self.rel_pos_bias != "none" and not (self.class_token and self.qkv_bias == "qv"):
            raise ValueError(f"rel_pos_bias {self.rel_pos_bias!r} is BEiT's (a cls token, q and v biases only): set "
                             "class_token: true and qkv_bias: qv, or rel_pos_bias: none")

    @classmethod
    def coerce(cls, value: "BackboneConfig | dict[str, Any]") -> "BackboneConfig":
        return value if isinstance(value, cls) else cls(**value)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def width(self) -> int:
        return VIT_SIZES[self.size][0]

    def timm_kwargs_full(self) -> dict[str, Any]:
        """Keyword arguments that build the same encoder with `timm.models.vision_transformer.VisionTransformer`."""
        width, depth, heads = VIT_SIZES[self.size]
        return dict(
            img_size=self.img_size, patch_size=self.patch_size, in_chans=self.in_chans, num_classes=0,
            global_pool="", embed_dim=width, depth=depth, num_heads=heads, mlp_ratio=4.0, qkv_bias=True,
            class_token=self.class_token, drop_path_rate=self.drop_path_rate,
            **({"pos_embed": "none"} if self.pos_embed == "none" else {}), **self.timm_kwargs,
        )


def timm_model_name(config: BackboneConfig) -> str | None:
    """timm registry name of the same architecture (None for "micro", which timm does not register, and with a
    relative position bias, which timm's VisionTransformer does not hold: see `timm_beit`)."""
    if config.size == "micro" or config.rel_pos_bias != "none":
        return None
    return f"vit_{config.size}_patch{config.patch_size}_{config.img_size}"


class MIMViT(VisionTransformer):
    """timm ViT encoder (no classifier) with masked forwards.

    Token layout: `num_prefix_tokens` prefix tokens (cls) followed by the patch tokens in raster order.
    Masks are (B, L) with 1 = removed / replaced, 0 = visible.
    """

    def __init__(self, config: BackboneConfig | dict[str, Any] | None = None) -> None:
        config = BackboneConfig.coerce(config or {})
        super().__init__(**config.timm_kwargs_full())
        self.config = config
        if config.pos_embed == "sincos":
            grid_h, grid_w = self.patch_embed.grid_size
            table = sincos_2d(self.embed_dim, grid_h, grid_w, cls_token=self.num_prefix_tokens > 0)
            self.pos_embed.data.copy_(table[None])
            self.pos_embed.requires_grad_(False)
        elif config.pos_embed == "sincos_1d":
            table = sincos_1d_interleaved(self.patch_embed.num_patches, self.embed_dim)
            table = torch.cat([torch.zeros(self.num_prefix_tokens, self.embed_dim), table])
            self.pos_embed.data.copy_(table[None])
            self.pos_embed.requires_grad_(False)
        add_relative_position_bias(self, config.rel_pos_bias)
        if config.init == "mae":
            init_mae_weights(self)
        elif config.init == "clipped_normal":
            init_clipped_normal_weights(self)
        elif config.init == "simmim":
            init_simmim_weights(self)
        if config.qkv_bias == "qv":
            fix_key_bias_at_zero(self)
        self.set_grad_checkpointing(config.grad_checkpointing)

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.patch_embed.grid_size)

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, p*p*C); each patch flattened in (row p, col q, channel c) order."""
        return patchify(images, self.patch_size)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """Inverse of `patchify`: (B, L, p*p*C) -> (B, C, H, W)."""
        return unpatchify(patches, self.patch_size, self.grid_size, self.config.in_chans)

    def _check_input(self, images: torch.Tensor) -> None:
        expected = (self.config.in_chans, self.config.img_size, self.config.img_size)
        if tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"backbone expects images of shape (B, {expected[0]}, {expected[1]}, {expected[2]}) but got "
                f"{tuple(images.shape)}: set backbone.img_size / in_chans to match the data, or resize the data"
            )

    def embed_patches(self, images: torch.Tensor, mask: torch.Tensor | None = None,
                      mask_token: torch.Tensor | None = None) -> torch.Tensor:
        """Patch tokens with their position embeddings, (B, L, D).

        With `mask` and `mask_token` (1, 1, D), removed patches are replaced by the mask token *before* the position
        embedding is added (SimMIM / BEiT style).
        """
        self._check_input(images)
        tokens = self.patch_embed(images)
        if mask is not None:
            if mask_token is None:
                raise ValueError("embed_patches: a mask was given without a mask_token")
            weight = mask.unsqueeze(-1).to(tokens.dtype)
            tokens = tokens * (1.0 - weight) + mask_token.to(tokens.dtype) * weight
        return tokens if self.pos_embed is None else tokens + self.pos_embed[:, self.num_prefix_tokens:]

    def prepend_prefix(self, tokens: torch.Tensor) -> torch.Tensor:
        """Prepend the cls token (with its own position embedding, zero for sin-cos)."""
        if not self.num_prefix_tokens:
            return tokens
        cls = self.cls_token if self.pos_embed is None else self.cls_token + self.pos_embed[:, :1]
        cls = cls.expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1)

    def drop_path_rates(self) -> list[float]:
        """Each block's stochastic-depth rate (timm's linear decay rule up to `drop_path_rate`)."""
        return [float(getattr(block.drop_path1, "drop_prob", 0.0)) for block in self.blocks]

    def draw_drop_path_keep(self, batch_size: int, device: torch.device | str | None = None,
                            generator: torch.Generator | None = None) -> torch.Tensor:
        """Stochastic-depth draws (depth, 2, B): 1 keeps block i's attention (0) / MLP (1) branch for a sample, with
        probability 1 - rate_i, as timm's DropPath draws them."""
        rates = torch.tensor(self.drop_path_rates(), device=device)
        draws = torch.rand(len(rates), 2, batch_size, device=device, generator=generator)
        return (draws >= rates[:, None, None]).float()

    def block_attention_masks(self, attn_mask: torch.Tensor | None, length: int,
                              positions: torch.Tensor | None = None) -> list[torch.Tensor | None]:
        """Each block's SDPA mask: `attn_mask`, plus the relative position bias when the backbone has one (for the
        tokens at `positions` (B, N) of the cls + patch sequence; None means that whole sequence, in order)."""
        tables = relative_position_tables(self)
        if tables is None:
            return [attn_mask] * len(self.blocks)
        if positions is None and length != 1 + self.num_patches:
            raise ValueError(f"relative position bias: a sequence of {length} tokens is not the cls token and the "
                             f"{self.num_patches} patches; pass the tokens' positions (as forward_kept does) or use "
                             "rel_pos_bias: none")
        biases: dict[int, torch.Tensor] = {}  # a shared table's bias is computed once
        for table in tables:
            if id(table) not in biases:
                bias = relative_position_bias(table, self.relative_position_index, positions)
                biases[id(table)] = combine_attention_masks(attn_mask, bias)
        return [biases[id(table)] for table in tables]

    def forward_tokens(self, tokens: torch.Tensor, attn_mask: torch.Tensor | None = None,
                       drop_path_keep: torch.Tensor | None = None, positions: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """Run the transformer blocks and the final norm on a prepared sequence.

        `attn_mask` follows `F.scaled_dot_product_attention`: bool with True = may attend, or an additive float
        mask; shape broadcastable to (B, heads, N, N). `drop_path_keep` (depth, 2, B) replaces the blocks' own
        stochastic-depth draws (`draw_drop_path_keep`): a kept branch is scaled by 1 / (1 - rate), as in timm.
        `positions` (B, N): where each token sits in the cls + patch sequence, for the relative position bias.
        """
        tokens = self.norm_pre(tokens)
        masks = self.block_attention_masks(attn_mask, tokens.shape[1], positions)
        use_checkpoint = self.grad_checkpointing and torch.is_grad_enabled()
        for index, block in enumerate(self.blocks):
            if drop_path_keep is None:
                run, args = block, (tokens, masks[index])
            else:
                run, args = _block_with_drop_path, (block, tokens, masks[index], drop_path_keep[index])
            tokens = checkpoint(run, *args, use_reentrant=False) if use_checkpoint else run(*args)
        return self.norm(tokens)

    def forward_kept(self, images: torch.Tensor, keep_idx: torch.Tensor,
                     drop_path_keep: torch.Tensor | None = None) -> torch.Tensor:
        """MAE encoder: encode only the patches at `keep_idx` (B, K), in that order. Returns (B, prefix + K, D)."""
        tokens = self.embed_patches(images)
        kept = torch.gather(tokens, 1, keep_idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        positions = torch.cat([torch.zeros_like(keep_idx[:, :1]), keep_idx + 1], dim=1)
        return self.forward_tokens(self.prepend_prefix(kept), drop_path_keep=drop_path_keep, positions=positions)

    def forward_masked(self, images: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor,
                       attn_mask: torch.Tensor | None = None, drop_path_keep: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """SimMIM / BEiT encoder: every patch, removed ones replaced by `mask_token`. Returns (B, prefix + L, D)."""
        tokens = self.embed_patches(images, mask, mask_token)
        return self.forward_tokens(self.prepend_prefix(tokens), attn_mask, drop_path_keep)

    def forward_full(self, images: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """All patches, no masking. Returns (B, prefix + L, D) after the final norm."""
        return self.forward_tokens(self.prepend_prefix(self.embed_patches(images)), attn_mask)

    def pooled_features(self, images: torch.Tensor, pool: Literal["avg", "cls"] = "avg") -> torch.Tensor:
        """(B, D) features for probing: mean of the patch tokens or the cls token, after the final norm."""
        tokens = self.forward_full(images)
        if pool == "cls":
            if not self.num_prefix_tokens:
                raise ValueError("pool='cls' needs a backbone with class_token=True")
            return tokens[:, 0]
        return tokens[:, self.num_prefix_tokens:].mean(dim=1)


def _block_with_drop_path(block: nn.Module, tokens: torch.Tensor, attn_mask: torch.Tensor | None,
                          keep: torch.Tensor) -> torch.Tensor:
    """timm's Block.forward with given stochastic-depth draws `keep` (2, B) instead of its DropPath modules'."""
    rate = getattr(block.drop_path1, "drop_prob", 0.0)
    scale = (keep / (1.0 - rate) if rate < 1.0 else keep).to(tokens.dtype)[:, :, None, None]
    tokens = tokens + scale[0] * block.ls1(block.attn(block.norm1(tokens), attn_mask=attn_mask))
    return tokens + scale[1] * block.ls2(block.mlp(block.norm2(tokens)))


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    batch, channels, height, width = images.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"image of size {height}x{width} is not divisible by patch size {patch_size}")
    grid_h, grid_w = height // patch_size, width // patch_size
    patches = images.reshape(batch, channels, grid_h, patch_size, grid_w, patch_size)
    patches = torch.einsum("nchpwq->nhwpqc", patches)
    return patches.reshape(batch, grid_h * grid_w, patch_size * patch_size * channels)


def unpatchify(patches: torch.Tensor, patch_size: int, grid_size: tuple[int, int], channels: int) -> torch.Tensor:
    grid_h, grid_w = grid_size
    batch = patches.shape[0]
    images = patches.reshape(batch, grid_h, grid_w, patch_size, patch_size, channels)
    images = torch.einsum("nhwpqc->nchpwq", images)
    return images.reshape(batch, channels, grid_h * patch_size, grid_w * patch_size)


class KeyBiasFreeLinear(nn.Linear):
    """A fused qkv projection whose bias is used with its k third replaced by zeros (BEiT's q / v biases): that third
    gets an exact zero gradient, so it stays where it is (zero) through every optimiser step (Adam would turn the
    round-off of an unmasked gradient into steps the size of the lr), and the state dict keeps timm's keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias
        if bias is not None:
            third = bias.shape[0] // 3
            bias = torch.cat([bias[:third], torch.zeros_like(bias[third:2 * third]), bias[2 * third:]])
        return nn.functional.linear(x, self.weight, bias)


def fix_key_bias_at_zero(module: nn.Module) -> None:
    """BEiT-style attention in every timm attention layer of `module`: the k third of the fused `qkv.bias` is set to
    zero and is not used (`KeyBiasFreeLinear`); eval/weights.py fuses BEiT's separate (q, 0, v) biases the same way."""
    for sub in module.modules():
        qkv = getattr(sub, "qkv", None)
        if type(qkv) is nn.Linear and qkv.bias is not None and qkv.out_features % 3 == 0:
            with torch.no_grad():
                qkv.bias[qkv.out_features // 3: 2 * qkv.out_features // 3].zero_()
            qkv.__class__ = KeyBiasFreeLinear


def build_backbone(config: BackboneConfig | dict[str, Any] | None = None, **overrides: Any) -> MIMViT:
    """Build the shared encoder from a config (dict or dataclass) with keyword overrides."""
    base = BackboneConfig.coerce(config or {}).to_dict()
    base.update(overrides)
    return MIMViT(BackboneConfig(**base))


__all__ = ["VIT_SIZES", "BackboneConfig", "MIMViT", "build_backbone", "KeyBiasFreeLinear", "fix_key_bias_at_zero",
           "init_clipped_normal_weights", "init_mae_weights", "init_simmim_weights", "patchify", "unpatchify",
           "timm_model_name"]
