"""Linear probing of a frozen pre-trained encoder (MAE's linprobe recipe) and the classifier plumbing it shares with
fine-tuning: the per-step lr schedule (`lightning_mim.schedules`, as in pre-training), top-1 / top-5 metrics and
the `train/*`, `val/*` tags."""
from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, Callable, Literal

import lightning as L
import torch
import torch.nn as nn
from timm.optim import Lars
from torchmetrics import SumMetric
from torchmetrics.classification import MulticlassAccuracy
from torchvision.transforms import v2

from lightning_mim.backbone import BackboneConfig, MIMViT
from lightning_mim.eval.weights import load_encoder_state, load_into
from lightning_mim.methods.base import OptimConfig, is_logging_step, to_plain
from lightning_mim.schedules import StepSchedule


class ClassifierModule(StepSchedule, L.LightningModule, abc.ABC):
    """Shared by `LinearProbe` and `FineTune`: `forward(images) -> logits`, accuracy metrics, the lr schedule.

    Subclasses implement `forward`, `training_loss(images, labels)`, `optimizer_groups()` (groups may carry an
    `lr_scale`, as timm's layer-decay groups do) and `build_optimizer(groups, lr)`.
    """

    def __init__(self, backbone: BackboneConfig | dict[str, Any], num_classes: int, optim: OptimConfig) -> None:
        super().__init__()
        self.backbone_config = BackboneConfig.coerce(backbone)
        self.num_classes = num_classes
        self.optim_config = optim
        self.peak_lr: float | None = None
        top_k = min(5, num_classes)
        self.val_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_top5 = MulticlassAccuracy(num_classes, top_k=top_k, average="micro")
        self.val_images = SumMetric()  # images scored, summed over DDP ranks

    @property
    def image_size(self) -> int:
        return self.backbone_config.img_size

    @property
    def in_chans(self) -> int:
        return self.backbone_config.in_chans

    @abc.abstractmethod
    def training_loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss of one training batch."""

    @abc.abstractmethod
    def optimizer_groups(self) -> list[dict[str, Any]]:
        """Parameter groups of the optimiser (an `lr_scale` entry scales the group's lr)."""

    @abc.abstractmethod
    def build_optimizer(self, groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
        """The optimiser over `groups` at peak lr `lr`."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = self.training_loss(images, labels)
        if is_logging_step(self.trainer):
            # a host copy for the progress bar, which Lightning turns into a number after every batch
            self.log("train/loss", loss.detach().cpu(), prog_bar=True, batch_size=images.shape[0])
            # the lr of the groups at scale 1 (the head under layer decay)
            lr = max(group["lr"] for group in self.trainer.optimizers[0].param_groups)
            self.log("train/lr", lr, batch_size=images.shape[0])
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.val_top1(logits, labels)
        self.val_top5(logits, labels)
        self.log("val/loss", nn.functional.cross_entropy(logits, labels), sync_dist=True, batch_size=images.shape[0])
        self.log("val/top1", self.val_top1, prog_bar=True, batch_size=images.shape[0])
        self.log("val/top5", self.val_top5, batch_size=images.shape[0])
        self.val_images.update(images.shape[0])
        self.log("val/images", self.val_images, batch_size=images.shape[0])

    def configure_optimizers(self) -> dict[str, Any]:
        config = self.optim_config
        self.peak_lr = config.peak_lr(self.effective_batch_size()) if config.lr is None else config.lr
        groups = self.optimizer_groups()
        for group in groups:
            group["lr"] = self.peak_lr * group.get("lr_scale", 1.0)
        optimizer = self.build_optimizer(groups, self.peak_lr)
        peak, schedule = self.peak_lr, self.lr_schedule(self.peak_lr)
        # LambdaLR multiplies each group's initial lr (peak x lr_scale) by the schedule relative to the peak.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step) / peak)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def linear_probe_optim(**overrides: Any) -> OptimConfig:
    """MAE's linprobe recipe: blr 0.1 with the linear rule (/256), no weight decay, 10 warm-up epochs (of 90)."""
    return OptimConfig(**({"base_lr": 0.1, "lr_scaling": "linear", "lr_reference_batch": 256, "warmup_epochs": 10.0,
                           "weight_decay": 0.0, "min_lr": 0.0} | overrides))


class LinearProbe(ClassifierModule):
    """Frozen encoder (no grad, always in eval mode) + BatchNorm1d(affine=False, eps=1e-6) + Linear, trained with LARS.

    pool: "avg" (mean of the patch tokens after the final norm; MAE's `--global_pool` linprobe instead averages before
    the norm and applies a fresh frozen LayerNorm) or "cls" (MAE's default). `pretrained`: a checkpoint read by
    `weights.load_encoder_state` (None keeps the random initialisation). `optim` overrides `linear_probe_optim()`;
    `momentum` is LARS' momentum (MAE: 0.9).
    """

    def __init__(self, backbone: BackboneConfig | dict[str, Any], num_classes: int, pretrained: str | None = None,
                 pool: Literal["avg", "cls"] = "avg", optim: OptimConfig | dict[str, Any] | None = None,
                 momentum: float = 0.9, head_init_std: float = 0.01) -> None:
        optim = optim if isinstance(optim, OptimConfig) else linear_probe_optim(**(optim or {}))
        super().__init__(backbone, num_classes, optim)
        self.save_hyperparameters(to_plain({"backbone": self.backbone_config, "num_classes": num_classes,
                                            "pretrained": pretrained, "pool": pool, "optim": optim,
                                            "momentum": momentum, "head_init_std": head_init_std}))
        if pool not in ("avg", "cls"):
            raise ValueError(f"unknown pool {pool!r}: choose 'avg' or 'cls'")
        self.pool, self.momentum = pool, momentum
        self.encoder = MIMViT(self.backbone_config)
        if pretrained is not None:
            state, report = load_encoder_state(Path(pretrained), self.backbone_config)
            load_into(self.encoder, state, report)
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        width = self.encoder.embed_dim
        self.head = nn.Sequential(nn.BatchNorm1d(width, affine=False, eps=1e-6), nn.Linear(width, num_classes))
        nn.init.trunc_normal_(self.head[1].weight, std=head_init_std)
        nn.init.zeros_(self.head[1].bias)

    def train(self, mode: bool = True) -> "LinearProbe":
        super().train(mode)
        self.encoder.eval()
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.encoder.pooled_features(images, self.pool)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def training_loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(self(images), labels)

    def optimizer_groups(self) -> list[dict[str, Any]]:
        # MAE's LARS scales the update of every matrix by the trust ratio even with weight decay 0 (timm only does so
        # with always_adapt); vectors (the bias) get plain momentum SGD without weight decay.
        weights = [p for p in self.head.parameters() if p.ndim > 1]
        vectors = [p for p in self.head.parameters() if p.ndim <= 1]
        return [{"params": weights, "weight_decay": self.optim_config.weight_decay, "always_adapt": True},
                {"params": vectors, "weight_decay": 0.0, "always_adapt": False}]

    def build_optimizer(self, groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
        return Lars(groups, lr=lr, momentum=self.momentum, weight_decay=self.optim_config.weight_decay)

    def train_transform(self, mean: tuple[float, ...], std: tuple[float, ...]) -> Callable:
        """MAE linprobe: RandomResizedCrop (bicubic, default scale 0.08-1) + horizontal flip."""
        return v2.Compose([
            v2.PILToTensor(),
            v2.RandomResizedCrop(self.image_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ])


__all__ = ["ClassifierModule", "LinearProbe", "linear_probe_optim"]
