"""LUT: learning with unmasked tokens (Kim, Chun, Heo, Han; ECCV 2024), MAE plus a loss on the visible tokens.

Each image gives two views (DeiT-III simple crop; view 2 also colour jitter and one of grayscale / solarize / blur).
One noise draw masks both views at 75 % with disjoint kept sets. View 1 is reconstructed exactly as in MAE (L_MIM).
The student's visible tokens of each view are mean-pooled (cls excluded) and go through a projector and a predictor,
once per view so BatchNorm statistics stay per view. An EMA teacher (encoder + projector, always in eval mode, BN on
running statistics EMA'd from the student's) encodes both views unmasked and applies its projector only. L_BC pulls
the student's prediction of view i to the teacher's embedding of view j != i with 2 - 2 cos. Loss = L_MIM + 0.25 L_BC.

Where the views are made: with the data's `augment_on: device` (the recipes' choice) the loader workers only decode,
resize and crop (`LUTCrops`, uint8) and view 2's photometric ops run batched on the training device
(`augment_views`, per-sample draws from the device's generator, which checkpoints save); `augment_on: loader` runs
the paper's per-image PIL pipeline (`LUTViews`) in the workers, the reference the batched ops are tested against
(tests/test_augment.py: within one 8-bit level per op, hue and blur within PIL's 8-bit HSV and box-blur
approximations). The batched jitter keeps torchvision's random order of its four ops, drawn per image.

Where this follows the docs of naver-ai/lut rather than its released code:
- the recipe values (docs/PRETRAIN.md), not the parser defaults: w_bc 0.25 (the released `--w_b` flag is dead
  because the engine reads `args.w_bc`), momentum 0.996 -> 1, BN in the heads, norm_pix_loss on;
- the teacher is a registered submodule, so it is saved in and restored from every checkpoint (the released resume
  calls undefined functions and silently keeps a freshly initialised teacher).

Lightning specifics:
- The EMA update runs in `optimizer_step`, right after each optimiser step Lightning takes, with momentum
  `cosine_momentum(epoch * len(loader) + batch_idx, T)`, the official micro-batch index (batch_idx is the last
  micro-batch of the accumulation window) and T = the run's micro-batches (`momentum_horizon`). It is not in
  `on_train_batch_end` because callbacks' `on_train_batch_end` (a step-based ModelCheckpoint) run before the
  module's, and would save a teacher one update behind its student. Lightning steps on an epoch's incomplete last
  accumulation window, which the official loop discards (its trap 20); that step also updates the teacher.
- Under DDP set `trainer.sync_batchnorm: true` (the paper converts the whole model to SyncBatchNorm); Lightning then
  converts the heads' BatchNorm, and the teacher's, whose eval mode is kept by the conversion.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn as nn
from PIL import Image, ImageFilter
from torchvision.transforms import v2

from lightning_mim.augment import (JitterDraw, apply_where, blur_radius, color_jitter, draw_apply, draw_choice,
                                   draw_color_jitter, gaussian_blur, grayscale, one_of, solarize)
from lightning_mim.backbone import BackboneConfig
from lightning_mim.heads import ProjectionMLP
from lightning_mim.losses import byol_loss, masked_mse
from lightning_mim.masking import check_paired_mask_ratio, paired_disjoint_masking
from lightning_mim.methods.base import (OptimConfig, check_momentum, cosine_momentum, ema_update_, is_logging_step,
                                        make_teacher)
from lightning_mim.methods.mae import MAE


class RandomGaussianBlur:
    """PIL Gaussian blur with radius ~ U(low, high) (3-Augment's blur); the radius can be passed in."""

    def __init__(self, low: float = 0.1, high: float = 2.0) -> None:
        self.low, self.high = low, high

    def __call__(self, image: Image.Image, radius: float | None = None) -> Image.Image:
        if radius is None:
            radius = self.low + (self.high - self.low) * torch.rand(()).item()
        return image.filter(ImageFilter.GaussianBlur(radius))

    def __repr__(self) -> str:
        return f"RandomGaussianBlur(radius=U({self.low}, {self.high}))"


# View 2's photometric augmentation (3-Augment after the simple crop): ColorJitter(0.4, 0.4, 0.2, 0.1) with p 0.8,
# then one of grayscale / solarize at 128 / Gaussian blur with radius ~ U(0.1, 2.0), chosen uniformly.
JITTER = (0.4, 0.4, 0.2, 0.1)
JITTER_P = 0.8
SOLARIZE_THRESHOLD = 128
BLUR_RADIUS = (0.1, 2.0)


class LUTViews:
    """PIL image -> (view 1, view 2), normalised float tensors (`augment_on="loader"`, the reference pipeline).

    Both views: Resize(size, bicubic) of the shorter side, RandomCrop(size, padding 4, reflect), horizontal flip,
    drawn independently per view. View 2 also gets ColorJitter(0.4, 0.4, 0.2, 0.1) with p 0.8, then exactly one of
    grayscale / solarize (threshold 128) / Gaussian blur, chosen uniformly. The ops run on the PIL image, as in the
    paper's code. With one channel, colour jitter reduces to brightness and contrast and grayscale is the identity.
    """

    def __init__(self, image_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        colour = len(mean) == 3
        # the resize draws nothing at random, so both views share one (the slowest op of view 1)
        self.resize = v2.Resize(image_size, interpolation=v2.InterpolationMode.BICUBIC)
        crop = v2.Compose([v2.RandomCrop(image_size, padding=4, padding_mode="reflect"), v2.RandomHorizontalFlip()])
        to_tensor = v2.Compose([v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
        jitter = v2.ColorJitter(*JITTER) if colour else v2.ColorJitter(*JITTER[:2])
        grayscale = v2.Grayscale(num_output_channels=3) if colour else v2.Identity()
        self.view1 = v2.Compose([crop, to_tensor])
        self.view2 = v2.Compose([
            crop,
            v2.RandomApply([jitter], p=JITTER_P),
            v2.RandomChoice([grayscale, v2.RandomSolarize(threshold=SOLARIZE_THRESHOLD, p=1.0),
                             RandomGaussianBlur(*BLUR_RADIUS)]),
            to_tensor,
        ])

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        resized = self.resize(image)
        return self.view1(resized), self.view2(resized)


class WindowPaddedCrop(v2.RandomCrop):
    """RandomCrop(size, padding, padding_mode="reflect") that, on tensors, reflects only the few rows and columns of
    the crop window that lie outside the image instead of padding the whole image first: the same draws and the
    same output, without the float round trip that reflect padding takes on uint8 images (measured 0.05 instead of
    0.39 ms per 224-px view on one core)."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, torch.Tensor) or not params["needs_pad"]:
            return super().transform(inpt, params)
        pad_left, pad_top = params["padding"][:2]
        height, width = inpt.shape[-2:]
        top, left = params["top"] - pad_top, params["left"] - pad_left
        bottom, right = top + params["height"], left + params["width"]
        window = inpt[..., max(top, 0):min(bottom, height), max(left, 0):min(right, width)]
        window = _reflect_pad(window, -1, max(-left, 0), max(right - width, 0))
        return _reflect_pad(window, -2, max(-top, 0), max(bottom - height, 0))


def _reflect_pad(image: torch.Tensor, dim: int, before: int, after: int) -> torch.Tensor:
    """torch's "reflect" padding (the edge not repeated) of `before` / `after` entries along one dimension."""
    if not before and not after:
        return image
    size = image.shape[dim]
    parts = [image.narrow(dim, 1, before).flip(dim)] if before else []
    parts.append(image)
    if after:
        parts.append(image.narrow(dim, size - 1 - after, after).flip(dim))
    return torch.cat(parts, dim)


class LUTCrops:
    """PIL image -> (view 1, view 2) uint8 tensors: LUTViews' geometry only (`augment_on="device"`; view 2's colour
    augmentation then runs batched in `LUT.augment_views`). The same crops and flips as LUTViews for the same
    random draws; the shared resize runs on the uint8 tensor (about 4x faster than PIL's, within a few 8-bit levels
    of it: both are antialiased bicubic)."""

    def __init__(self, image_size: int) -> None:
        self.resize = v2.Compose([v2.PILToTensor(), v2.Resize(image_size, interpolation=v2.InterpolationMode.BICUBIC,
                                                              antialias=True)])
        self.crop = v2.Compose([WindowPaddedCrop(image_size, padding=4, padding_mode="reflect"),
                                v2.RandomHorizontalFlip()])

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        resized = self.resize(image)
        return self.crop(resized), self.crop(resized)


class ColourDraws(NamedTuple):
    """Per-sample draws of view 2's augmentation: whether the jitter applies (B,), its draws, the chosen one of
    grayscale / solarize / blur (B,) as 0 / 1 / 2, and the blur radius (B,)."""

    jitter_applied: torch.Tensor
    jitter: JitterDraw
    choice: torch.Tensor
    blur_radius: torch.Tensor


def draw_colour(batch: int, colour: bool, device: torch.device | str | None = None,
                generator: torch.Generator | None = None) -> ColourDraws:
    """View 2's augmentation draws for `batch` images, on `device` (one channel: no saturation or hue jitter)."""
    jitter = JITTER if colour else (*JITTER[:2], 0.0, 0.0)
    low, high = BLUR_RADIUS
    return ColourDraws(draw_apply(batch, JITTER_P, device, generator),
                       draw_color_jitter(batch, *jitter, device=device, generator=generator),
                       draw_choice(batch, 3, device, generator),
                       low + (high - low) * torch.rand(batch, device=device, generator=generator))


def augment_view2(images: torch.Tensor, draws: ColourDraws) -> torch.Tensor:
    """LUTViews' view-2 photometric augmentation, batched, on [0, 1] images (B, C, H, W): jitter where applied,
    then each sample's one of grayscale / solarize / Gaussian blur (sigma = PIL's radius)."""
    jittered = apply_where(draws.jitter_applied, color_jitter(images, draws.jitter, hue=images.shape[1] == 3), images)
    return one_of(draws.choice, grayscale(jittered), solarize(jittered, SOLARIZE_THRESHOLD / 255),
                  gaussian_blur(jittered, draws.blur_radius, blur_radius(BLUR_RADIUS[1])))


def broader_context_loss(prediction1: torch.Tensor, prediction2: torch.Tensor, target1: torch.Tensor,
                         target2: torch.Tensor) -> torch.Tensor:
    """L_BC, cross-view only: 0.5 * (mean d(p2, z1) + mean d(p1, z2)) with d = 2 - 2 cos; targets detached."""
    return 0.5 * (byol_loss(prediction2, target1) + byol_loss(prediction1, target2))


class LUTStudentOutput(NamedTuple):
    """pred (B, L, p*p*C) for view 1 and its mask (B, L); latents (B, prefix + K, D) of both masked views;
    predictions (B, D_head) of both views."""

    pred: torch.Tensor
    mask: torch.Tensor
    latent1: torch.Tensor
    latent2: torch.Tensor
    prediction1: torch.Tensor
    prediction2: torch.Tensor


@dataclass
class LUTOptimConfig(OptimConfig):
    """OptimConfig whose defaults are LUT's: lr = base_lr * sqrt(effective batch / 16), i.e. base_lr * sqrt(eff) / 4.

    A separate class so that a partial override (`--model.optim.base_lr ...`) keeps the square-root rule."""

    lr_scaling: Literal["linear", "sqrt", "none"] = "sqrt"
    lr_reference_batch: int = 16


class LUT(MAE):
    """LUT pre-training. Defaults are the ViT-B/16 recipe: MAE decoder 512 x 8, 75 % masking, heads 4096 wide,
    teacher momentum 0.996 -> 1, loss weights mim 1.0 and bc 0.25, lr = base_lr * sqrt(effective batch / 16).

    `forward` is MAE's single-view masked reconstruction (used by `reconstruct`); training uses `forward_student`
    and `forward_teacher`. Fine-tuning takes the student `backbone`; the teacher lives under `teacher.*`.
    """

    default_loss_weights = {"mim": 1.0, "bc": 0.25}
    loss_scales = {"bc": "feature"}

    def __init__(self, backbone: BackboneConfig | dict | None = None, optim: LUTOptimConfig | dict | None = None,
                 loss_weights: dict[str, float] | None = None, feature_pool: Literal["avg", "cls"] = "avg",
                 mask_ratio: float = 0.75, norm_pix_loss: bool = True, decoder_dim: int = 512,
                 decoder_depth: int = 8, decoder_heads: int = 16, head_hidden_dim: int = 4096,
                 head_out_dim: int | None = None, momentum_base: float = 0.996, momentum_final: float = 1.0) -> None:
        """head_out_dim: projector / predictor output width (None: the encoder width, 768 for ViT-B)."""
        check_paired_mask_ratio(mask_ratio)
        check_momentum(momentum_base, momentum_final)
        optim = optim if isinstance(optim, OptimConfig) else LUTOptimConfig(**(optim or {}))
        super().__init__(backbone, optim, loss_weights, feature_pool, mask_ratio, norm_pix_loss,
                         decoder_dim, decoder_depth, decoder_heads)
        self.momentum_base, self.momentum_final = momentum_base, momentum_final
        width = self.backbone.embed_dim
        out_dim = head_out_dim or width
        self.projector = ProjectionMLP(width, head_hidden_dim, out_dim)
        self.predictor = ProjectionMLP(out_dim, head_hidden_dim, out_dim)
        self.teacher = make_teacher(self._teacher_source())

    def _teacher_source(self) -> nn.ModuleDict:
        """The student parts the teacher copies, under the teacher's own key names."""
        return nn.ModuleDict({"backbone": self.backbone, "projector": self.projector})

    def train_transform(self, mean: tuple[float, ...], std: tuple[float, ...]) -> LUTViews:
        return LUTViews(self.image_size, mean, std)

    def loader_views(self) -> LUTCrops:
        return LUTCrops(self.image_size)

    def augment_views(self, views: tuple[torch.Tensor, torch.Tensor] | list[torch.Tensor],
                      draws: ColourDraws | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """View 2's colour jitter and one of grayscale / solarize / blur, batched on the device; view 1 as it is."""
        view1, view2 = views
        if draws is None:
            draws = draw_colour(view2.shape[0], view2.shape[1] == 3, view2.device)
        return view1, augment_view2(view2, draws)

    def validation_views(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return images, images

    def _pool(self, latent: torch.Tensor) -> torch.Tensor:
        return latent[:, self.backbone.num_prefix_tokens:].mean(dim=1)

    def forward_student(self, view1: torch.Tensor, view2: torch.Tensor,
                        noise: torch.Tensor | None = None) -> LUTStudentOutput:
        """Both views masked with one noise draw (disjoint kept sets), two encoder calls, heads once per view."""
        draw = paired_disjoint_masking(view1.shape[0], self.backbone.num_patches, self.mask_ratio, noise=noise,
                                       device=view1.device)
        latent1 = self.backbone.forward_kept(view1, draw.keep_idx1)
        latent2 = self.backbone.forward_kept(view2, draw.keep_idx2)
        prediction1 = self.predictor(self.projector(self._pool(latent1)))
        prediction2 = self.predictor(self.projector(self._pool(latent2)))
        return LUTStudentOutput(self.decoder(latent1, draw.restore_idx), draw.mask1, latent1, latent2,
                                prediction1, prediction2)

    @torch.no_grad()
    def forward_teacher(self, view1: torch.Tensor, view2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher embeddings (B, D_head) of both full views: mean of all patch tokens, then the projector only."""
        backbone, projector = self.teacher["backbone"], self.teacher["projector"]
        target1 = projector(self._pool(backbone.forward_full(view1)))
        target2 = projector(self._pool(backbone.forward_full(view2)))
        return target1, target2

    def compute_losses(self, views: tuple[torch.Tensor, torch.Tensor] | list[torch.Tensor],
                       noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        view1, view2 = views
        student = self.forward_student(view1, view2, noise)
        target1, target2 = self.forward_teacher(view1, view2)
        return {"mim": masked_mse(student.pred, self.target(view1), student.mask),
                "bc": broader_context_loss(student.prediction1, student.prediction2, target1, target2)}

    def eval_mode_modules(self) -> list[nn.Module]:
        """The teacher: always in eval mode (its BatchNorm uses the EMA running statistics)."""
        return [self.teacher]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if any(module.training for module in self.teacher.modules()):
            raise RuntimeError("the LUT teacher is in train mode; it must stay in eval mode (its BatchNorm uses the "
                               "EMA running statistics). Something called .train() on it directly")
        return super().training_step(batch, batch_idx)

    @torch.no_grad()
    def update_teacher(self, momentum: float, skipped: torch.Tensor | None = None) -> None:
        """teacher <- m * teacher + (1 - m) * student over every state-dict entry, BN buffers included; unchanged
        where `skipped` (the optimiser step's device-side flag) is 1."""
        ema_update_(self.teacher, self._teacher_source(), momentum, skipped)

    def momentum_horizon(self) -> int:
        """T of the momentum schedule in micro-batches: epochs * len(loader), or max_steps * accumulation when the
        step limit ends the run first."""
        trainer = self.trainer
        per_epoch = trainer.num_training_batches
        limits = []
        if trainer.max_epochs not in (None, -1):
            limits.append(trainer.max_epochs * per_epoch)
        if trainer.max_steps != -1:
            limits.append(trainer.max_steps * trainer.accumulate_grad_batches)
        if not limits or math.isinf(per_epoch):
            raise ValueError("the teacher momentum schedule needs a finite run and a train loader with a length: "
                             "set trainer.max_epochs or trainer.max_steps")
        return max(1, int(min(limits)))

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        index = epoch * self.trainer.num_training_batches + batch_idx
        momentum = cosine_momentum(index, self.momentum_horizon(), self.momentum_base, self.momentum_final)
        self.update_teacher(momentum, skipped=self.last_step_skipped)
        if is_logging_step(self.trainer):
            self.log("train/teacher_momentum", momentum)
