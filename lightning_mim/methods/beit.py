"""BEiT-style masked token prediction (Bao et al. 2022), the token-prediction baseline of MaPeT's fair setting.

Per image, BEiT's block-wise masking (75 of 196 patches, at least 16 per block, drawn in the loader as BEiT's
dataset does) chooses the masked patches; the encoder sees every patch, masked ones replaced by a learned mask token
before the position embedding; a `Linear(D, V)` predicts the tokenizer's id of each masked patch; the loss is the
cross-entropy over masked patches only. Targets, crop and optimiser are MaPeT's (the fair setting: same tokenizer,
data pipeline and schedule), so the two differ only in the pre-training task.

The head runs on every patch and the loss weighs masked ones by 1: the masked count varies per image (BEiT stops a
few patches short at times), and indexing them out would read that count on the host each step.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
from PIL import Image

from lightning_mim.backbone import BackboneConfig
from lightning_mim.heads import learned_mask_token, token_classifier
from lightning_mim.losses import token_accuracy, token_cross_entropy
from lightning_mim.masking import block_mask, block_masking
from lightning_mim.methods.base import MIMMethod, OptimConfig
from lightning_mim.methods.mapet import MaPeTOptimConfig
from lightning_mim.targets import TokenizerConfig
from lightning_mim.targets.views import Crop, TokenizerViews, TokenTargets, token_hit_rows


class BlockMaskedViews:
    """PIL image -> (model view, tokenizer view, BEiT block mask (L,), 1 = masked)."""

    def __init__(self, views: TokenizerViews, grid_size: tuple[int, int], num_masked: int, min_block: int,
                 exact: bool) -> None:
        self.views, self.grid_size, self.num_masked, self.min_block, self.exact = (
            views, grid_size, num_masked, min_block, exact)

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mask = block_mask(*self.grid_size, self.num_masked, min_block=self.min_block, exact=self.exact)
        return (*self.views(image), mask)


class BEiT(MIMMethod):
    """BEiT-style pre-training on the tokens of `tokenizer`. Defaults: 75 of 196 patches masked in blocks of >= 16
    (the same shares of another grid), MaPeT's crop, colour jitter and optimiser (`MaPeTOptimConfig`)."""

    row_labels = {"reconstruction": "right token: white"}  # `val/reconstruction` shows hits, not pixels
    loss_scales = {"mim": "token"}

    def __init__(self, backbone: BackboneConfig | dict | None = None, optim: MaPeTOptimConfig | dict | None = None,
                 loss_weights: dict[str, float] | None = None, feature_pool: Literal["avg", "cls"] = "avg",
                 tokenizer: TokenizerConfig | dict | nn.Module | None = None, vocab_size: int | None = None,
                 num_masked_patches: int | None = None, min_masked_per_block: int | None = None,
                 exact_mask_count: bool = False, crop: Crop = "center_square", colour_jitter: float = 0.4) -> None:
        """num_masked_patches / min_masked_per_block: None = BEiT's 75 / 196 and 16 / 196 of the patch grid (75 and
        16 at 224 px, patch 16). exact_mask_count: top up a block mask that stopped short with random patches (BEiT
        does not)."""
        optim = optim if isinstance(optim, OptimConfig) else MaPeTOptimConfig(**(optim or {}))
        super().__init__(backbone, optim, loss_weights, feature_pool)
        if isinstance(tokenizer, nn.Module):  # a ready module (tests): not a hyper-parameter
            self.hparams.pop("tokenizer", None)
        num_patches = self.backbone.num_patches
        if num_masked_patches is None:
            num_masked_patches = round(75 / 196 * num_patches)
        if min_masked_per_block is None:
            min_masked_per_block = max(1, round(16 / 196 * num_patches))
        if not 0 < num_masked_patches < num_patches or not 0 < min_masked_per_block <= num_masked_patches:
            raise ValueError(f"need 0 < min_masked_per_block ({min_masked_per_block}) <= num_masked_patches "
                             f"({num_masked_patches}) < {num_patches} patches: BEiT masks 75 of 196 in blocks of >= 16")
        self.num_masked, self.min_block, self.exact = num_masked_patches, min_masked_per_block, exact_mask_count
        self.targets = TokenTargets(tokenizer, vocab_size, self.backbone.grid_size)
        self.crop, self.colour_jitter = crop, colour_jitter
        self.mask_token = learned_mask_token(self.backbone.embed_dim)
        self.head = token_classifier(self.backbone.embed_dim, self.targets.vocab_size)
        self.validation_masks = torch.Generator()

    def eval_mode_modules(self) -> list[nn.Module]:
        return [self.targets]

    def train_transform(self, mean: tuple[float, ...], std: tuple[float, ...]) -> BlockMaskedViews:
        self.targets.bind(mean, std)
        views = TokenizerViews(self.image_size, self.targets.input_size or self.image_size, mean, std,
                               self.targets.in_chans, self.crop, colour_jitter=self.colour_jitter)
        return BlockMaskedViews(views, self.backbone.grid_size, self.num_masked, self.min_block, self.exact)

    def on_validation_epoch_start(self) -> None:
        self.validation_masks.manual_seed(0)  # the same masks every validation: comparable val/loss

    def validation_views(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        view = self.targets.view_of(images)
        if view is None:
            return None
        mask = block_masking(images.shape[0], self.backbone.grid_size, self.num_masked, self.exact,
                             self.validation_masks, min_block=self.min_block)
        return images, view, mask.to(images.device)

    def forward(self, images: torch.Tensor, mask: torch.Tensor, drop_path_keep: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Token logits (B, L, V) of every patch, masked ones (mask (B, L), 1 = masked) seen as the mask token."""
        tokens = self.backbone.forward_masked(images, mask, self.mask_token, drop_path_keep=drop_path_keep)
        return self.head(tokens[:, self.backbone.num_prefix_tokens:])

    def compute_losses(self, views: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                       drop_path_keep: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        images, tokenizer_input, mask = views
        ids = self.targets(tokenizer_input)
        logits = self(images, mask, drop_path_keep)
        self.metrics = {"token_accuracy": token_accuracy(logits, ids, mask)}
        return {"mim": token_cross_entropy(logits, ids, mask)}

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """`val/reconstruction` rows: the input, the masked input, masked patches white where the top-1 token is
        right and black where wrong."""
        views = self.validation_views(images)
        if views is None:
            return None
        images, view, mask = views
        hit = (self(images, mask).argmax(-1) == self.targets(view)).float() * mask
        return token_hit_rows(self.backbone, images, mask, hit, *self.targets.stats(self.in_chans))
