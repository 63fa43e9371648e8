"""SimMIM: a simple framework for masked image modeling (Xie et al. 2022), the base of SymMIM.

Random masking of `mask_patch_size` blocks (32 px: 2 x 2 groups of 16-px patches) at ratio 0.6; masked patches are
replaced by a learned mask token before the position embedding; the encoder sees every patch; a linear head
predicts each patch's pixels (`Linear(D, p*p*C)`, the official 1x1 conv + PixelShuffle written per patch); the loss
is the L1 error over the pixels and channels of masked patches, on the ImageNet-normalised image.

The official ViT-B's encoder is a recipe setting of the shared backbone (configs/simmim/vit_b16_800ep_in1k.yaml):
`rel_pos_bias: shared` with `pos_embed: none`, `qkv_bias: qv`, LayerScale 0.1 (`timm_kwargs.init_values`), drop
path 0.1 and `init: simmim`; the class's own backbone default stays the suite's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
from torchvision.transforms import v2

from lightning_mim.backbone import BackboneConfig
from lightning_mim.data.jpeg_crop import RegionResizedCrop
from lightning_mim.losses import masked_l1
from lightning_mim.masking import check_cell_size, check_mask_ratio, simmim_masking
from lightning_mim.methods.base import MIMMethod, OptimConfig


@dataclass
class SimMIMOptimConfig(OptimConfig):
    """OptimConfig whose defaults are SimMIM's ViT-B recipe: lr = 1e-4 x effective batch / 512, AdamW betas
    (0.9, 0.999), 10 warm-up epochs, no weight decay on the cls token and the position embedding. As in
    microsoft/SimMIM's ViT, whose pre-training optimiser exempts 1-D parameters, names ending in ".bias" and the
    encoder's `no_weight_decay()` = {pos_embed, cls_token} only, the mask token and a shared relative position
    table are decayed (its Swin encoder exempts the mask token; the ViT does not).

    A separate class so that a partial override (`--model.optim.base_lr ...`) keeps the other SimMIM values."""

    base_lr: float = 1e-4
    lr_reference_batch: int = 512
    warmup_epochs: float = 10.0
    betas: tuple[float, float] = (0.9, 0.999)
    no_weight_decay: tuple[str, ...] = ("backbone.cls_token", "backbone.pos_embed")


class SimMIM(MIMMethod):
    """SimMIM pre-training. Defaults are the paper's ViT-B/16 recipe: mask patch 32 px, ratio 0.6, linear head,
    L1 on masked pixels."""

    def __init__(self, backbone: BackboneConfig | dict | None = None, optim: SimMIMOptimConfig | dict | None = None,
                 loss_weights: dict[str, float] | None = None, feature_pool: Literal["avg", "cls"] = "avg",
                 mask_ratio: float = 0.6, mask_patch_size: int = 32) -> None:
        """mask_patch_size: side of a masked block in pixels, a multiple of the ViT patch size."""
        optim = optim if isinstance(optim, OptimConfig) else SimMIMOptimConfig(**(optim or {}))
        super().__init__(backbone, optim, loss_weights, feature_pool)
        if mask_patch_size % self.backbone.patch_size:
            raise ValueError(f"mask_patch_size {mask_patch_size} is not a multiple of the patch size "
                             f"{self.backbone.patch_size}: use e.g. {2 * self.backbone.patch_size}")
        check_mask_ratio(mask_ratio)
        self.mask_ratio = mask_ratio
        self.mask_cell = mask_patch_size // self.backbone.patch_size
        check_cell_size(self.backbone.grid_size, self.mask_cell, f"{type(self).__name__} mask_patch_size "
                        f"{mask_patch_size} at image size {self.image_size}, patch {self.backbone.patch_size}")
        width = self.backbone.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)
        self.head = nn.Linear(width, self.backbone.patch_size ** 2 * self.in_chans)

    def loader_views(self) -> v2.Compose:
        """SimMIM's view: RandomResizedCrop(scale 0.67-1, ratio 3/4-4/3, bilinear) + horizontal flip."""
        return v2.Compose([
            v2.PILToTensor(),
            RegionResizedCrop(self.image_size, scale=(0.67, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
            v2.RandomHorizontalFlip(),
        ])

    def draw_mask(self, batch_size: int, device: torch.device, noise: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) SimMIM mask, 1 = replaced by the mask token; `noise` (B, cells) fixes the draw."""
        return simmim_masking(batch_size, self.backbone.grid_size, self.mask_cell, self.mask_ratio, noise=noise,
                              device=device)

    def encode_masked(self, images: torch.Tensor, mask: torch.Tensor, drop_path_keep: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """(B, prefix + L, D): every patch encoded, masked ones as the mask token; `drop_path_keep` (depth, 2, B)
        fixes the stochastic-depth draws (`backbone.draw_drop_path_keep`)."""
        return self.backbone.forward_masked(images, mask, self.mask_token, drop_path_keep=drop_path_keep)

    def predict_pixels(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(tokens[:, self.backbone.num_prefix_tokens:])

    def forward(self, images: torch.Tensor, noise: torch.Tensor | None = None,
                drop_path_keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the per-patch prediction (B, L, p*p*C) and the mask (B, L), 1 = masked."""
        mask = self.draw_mask(images.shape[0], images.device, noise)
        return self.predict_pixels(self.encode_masked(images, mask, drop_path_keep)), mask

    def compute_losses(self, views: torch.Tensor, noise: torch.Tensor | None = None,
                       drop_path_keep: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        pred, mask = self(views, noise, drop_path_keep)
        return {"mim": masked_l1(pred, self.backbone.patchify(views), mask)}
