"""End-to-end fine-tuning of a pre-trained encoder as a timm VisionTransformer classifier, or timm's Beit for an
encoder with a relative position bias (MAE / LUT / SimMIM recipes):
layer-wise lr decay, AdamW, per-step warm-up + cosine, Mixup / CutMix with label smoothing, RandAugment and random
erasing, optional model EMA. Small grey images (the Fashion-MNIST demo) take `crop="padded"` instead: a random crop of
the image padded by `crop_padding` pixels and a horizontal flip, the usual augmentation of 28-32 px datasets.

Learning-rate rule, set through `optim` (an `OptimConfig`): MAE uses the linear rule lr = blr x eff_batch / 256
(`lr_scaling: linear`, `lr_reference_batch: 256`); LUT uses lr = blr x sqrt(eff_batch) / 8, i.e. the square-root rule
with reference batch 64 (`lr_scaling: sqrt`, `lr_reference_batch: 64`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn as nn
from PIL import Image, ImageOps
from timm.data import Mixup, create_transform
from timm.data.auto_augment import RandAugment
from timm.data.auto_augment import posterize as timm_posterize
from timm.data.random_erasing import RandomErasing
from timm.loss import SoftTargetCrossEntropy
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_layer_decay
from timm.utils import ModelEmaV3
from torchmetrics.classification import MulticlassAccuracy
from torchvision import transforms

from lightning_mim.backbone import BackboneConfig, MIMViT
from lightning_mim.backbone.timm_beit import build_timm_beit, to_beit_state
from lightning_mim.data.decode import ToMode
from lightning_mim.eval.linear import ClassifierModule
from lightning_mim.eval.weights import load_encoder_state, load_into
from lightning_mim.methods.base import OptimConfig, to_plain


def finetune_optim(**overrides: Any) -> OptimConfig:
    """MAE's ViT-B fine-tuning optimiser: blr 5e-4 (linear /256), AdamW betas (0.9, 0.999), wd 0.05, 5 warm-up
    epochs, min lr 1e-6."""
    return OptimConfig(**({"base_lr": 5e-4, "lr_scaling": "linear", "lr_reference_batch": 256, "warmup_epochs": 5.0,
                           "weight_decay": 0.05, "betas": (0.9, 0.999), "min_lr": 1e-6} | overrides))


def layer_decay_param_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """timm's layer-wise lr decay groups: scale layer_decay^(L+1-id) with patch_embed / cls_token / pos_embed id 0,
    block k id k+1 and everything after the blocks (norm, fc_norm, head) id L+1; no weight decay for 1-D parameters
    and `model.no_weight_decay()` (pos_embed, cls_token). A Beit's relative position tables are decayed, as in
    microsoft/SimMIM's and BEiT's fine-tuning (their no-decay lists hold pos_embed and cls_token only), where timm
    exempts them. (A shared table sits in timm's stem group, id 0; SimMIM's fine-tuning has one per block.)"""
    no_decay = {name for name in model.no_weight_decay() if "relative_position_bias_table" not in name}
    return param_groups_layer_decay(model, weight_decay, no_weight_decay_list=no_decay, layer_decay=layer_decay)


class FineTune(ClassifierModule):
    """timm `VisionTransformer` classifier initialised from a pre-trained encoder.

    global_pool: "avg" (mean of the patch tokens + a new fc_norm; the pretrained final norm is dropped, MAE / LUT
    default) or "token" (cls token after the pretrained norm). `pretrained`: a checkpoint read by
    `weights.load_encoder_state`; None starts from the project's random initialisation of the encoder. Mixup / CutMix
    with SoftTargetCrossEntropy (label smoothing inside Mixup); with mixup = cutmix = 0, cross-entropy with label
    smoothing. `ema_decay` adds a timm ModelEmaV3, evaluated as `val_ema/top1`.

    An encoder with a relative position bias (`backbone.rel_pos_bias`) becomes timm's `Beit`; `rel_pos_bias`
    ("shared" / "per_block") sets its layout there, None keeps the pre-training's: "per_block" copies a shared table
    to every block, as microsoft/SimMIM's fine-tuning does. It has no effect on an encoder without one.

    `crop`: "random_resized" (MAE's views, see `train_transform`) or "padded" (random crop with `crop_padding`
    zero pixels each side + flip + random erasing; no RandAugment, so `auto_augment` must be null).
    """

    def __init__(self, backbone: BackboneConfig | dict[str, Any], num_classes: int, pretrained: str | None = None,
                 global_pool: Literal["avg", "token"] = "avg", drop_path_rate: float = 0.1,
                 layer_decay: float = 0.75, optim: OptimConfig | dict[str, Any] | None = None,
                 mixup: float = 0.8, cutmix: float = 1.0, mixup_prob: float = 1.0, mixup_switch_prob: float = 0.5,
                 mixup_mode: str = "batch", smoothing: float = 0.1,
                 auto_augment: str | None = "rand-m9-mstd0.5-inc1", re_prob: float = 0.25,
                 ema_decay: float | None = None, head_init_std: float = 2e-5,
                 rel_pos_bias: Literal["shared", "per_block"] | None = None,
                 crop: Literal["random_resized", "padded"] = "random_resized", crop_padding: int = 4) -> None:
        optim = optim if isinstance(optim, OptimConfig) else finetune_optim(**(optim or {}))
        super().__init__(backbone, num_classes, optim)
        self.save_hyperparameters(to_plain({
            "backbone": self.backbone_config, "num_classes": num_classes, "pretrained": pretrained,
            "global_pool": global_pool, "drop_path_rate": drop_path_rate, "layer_decay": layer_decay, "optim": optim,
            "mixup": mixup, "cutmix": cutmix, "mixup_prob": mixup_prob, "mixup_switch_prob": mixup_switch_prob,
            "mixup_mode": mixup_mode, "smoothing": smoothing, "auto_augment": auto_augment, "re_prob": re_prob,
            "ema_decay": ema_decay, "head_init_std": head_init_std, "rel_pos_bias": rel_pos_bias, "crop": crop,
            "crop_padding": crop_padding}))
        if global_pool not in ("avg", "token"):
            raise ValueError(f"unknown global_pool {global_pool!r}: choose 'avg' or 'token'")
        if rel_pos_bias not in (None, "shared", "per_block"):
            raise ValueError(f"unknown rel_pos_bias {rel_pos_bias!r}: choose 'shared', 'per_block' or null (keep)")
        if crop not in ("random_resized", "padded"):
            raise ValueError(f"unknown crop {crop!r}: choose 'random_resized' or 'padded'")
        if crop == "padded" and auto_augment is not None:
            raise ValueError(f"crop 'padded' takes no RandAugment (auto_augment {auto_augment!r}): set auto_augment: "
                             f"null, or crop: random_resized")
        self.layer_decay, self.auto_augment, self.re_prob = layer_decay, auto_augment, re_prob
        self.crop, self.crop_padding = crop, crop_padding
        head = {"num_classes": num_classes, "global_pool": global_pool, "drop_path_rate": drop_path_rate}
        has_rel_pos = self.backbone_config.rel_pos_bias != "none"
        self.model = (build_timm_beit(self.backbone_config, rel_pos_bias, **head) if has_rel_pos else
                      VisionTransformer(**(self.backbone_config.timm_kwargs_full() | head)))
        source = Path(pretrained) if pretrained is not None else MIMViT(self.backbone_config).state_dict()
        state, report = load_encoder_state(source, self.backbone_config, global_pool=global_pool == "avg")
        if has_rel_pos:
            state = to_beit_state(state, self.backbone_config, rel_pos_bias)
        self.load_report = load_into(self.model, state, report, allow_missing=("head.*", "fc_norm.*"))
        nn.init.trunc_normal_(self.model.head.weight, std=head_init_std)
        nn.init.zeros_(self.model.head.bias)
        self.mixup_fn = None
        if mixup > 0 or cutmix > 0:
            self.mixup_fn = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=mixup_prob,
                                  switch_prob=mixup_switch_prob, mode=mixup_mode, label_smoothing=smoothing,
                                  num_classes=num_classes)
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        else:
            self.criterion = nn.CrossEntropyLoss(label_smoothing=smoothing)
        self.model_ema = ModelEmaV3(self.model, decay=ema_decay) if ema_decay is not None else None
        self.ema_updated_at_step = 0
        if self.model_ema is not None:
            self.val_ema_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def training_loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.mixup_fn is not None:
            images, labels = self.mixup_fn(images, labels)
        return self.criterion(self(images), labels)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # once per optimiser step: under gradient accumulation global_step only moves on the last micro-batch
        if self.model_ema is not None and self.global_step != self.ema_updated_at_step:
            self.model_ema.update(self.model, step=self.global_step)
            self.ema_updated_at_step = self.global_step

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        if self.model_ema is not None:
            images, labels = batch
            self.val_ema_top1(self.model_ema(images), labels)
            self.log("val_ema/top1", self.val_ema_top1, batch_size=images.shape[0])

    def optimizer_groups(self) -> list[dict[str, Any]]:
        return layer_decay_param_groups(self.model, self.optim_config.weight_decay, self.layer_decay)

    def build_optimizer(self, groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
        config = self.optim_config
        return torch.optim.AdamW(groups, lr=lr, betas=config.betas, eps=config.eps,
                                 fused=config.fused_on(self.device))

    def train_transform(self, mean: tuple[float, ...], std: tuple[float, ...]) -> Callable:
        """MAE / LUT fine-tuning views through timm's `create_transform`: bicubic RandomResizedCrop, flip,
        RandAugment (`auto_augment`), random erasing (pixel mode, one erase, probability `re_prob`); no colour jitter.

        timm's RandAugment works on RGB images only. A one-channel image therefore goes through the RGB pipeline as
        three equal channels (every op, bicubic resizing included, keeps them equal) and channel 0 is kept.
        """
        if self.crop == "padded":
            return self.padded_crop_transform(mean, std)
        if self.in_chans not in (1, 3):
            raise ValueError(f"fine-tuning views need 1 or 3 channels, got {self.in_chans}")
        channels = 3 // self.in_chans
        rgb = create_transform(self.image_size, is_training=True, color_jitter=None, auto_augment=self.auto_augment,
                               interpolation="bicubic", re_prob=self.re_prob, re_mode="pixel", re_count=1,
                               mean=tuple(mean) * channels, std=tuple(std) * channels)
        for step in rgb.transforms:
            if isinstance(step, RandAugment):
                for op in step.ops:
                    if op.aug_fn is timm_posterize:
                        op.aug_fn = posterize_zero_bits_black
        if self.in_chans == 3:
            return rgb
        return transforms.Compose([ToMode("RGB"), rgb, FirstChannel()])

    def padded_crop_transform(self, mean: tuple[float, ...], std: tuple[float, ...]) -> Callable:
        """`crop="padded"`: the image at the model's size (bicubic resize of the shorter side + centre crop, the
        evaluation's geometry for a square image), a random crop of it padded by `crop_padding` black pixels, a
        horizontal flip, then random erasing (pixel mode, one erase, probability `re_prob`)."""
        size = self.image_size
        return transforms.Compose([
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(size),
            transforms.RandomCrop(size, padding=self.crop_padding), transforms.RandomHorizontalFlip(),
            transforms.ToTensor(), transforms.Normalize(mean, std),
            RandomErasing(self.re_prob, mode="pixel", max_count=1, device="cpu")])


def posterize_zero_bits_black(image: Image.Image, bits_to_keep: int, **_: object) -> Image.Image:
    """timm's posterize, except at 0 bits: timm's 'inc1' posterize reaches 0 bits at magnitude 10 (m9 + mstd noise),
    which Pillow >= 12 rejects with a ValueError and older Pillow (MAE's setting) turned into a black image."""
    if bits_to_keep >= 8:
        return image
    if bits_to_keep < 1:
        return Image.new(image.mode, image.size)
    return ImageOps.posterize(image, bits_to_keep)


class FirstChannel:
    """(C, H, W) -> (1, H, W): the first channel."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image[:1]


__all__ = ["FineTune", "finetune_optim", "layer_decay_param_groups"]
