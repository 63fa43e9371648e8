"""SymMIM: symmetric masking strategy for masked image modeling (Nguyen and Park, ICPR 2024), SimMIM plus a momentum
contrastive loss between two fixed checkerboard masks (../shared/methods/symmim.md; no official code exists).

The online encoder sees the image under the fine checkerboard M1 (cells of one patch) with SimMIM's mask tokens,
reconstructs its masked patches (linear head, L1) and gives a query: cls token -> projector (3 layers) -> predictor
(2 layers). The momentum encoder, an EMA of the online encoder, its mask token and projector, sees the same image
under the coarse checkerboard M2 (cells of mask_patch_size / patch_size patches) and gives the key. InfoNCE with
temperature 0.2 pulls each query to its own image's key against the other images' keys, gathered over every rank.
Loss = L_mim + lambda L_con with lambda = 1 (`loss_weights.con`).

Every choice the paper leaves open (spec section 7) is an option whose default is the spec's: `mask_phase` (A1),
`mask_patch_size` (A2), `swap_scales` (A4), `recon_loss` (A6), `con_level` (A7), `con_token` (A8), `symmetric` (A10),
`temperature` / `momentum_base` (A11), `scale_2tau` (A12). Not an option: A9's second crop for the momentum branch
(both branches see the same view, the spec's default).

Lightning specifics: the momentum branch runs in train mode (its BatchNorm on batch statistics, as MoCo v3); the EMA
averages parameters only (MoCo v3) with m(t) = 1 - (1 - m0)(cos(pi t / T) + 1) / 2 over optimiser steps, right after
each step, and is skipped on the device with a skipped step. Under DDP set `trainer.sync_batchnorm: true`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn as nn
from lightning.pytorch.utilities import rank_zero_info

from lightning_mim.backbone import BackboneConfig
from lightning_mim.heads import ProjectionMLP
from lightning_mim.losses import info_nce, masked_l1, masked_mse, normalize_patches
from lightning_mim.masking import checkerboard_masking
from lightning_mim.methods.base import (
    OptimConfig, check_momentum, cosine_momentum, ema_update_, is_logging_step, make_teacher,
)
from lightning_mim.methods.simmim import SimMIM, SimMIMOptimConfig


@dataclass
class SymMIMOptimConfig(SimMIMOptimConfig):
    """SimMIM's optimiser defaults, except that the mask token is not decayed: symmim.md section 5 lists it with the
    cls token and position embedding (SimMIM's ViT decays it)."""

    no_weight_decay: tuple[str, ...] = ("mask_token", "backbone.cls_token", "backbone.pos_embed")


def gather_keys(keys: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Keys of every rank concatenated in rank order (no gradient), and this rank's offset into them."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return keys, 0
    gathered = [torch.empty_like(keys) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, keys.contiguous())
    return torch.cat(gathered), dist.get_rank() * keys.shape[0]


class SymMIM(SimMIM):
    """SymMIM pre-training. Defaults are the spec's ViT-B/16 choices: 32-px coarse cells, fixed mask phase,
    projector D -> 4096 -> 4096 -> 256, predictor 256 -> 4096 -> 256, temperature 0.2, momentum 0.99 -> 1."""

    default_loss_weights = {"mim": 1.0, "con": 1.0}
    loss_scales = {"con": "feature"}

    def __init__(self, backbone: BackboneConfig | dict | None = None, optim: SymMIMOptimConfig | dict | None = None,
                 loss_weights: dict[str, float] | None = None, feature_pool: Literal["avg", "cls"] = "avg",
                 mask_patch_size: int = 32, mask_phase: Literal["fixed", "random"] = "fixed",
                 swap_scales: bool = False, recon_loss: Literal["l1", "norm_pix_mse"] = "l1",
                 con_level: Literal["image", "patch"] = "image", con_token: Literal["cls", "mean"] = "cls",
                 symmetric: bool = False, head_hidden_dim: int = 4096, head_out_dim: int = 256,
                 temperature: float = 0.2, scale_2tau: bool = False, momentum_base: float = 0.99,
                 momentum_final: float = 1.0) -> None:
        """mask_phase "random" flips each image's mask of each branch to its complement with probability 1/2;
        swap_scales gives the online encoder the coarse mask and the momentum encoder the fine one; recon_loss
        "norm_pix_mse" is MAE's target instead of SimMIM's; con_level "patch" contrasts each patch with the same
        position of the momentum output against the image's other patches (ConMIM); con_token "mean" pools the
        patch tokens instead of taking the cls token; symmetric also contrasts online(M2) with momentum(M1)."""
        optim = optim if isinstance(optim, OptimConfig) else SymMIMOptimConfig(**(optim or {}))
        super().__init__(backbone, optim, loss_weights, feature_pool, mask_ratio=0.5, mask_patch_size=mask_patch_size)
        for name, value, choices in (("mask_phase", mask_phase, ("fixed", "random")),
                                     ("recon_loss", recon_loss, ("l1", "norm_pix_mse")),
                                     ("con_level", con_level, ("image", "patch")),
                                     ("con_token", con_token, ("cls", "mean"))):
            if value not in choices:
                raise ValueError(f"unknown {name} {value!r}: choose one of {choices}")
        if con_token == "cls" and con_level == "image" and not self.backbone.num_prefix_tokens:
            raise ValueError("con_token 'cls' needs a backbone with class_token: true, or set con_token 'mean'")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive (e.g. 0.2), got {temperature}")
        check_momentum(momentum_base, momentum_final)
        self.mask_phase, self.swap_scales, self.recon_loss = mask_phase, swap_scales, recon_loss
        self.norm_pix_target = recon_loss == "norm_pix_mse"
        self.con_level, self.con_token, self.symmetric = con_level, con_token, symmetric
        self.temperature, self.scale_2tau = temperature, scale_2tau
        self.momentum_base, self.momentum_final = momentum_base, momentum_final
        width = self.backbone.embed_dim
        self.projector = ProjectionMLP(width, head_hidden_dim, head_out_dim, num_layers=3, last_bn=True)
        self.predictor = ProjectionMLP(head_out_dim, head_hidden_dim, head_out_dim, num_layers=2)
        self.teacher = make_teacher(self._teacher_source()).train()  # the momentum encoder
        self.momentum_steps = 1

    def _teacher_source(self) -> nn.Module:
        """The online parts the momentum encoder copies, under its own key names."""
        source = nn.Module()
        source.backbone, source.projector, source.mask_token = self.backbone, self.projector, self.mask_token
        return source

    def scale_cells(self) -> tuple[int, int]:
        """Checkerboard cell sides (in patches) of the online and the momentum mask."""
        return (self.mask_cell, 1) if self.swap_scales else (1, self.mask_cell)

    def draw_phases(self, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.mask_phase == "fixed":
            return None
        return tuple(torch.randint(0, 2, (batch_size,), device=device) for _ in range(2))

    def masks(self, batch_size: int, device: torch.device,
              phases: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(online mask, momentum mask), each (B, L), 1 = masked. `phases` (two (B,) tensors of 0 / 1) fix the
        random phase draw; None draws it when mask_phase is "random"."""
        phases = phases if phases is not None else self.draw_phases(batch_size, device)
        return tuple(checkerboard_masking(batch_size, self.backbone.grid_size, cell,
                                          None if phases is None else phases[index], device)
                     for index, cell in enumerate(self.scale_cells()))

    def forward(self, images: torch.Tensor, phases: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The online branch's per-patch prediction (B, L, p*p*C) and its mask (B, L)."""
        online_mask, _ = self.masks(images.shape[0], images.device, phases)
        return self.predict_pixels(self.encode_masked(images, online_mask)), online_mask

    def embedding_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """What feeds the projector: (B, D) per image (cls token or mean of patches), or (B * L, D) per patch."""
        prefix = self.backbone.num_prefix_tokens
        if self.con_level == "patch":
            return tokens[:, prefix:].flatten(0, 1)
        return tokens[:, 0] if self.con_token == "cls" else tokens[:, prefix:].mean(dim=1)

    def contrast(self, query: torch.Tensor, key: torch.Tensor, batch_size: int) -> torch.Tensor:
        if self.con_level == "patch":  # negatives: the other patches of the same image
            return info_nce(query.view(batch_size, -1, query.shape[-1]), key.view(batch_size, -1, key.shape[-1]),
                            self.temperature, scale_2tau=self.scale_2tau)
        keys, offset = gather_keys(key)
        return info_nce(query, keys, self.temperature, offset, self.scale_2tau)

    def compute_losses(self, views: torch.Tensor, phases: tuple[torch.Tensor, torch.Tensor] | None = None,
                       drop_path_keep: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
                       ) -> dict[str, torch.Tensor]:
        """`phases` fixes the random mask phases; `drop_path_keep` the stochastic-depth draws (depth, 2, B) of the
        online and the momentum encoder (drop path is 0 in the spec; the momentum branch runs in train mode)."""
        batch_size = views.shape[0]
        online_mask, momentum_mask = self.masks(batch_size, views.device, phases)
        online_tokens = self.encode_masked(views, online_mask, drop_path_keep[0])
        patches = self.backbone.patchify(views)
        pred = self.predict_pixels(online_tokens)
        if self.recon_loss == "l1":
            mim = masked_l1(pred, patches, online_mask)
        else:
            mim = masked_mse(pred, normalize_patches(patches), online_mask)
        pairs = [(online_tokens, momentum_mask)]
        if self.symmetric:
            pairs.append((self.encode_masked(views, momentum_mask), online_mask))
        con = torch.stack([self.contrast(self.predictor(self.projector(self.embedding_tokens(tokens))),
                                         self.momentum_key(views, key_mask, drop_path_keep[1]), batch_size)
                           for tokens, key_mask in pairs]).mean()
        return {"mim": mim, "con": con}

    @torch.no_grad()
    def momentum_key(self, images: torch.Tensor, mask: torch.Tensor, drop_path_keep: torch.Tensor | None = None
                     ) -> torch.Tensor:
        teacher = self.teacher
        tokens = teacher.backbone.forward_masked(images, mask, teacher.mask_token, drop_path_keep=drop_path_keep)
        return teacher.projector(self.embedding_tokens(tokens))

    def on_fit_start(self) -> None:
        self.momentum_steps = self.total_steps()
        online, momentum = self.masks(1, self.device)
        count = online.shape[1]
        rank_zero_info(f"SymMIM masks: online {int(online.sum())} of {count} patches, momentum {int(momentum.sum())} "
                       f"of {count} ({100 * momentum.mean().item():.2f} %)")

    @torch.no_grad()
    def update_teacher(self, momentum: float, skipped: torch.Tensor | None = None) -> None:
        """θ_k <- m θ_k + (1 - m) θ_q over the parameters of the encoder, mask token and projector; unchanged
        where `skipped` (the optimiser step's device-side flag) is 1."""
        ema_update_(self.teacher, self._teacher_source(), momentum, skipped, buffers=False)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        momentum = cosine_momentum(self.global_step, self.momentum_steps, self.momentum_base, self.momentum_final)
        self.update_teacher(momentum, skipped=self.last_step_skipped)
        if is_logging_step(self.trainer):
            self.log("train/teacher_momentum", momentum)
