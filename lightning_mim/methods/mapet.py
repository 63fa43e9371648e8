"""MaPeT: masked and permuted pre-training of ViTs on visual tokens (Baraldi et al., CVIU 2025; arXiv 2306.07346).

Per image, the cls token and 25 % of the patches (a uniform random permutation's first ranks) form the context and
the other 75 % are predicted in the permutation's order (XLNet), with MPNet's auxiliary positions: a content stream
holds every real token plus one "mask + position" token per predicted patch, and a query stream starts from the same
mask tokens. Keys and values come from the content stream only; who sees whom follows the ranks
(`masking.two_stream_layout`). Both streams share every block weight, so they run as one joint sequence
[real tokens, mask tokens, query tokens] (491 tokens at ViT-B/16) through the shared backbone with one boolean
attention mask per sample: fused attention, and one stochastic-depth draw per sample and branch shared by both
streams, as the official `DropPathDouble`. The final norm is applied (pre-training keeps timm's token pooling); a
`Linear(D, V)` on the query stream predicts the tokenizer's ids of the predicted patches, in raster order, with a
plain cross-entropy; top-1 token accuracy is logged.

Where this departs from aimagelab/MaPeT (documented in the recipes): the permutation is drawn on the device in the
step instead of in the dataset; the lr follows the suite's per-step warm-up and cosine (timm steps it per epoch,
from 1e-6); the content stream's last-block update, which cannot reach the loss, is computed anyway (one fused call).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from lightning_mim.backbone import BackboneConfig
from lightning_mim.heads import learned_mask_token, token_classifier
from lightning_mim.losses import token_accuracy, token_cross_entropy
from lightning_mim.masking import check_permutation_ranks, permutation_ranks, two_stream_layout
from lightning_mim.methods.base import MIMMethod, OptimConfig
from lightning_mim.targets import TokenizerConfig
from lightning_mim.targets.views import Crop, TokenizerViews, TokenTargets, token_hit_rows


@dataclass
class MaPeTOptimConfig(OptimConfig):
    """OptimConfig whose defaults are MaPeT's pre-training recipe: AdamW lr 1.5e-3 (absolute, no batch scaling),
    betas (0.9, 0.999), weight decay 0.05 except 1-D parameters, pos_embed and cls_token (the mask token is decayed),
    10 warm-up epochs, cosine to 1e-5 then 10 cool-down epochs at 1e-5 (timm's `cooldown_epochs`)."""

    base_lr: float = 1.5e-3
    lr_scaling: Literal["linear", "sqrt", "none"] = "none"
    min_lr: float = 1e-5
    warmup_epochs: float = 10.0
    cooldown_epochs: float = 10.0
    betas: tuple[float, float] = (0.9, 0.999)
    no_weight_decay: tuple[str, ...] = ("backbone.cls_token", "backbone.pos_embed")


class MaPeT(MIMMethod):
    """MaPeT pre-training. Defaults are the paper's: 75 % of the patches predicted (K = 147 of 196 at 224 px), the
    tokenizer's vocabulary (8192 for k-CLIP and VQ-KD), the centred-square crop with colour jitter 0.4."""

    row_labels = {"reconstruction": "right token: white"}  # `val/reconstruction` shows hits, not pixels
    loss_scales = {"mim": "token"}

    def __init__(self, backbone: BackboneConfig | dict | None = None, optim: MaPeTOptimConfig | dict | None = None,
                 loss_weights: dict[str, float] | None = None, feature_pool: Literal["avg", "cls"] = "avg",
                 tokenizer: TokenizerConfig | dict | nn.Module | None = None, vocab_size: int | None = None,
                 predict_ratio: float = 0.75, crop: Crop = "center_square", colour_jitter: float = 0.4) -> None:
        """tokenizer: what gives the target ids (see `lightning_mim.targets`); None with `vocab_size` for ids the
        data precomputed. predict_ratio: the share of patches predicted (the official L = 50 context tokens, cls
        included, at 196 patches is 0.75)."""
        optim = optim if isinstance(optim, OptimConfig) else MaPeTOptimConfig(**(optim or {}))
        super().__init__(backbone, optim, loss_weights, feature_pool)
        if isinstance(tokenizer, nn.Module):  # a ready module (tests): not a hyper-parameter
            self.hparams.pop("tokenizer", None)
        num_patches = self.backbone.num_patches
        self.num_predicted = round(predict_ratio * num_patches)
        if not 0.0 < predict_ratio < 1.0 or not 1 <= self.num_predicted < num_patches:
            raise ValueError(f"predict_ratio {predict_ratio} predicts {self.num_predicted} of {num_patches} patches: "
                             f"choose a ratio in (0, 1) that leaves at least one patch on each side (MaPeT: 0.75)")
        self.num_context = self.backbone.num_prefix_tokens + num_patches - self.num_predicted
        self.targets = TokenTargets(tokenizer, vocab_size, self.backbone.grid_size)
        self.crop, self.colour_jitter = crop, colour_jitter
        self.mask_token = learned_mask_token(self.backbone.embed_dim)
        self.head = token_classifier(self.backbone.embed_dim, self.targets.vocab_size)

    def eval_mode_modules(self) -> list[nn.Module]:
        return [self.targets]

    def train_transform(self, mean: tuple[float, ...], std: tuple[float, ...]) -> TokenizerViews:
        """(model view, tokenizer view) of one crop: see `TokenizerViews`."""
        self.targets.bind(mean, std)
        return TokenizerViews(self.image_size, self.targets.input_size or self.image_size, mean, std,
                              self.targets.in_chans, self.crop, colour_jitter=self.colour_jitter)

    def validation_views(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        view = self.targets.view_of(images)
        return None if view is None else (images, view)

    def draw_ranks(self, batch_size: int, device: torch.device, noise: torch.Tensor | None = None) -> torch.Tensor:
        """(B, prefix + L) ranks of the factorisation order, prefix first; `noise` (B, L) fixes the permutation."""
        return permutation_ranks(batch_size, self.backbone.num_patches, self.backbone.num_prefix_tokens, noise,
                                 device=device)

    def forward(self, images: torch.Tensor, ranks: torch.Tensor | None = None,
                drop_path_keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the token logits (B, K, V) of the predicted patches and their patch indices (B, K), ascending.
        `ranks` (B, prefix + L) fixes the order, `drop_path_keep` (depth, 2, B) the stochastic-depth draws. Given
        ranks are refused unless each row is a permutation with the cls token first (`check_permutation_ranks`, a
        host read: ranks= is a test / debugging entry point; the ranks the step draws itself are not read)."""
        backbone, batch = self.backbone, images.shape[0]
        if ranks is None:
            ranks = self.draw_ranks(batch, images.device)
        else:
            check_permutation_ranks(ranks, batch, backbone.num_prefix_tokens + backbone.num_patches,
                                    backbone.num_prefix_tokens)
        layout = two_stream_layout(ranks, self.num_context)
        real = backbone.prepend_prefix(backbone.embed_patches(images))
        position = backbone.pos_embed.expand(batch, -1, -1)
        positions = torch.gather(position, 1, layout.predicted_idx[..., None].expand(-1, -1, position.shape[-1]))
        mask_tokens = self.mask_token.to(real.dtype) + positions
        joint = torch.cat([real, mask_tokens, mask_tokens], dim=1)
        tokens = backbone.forward_tokens(joint, layout.joint_attention_mask(), drop_path_keep)
        logits = self.head(tokens[:, -self.num_predicted:])
        return logits, layout.predicted_idx - backbone.num_prefix_tokens

    def compute_losses(self, views: tuple[torch.Tensor, torch.Tensor], ranks: torch.Tensor | None = None,
                       drop_path_keep: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        images, tokenizer_input = views
        ids = self.targets(tokenizer_input)
        logits, predicted = self(images, ranks, drop_path_keep)
        targets = torch.gather(ids, 1, predicted)
        self.metrics = {"token_accuracy": token_accuracy(logits, targets)}
        return {"mim": token_cross_entropy(logits, targets)}

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """`val/reconstruction` rows: the input, the context alone (predicted patches blanked), and the predicted
        patches white where the top-1 token is right and black where wrong (a map of what the model gets)."""
        tokenizer_view = self.targets.view_of(images)
        if tokenizer_view is None:
            return None
        ids = self.targets(tokenizer_view)
        logits, predicted = self(images)
        hit = (logits.argmax(-1) == torch.gather(ids, 1, predicted)).float()
        chosen = torch.zeros_like(ids, dtype=torch.float32).scatter_(1, predicted, 1.0)
        return token_hit_rows(self.backbone, images, chosen, chosen.scatter(1, predicted, hit),
                              *self.targets.stats(self.in_chans))

