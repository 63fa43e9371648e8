"""MAE: masked autoencoders (He et al. 2022), the base of LUT and Beyond Masking.

Random masking by argsort of uniform noise; the encoder sees only the kept patches; a light decoder fills the
removed ones with a mask token and predicts per-patch normalised pixels; the loss is the MSE on removed patches only.
"""
from __future__ import annotations

from typing import Literal

import torch

from lightning_mim.backbone import BackboneConfig
from lightning_mim.heads import MAEDecoder
from lightning_mim.losses import masked_mse, normalize_patches
from lightning_mim.masking import check_mask_ratio, random_masking
from lightning_mim.methods.base import MIMMethod, OptimConfig


class MAE(MIMMethod):
    """MAE pre-training. Defaults are the paper's ViT-B/16 recipe (decoder 512 x 8, 16 heads, 75 % masking)."""

    def __init__(self, backbone: BackboneConfig | dict | None = None, optim: OptimConfig | dict | None = None,
                 loss_weights: dict[str, float] | None = None, feature_pool: Literal["avg", "cls"] = "avg",
                 mask_ratio: float = 0.75, norm_pix_loss: bool = True, decoder_dim: int = 512,
                 decoder_depth: int = 8, decoder_heads: int = 16) -> None:
        check_mask_ratio(mask_ratio)
        super().__init__(backbone, optim, loss_weights, feature_pool)
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        patch_dim = self.backbone.patch_size ** 2 * self.in_chans
        self.decoder = MAEDecoder(self.backbone.embed_dim, self.backbone.grid_size, patch_dim, decoder_dim,
                                  decoder_depth, decoder_heads, num_prefix_tokens=self.backbone.num_prefix_tokens)

    def forward(self, images: torch.Tensor, noise: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the per-patch prediction (B, L, p*p*C) and the mask (B, L), 1 = removed."""
        draw = random_masking(images.shape[0], self.backbone.num_patches, self.mask_ratio, noise=noise,
                              device=images.device)
        latent = self.backbone.forward_kept(images, draw.keep_idx)
        return self.decoder(latent, draw.restore_idx), draw.mask

    @property
    def norm_pix_target(self) -> bool:
        return self.norm_pix_loss

    def target(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.backbone.patchify(images)
        return normalize_patches(patches) if self.norm_pix_loss else patches.float()

    def compute_losses(self, views: torch.Tensor, noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        pred, mask = self(views, noise)
        return {"mim": masked_mse(pred, self.target(views), mask)}
