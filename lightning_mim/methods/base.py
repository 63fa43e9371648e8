"""What every method shares: the backbone, the optimiser and its per-step schedule, the EMA-teacher helpers, and one
set of TensorBoard tags (`train/loss`, `train_<scale>/loss_<term>`, `train/lr`, `val/loss`, ...) so runs of different
methods overlay."""
from __future__ import annotations

import abc
import copy
import math
import warnings
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any, Callable, Literal

import lightning as L
import torch
import torch.nn as nn
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from timm.optim import param_groups_weight_decay
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
from torchvision.transforms import v2

from lightning_mim.backbone import BackboneConfig, MIMViT
from lightning_mim.data.jpeg_crop import RegionResizedCrop
from lightning_mim.losses import denormalize_patches
from lightning_mim.nonfinite import NonFiniteStepGuard
from lightning_mim.reliability import check_same_experiment
from lightning_mim.schedules import StepSchedule


@dataclass
class OptimConfig:
    """AdamW with a per-step linear warm-up and cosine decay.

    The peak lr is `lr` when given, else `base_lr` scaled by the effective batch (per-device batch x devices x
    nodes x gradient accumulation): `lr_scaling="linear"` gives base_lr * eff / lr_reference_batch (MAE, 256),
    `"sqrt"` gives base_lr * sqrt(eff / lr_reference_batch) (LUT: reference 16 in pre-training, i.e. sqrt(eff)/4).
    Warm-up is `warmup_steps` optimiser steps when given, else `warmup_epochs` epochs. After it, `schedule="cosine"`
    decays to `min_lr` at the last step, or `cooldown_epochs` before it and stays there (timm's cooldown, MaPeT);
    `"multistep"` keeps the peak and multiplies it by `decay_rate` at each of
    `decay_epochs` (SimMIM: x 0.1 at epoch 700 of 800).
    """

    base_lr: float = 1.5e-4
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"
    lr_reference_batch: int = 256
    lr: float | None = None
    min_lr: float = 0.0
    warmup_epochs: float = 40.0
    warmup_steps: int | None = None
    cooldown_epochs: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    no_weight_decay: tuple[str, ...] = ()
    schedule: Literal["cosine", "multistep"] = "cosine"
    decay_epochs: tuple[float, ...] = ()
    decay_rate: float = 0.1
    fused: bool | None = None
    max_consecutive_nonfinite: int = 20

    def __post_init__(self) -> None:
        if self.lr_scaling not in ("linear", "sqrt", "none"):
            raise ValueError(f"unknown lr_scaling {self.lr_scaling!r}: choose 'linear', 'sqrt' or 'none'")
        for name in ("base_lr", "lr", "min_lr", "weight_decay"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value < 0):
                raise ValueError(f"optim.{name} must be a finite number >= 0, got {value}")
        if self.lr_reference_batch <= 0:
            raise ValueError(f"optim.lr_reference_batch must be positive, got {self.lr_reference_batch}")
        if self.cooldown_epochs < 0:
            raise ValueError(f"optim.cooldown_epochs must be >= 0, got {self.cooldown_epochs}")
        if self.warmup_epochs < 0 or (self.warmup_steps is not None and self.warmup_steps < 0):
            raise ValueError(f"warm-up must be >= 0, got warmup_epochs={self.warmup_epochs}, "
                             f"warmup_steps={self.warmup_steps}")
        if not all(0.0 <= beta < 1.0 for beta in self.betas):
            raise ValueError(f"optim.betas must lie in [0, 1), got {self.betas}")
        if self.schedule not in ("cosine", "multistep"):
            raise ValueError(f"unknown schedule {self.schedule!r}: choose 'cosine' or 'multistep'")
        if self.schedule == "multistep" and (not self.decay_epochs or min(self.decay_epochs) <= 0):
            raise ValueError(f"schedule 'multistep' needs positive decay_epochs (e.g. [700]), got {self.decay_epochs}")
        if not 0.0 < self.decay_rate <= 1.0:
            raise ValueError(f"optim.decay_rate must lie in (0, 1], got {self.decay_rate}")
        if self.max_consecutive_nonfinite < 1:
            raise ValueError(f"optim.max_consecutive_nonfinite must be >= 1, got {self.max_consecutive_nonfinite}")
        self.betas = tuple(self.betas)
        self.no_weight_decay = tuple(self.no_weight_decay)
        self.decay_epochs = tuple(sorted(self.decay_epochs))

    def fused_on(self, device: torch.device) -> bool:
        """`fused`, or by default whether torch has a fused AdamW kernel for this device type (CUDA and CPU among
        them): one kernel over all parameters (measured 6x faster than foreach on a ViT-S-sized set on 2 CPU
        cores), and it skips a non-finite step on the device (`NonFiniteStepGuard`)."""
        return self.fused if self.fused is not None else device.type in _get_fused_kernels_supported_devices()

    def peak_lr(self, effective_batch: int) -> float:
        if self.lr is not None:
            return self.lr
        if self.lr_scaling == "linear":
            return self.base_lr * effective_batch / self.lr_reference_batch
        if self.lr_scaling == "sqrt":
            return self.base_lr * math.sqrt(effective_batch / self.lr_reference_batch)
        return self.base_lr


def is_logging_step(trainer: L.Trainer) -> bool:
    """True on the training steps whose metrics Lightning writes (every `trainer.log_every_n_steps`). Training
    steps log only then: a value logged on other steps would be read on the host (a device synchronisation) or, for
    a Python number, copied to the device, for nothing."""
    return trainer._logger_connector.should_update_logs or bool(trainer.fast_dev_run)


def cosine_momentum(step: int, total_steps: int, base: float = 0.996, final: float = 1.0) -> float:
    """Teacher momentum, cosine from `base` at step 0 to `final` at `total_steps` (BYOL / DINO / LUT)."""
    check_momentum(base, final)
    return final - (final - base) * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


def check_momentum(base: float, final: float) -> None:
    """EMA momenta are weights of a convex combination: both must lie in [0, 1]."""
    for name, value in (("momentum_base", base), ("momentum_final", final)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"teacher {name} must lie in [0, 1] (e.g. 0.996 -> 1.0), got {value}")


def make_teacher(student: nn.Module) -> nn.Module:
    """An exact copy of `student` with no gradients, kept in eval mode."""
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    return teacher.eval()


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float, skipped: torch.Tensor | None = None,
                buffers: bool = True) -> None:
    """teacher <- m * teacher + (1 - m) * student over every state-dict entry, buffers included (BN running
    statistics); integer buffers (`num_batches_tracked`) are EMA'd and truncated back to their integer type.
    With `buffers=False` only parameters are averaged (MoCo v3: the teacher keeps its own BN statistics).

    `skipped`, a 0-dim tensor on the teacher's device, leaves the teacher exactly as it is where it is 1 (a
    skipped optimiser step) without reading the flag on the host."""
    student_state = student.state_dict()
    entries = teacher.state_dict() if buffers else dict(teacher.named_parameters())
    floats, sources, integers = [], [], []
    for name, value in entries.items():
        source = student_state[name].detach()
        if value.is_floating_point():
            floats.append(value)
            sources.append(source.to(value.dtype))
        else:
            integers.append((value, source))
    keep = None if skipped is None else skipped.bool()
    if floats:
        kept = momentum if keep is None else torch.where(keep, 1.0, momentum)
        added = 1.0 - momentum if keep is None else torch.where(keep, 0.0, 1.0 - momentum)
        torch._foreach_mul_(floats, kept)
        torch._foreach_add_(floats, torch._foreach_mul(sources, added))
    for value, source in integers:
        updated = (momentum * value.double() + (1.0 - momentum) * source.double()).to(value.dtype)
        value.copy_(updated if keep is None else torch.where(keep, value, updated))


def to_plain(value: Any) -> Any:
    """Dataclasses / namespaces -> dicts, recursively, so hyper-parameters are YAML- and weights_only-safe."""
    if is_dataclass(value) and not isinstance(value, type):
        return to_plain(asdict(value))
    if hasattr(value, "as_dict"):
        return to_plain(value.as_dict())
    if isinstance(value, dict):
        return {key: to_plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_plain(item) for item in value)
    return value


class MIMMethod(StepSchedule, L.LightningModule, abc.ABC):
    """Base LightningModule. A method implements `compute_losses(views) -> dict[str, Tensor]` (unweighted terms) and
    may override `loader_views` / `augment_views` / `train_transform`, `reconstruct` and `validation_views`.
    Total loss = sum of loss_weights[k] * term."""

    default_loss_weights: dict[str, float] = {}
    # the kind of each loss term (default "pixel"; "token": cross-entropy over a codebook, "feature": a loss between
    # embeddings): its tag is `<split>_<kind>/loss_<term>`, so terms of incomparable scales share no axis
    loss_scales: dict[str, str] = {}
    norm_pix_target = False  # True where the method predicts per-patch normalised pixels (MAE's norm_pix_loss)

    def __init__(self, backbone: BackboneConfig | dict | None = None, optim: OptimConfig | dict | None = None,
                 loss_weights: dict[str, float] | None = None, feature_pool: Literal["avg", "cls"] = "avg") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.save_hyperparameters(to_plain(dict(self.hparams)))
        self.backbone_config = BackboneConfig.coerce(backbone or {})
        self.optim_config = optim if isinstance(optim, OptimConfig) else OptimConfig(**(optim or {}))
        self.loss_weights = {**self.default_loss_weights, **(loss_weights or {})}
        self.feature_pool = feature_pool
        self.backbone = MIMViT(self.backbone_config)
        self.peak_lr: float | None = None
        self.nonfinite = NonFiniteStepGuard(self.optim_config.max_consecutive_nonfinite)
        self.last_step_skipped: torch.Tensor | None = None
        # values that are not loss terms (token accuracy), set by `compute_losses`, logged as train/<name>, val/<name>
        self.metrics: dict[str, torch.Tensor] = {}
        self._eval_mode_warning_silenced: warnings.catch_warnings | None = None

    def eval_mode_modules(self) -> list[nn.Module]:
        """Submodules that stay in eval mode while the method trains (an EMA teacher, a frozen tokenizer)."""
        return []

    def train(self, mode: bool = True) -> MIMMethod:
        """Switch the mode of every submodule but `eval_mode_modules`, which stay in eval mode."""
        super().train(mode)
        for module in self.eval_mode_modules():
            module.eval()
        return self

    def on_fit_start(self) -> None:
        """Lightning warns about every submodule in eval mode when training starts (`FitLoop.on_run_start`). When
        the method's `eval_mode_modules` are the only ones, that warning is silenced until `on_train_start`, which
        Lightning calls right after its check; any other module in eval mode changes the count and still warns."""
        meant = {id(sub) for module in self.eval_mode_modules() for sub in module.modules()}
        in_eval = [module for module in self.modules() if not module.training]
        if in_eval and all(id(module) in meant for module in in_eval):
            self._eval_mode_warning_silenced = warnings.catch_warnings()
            self._eval_mode_warning_silenced.__enter__()
            warnings.filterwarnings("ignore", message=rf"Found {len(in_eval)} module\(s\) in eval mode",
                                    category=PossibleUserWarning)

    def on_train_start(self) -> None:
        if self._eval_mode_warning_silenced is not None:
            self._eval_mode_warning_silenced.__exit__(None, None, None)
            self._eval_mode_warning_silenced = None
        self._set_data_epoch()  # a run resumed mid-epoch gets no on_train_epoch_start for that epoch

    def on_train_epoch_start(self) -> None:
        self._set_data_epoch()

    def _set_data_epoch(self) -> None:
        """Tell the data which epoch its skipped-sample count (`data/skipped_samples_epoch`) belongs to."""
        datamodule = self.trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "set_epoch"):
            datamodule.set_epoch(self.current_epoch)

    @property
    def image_size(self) -> int:
        return self.backbone_config.img_size

    @property
    def in_chans(self) -> int:
        return self.backbone_config.in_chans

    def loader_views(self) -> Callable:
        """The per-file part of the training views, run in the loader workers when the data augments on the device
        (`MIMDataModule(augment_on="device")`): PIL image -> uint8 tensor view(s), the geometric crop included; the
        rest runs batched on the device (`augment_views`, then the data's normalisation). Here MAE's
        RandomResizedCrop(0.2-1, bicubic) + horizontal flip; as a `RegionResizedCrop`, which decodes only the crop
        of a JPEG (`MIMDataModule(crop_decode=True)`). A method that overrides `train_transform` but not
        this keeps its views in the loader (`MIMDataModule` checks which class defines each)."""
        return v2.Compose([
            v2.PILToTensor(),
            RegionResizedCrop(self.image_size, scale=(0.2, 1.0), interpolation=v2.InterpolationMode.BICUBIC,
                              antialias=True),
            v2.RandomHorizontalFlip(),
        ])

    def train_transform(self, mean: tuple[float, ...], std: tuple[float, ...]) -> Callable:
        """The whole training view per image, in the loader workers (`augment_on="loader"`): `loader_views`, then
        scaling to [0, 1] and normalisation. A method whose `augment_views` is not the identity overrides this with
        its per-image (PIL) reference pipeline."""
        return v2.Compose([self.loader_views(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])

    def augment_views(self, views: Any, draws: Any = None) -> Any:
        """Batched photometric augmentation of a training batch's views, [0, 1] float images on the device, with
        per-sample parameters drawn on the device (`draws` passes them in); the identity here. The data calls it on
        training batches only (`MIMDataModule.on_after_batch_transfer`), before normalising."""
        return views

    @abc.abstractmethod
    def compute_losses(self, views: Any) -> dict[str, torch.Tensor]:
        """The method's unweighted loss terms for one training batch of views."""

    def validation_views(self, images: torch.Tensor) -> Any:
        """Turn an eval batch (one normalised view) into what `compute_losses` takes; None when the method cannot
        (a token method trained on precomputed ids without its tokenizer): then no validation loss is logged."""
        return images

    def loss_tag(self, split: str, term: str) -> str:
        """The TensorBoard tag of a loss term, grouped by its kind (`loss_scales`): e.g. `train_pixel/loss_mim`,
        `train_token/loss_mim`, `val_feature/loss_con`. `train/loss` and `val/loss` are the weighted totals."""
        return f"{split}_{self.loss_scales.get(term, 'pixel')}/loss_{term}"

    def weighted_total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.loss_weights.get(name, 1.0) * value for name, value in losses.items())

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """The weighted total loss. When it is NaN/inf on any rank the optimiser step is skipped on the device
        (`NonFiniteStepGuard`); values are logged on logging steps only, so other steps never wait for the device."""
        views, _ = batch
        saved_buffers = self.nonfinite.snapshot_buffers(self)
        losses = self.compute_losses(views)
        total = self.weighted_total(losses)
        self.nonfinite.observe(total, saved_buffers, self.all_gather)
        if is_logging_step(self.trainer):
            batch_size = (views[0] if isinstance(views, (tuple, list)) else views).shape[0]
            # a CPU copy for the progress bar: Lightning converts its values to numbers after every batch
            self.log("train/loss", total.detach().cpu(), prog_bar=True, batch_size=batch_size)
            for name, value in losses.items():
                self.log(self.loss_tag("train", name), value, batch_size=batch_size)
            for name, value in self.metrics.items():
                self.log(f"train/{name}", value, batch_size=batch_size)
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=batch_size)
            datamodule = self.trainer.datamodule
            if datamodule is not None and hasattr(datamodule, "skipped_samples"):
                self.log("data/skipped_samples", float(datamodule.skipped_samples), batch_size=batch_size)
                self.log("data/skipped_samples_epoch", float(datamodule.skipped_samples_epoch), batch_size=batch_size)
        return total

    def on_after_backward(self) -> None:
        self.nonfinite.after_backward()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.nonfinite.before_optimizer_step(optimizer)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.last_step_skipped = self.nonfinite.after_optimizer_step(getattr(optimizer, "optimizer", optimizer))
        if is_logging_step(self.trainer):
            self.nonfinite.check_limit(self.global_step)
            count = self.nonfinite.count_tensor()
            if count is not None:
                self.log("train/skipped_steps", count)

    def on_train_end(self) -> None:
        self.nonfinite.check_limit(self.global_step)

    @property
    def skipped_steps(self) -> int:
        return self.nonfinite.skipped_steps

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Also records the run (`<logger name>/<version>`, as in its log folder) for `lightning-mim evaluate`'s
        results, wherever the checkpoint is written or copied."""
        checkpoint["skipped_steps"] = self.nonfinite.skipped_steps
        logger = self.logger
        if logger is not None:
            version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
            checkpoint["run"] = f"{logger.name}/{version}"

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resuming `fit` requires the checkpoint's configuration (see `check_same_experiment`)."""
        if self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            datamodule = self.trainer.datamodule
            check_same_experiment(checkpoint, dict(self.hparams),
                                  dict(datamodule.hparams) if datamodule is not None else None)
        self.nonfinite.restored_count = int(checkpoint.get("skipped_steps", 0))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, _ = batch
        views = self.validation_views(images)
        if views is None:
            return
        losses = self.compute_losses(views)
        self.log("val/loss", self.weighted_total(losses), sync_dist=True, batch_size=images.shape[0])
        for name, value in losses.items():
            self.log(self.loss_tag("val", name), value, sync_dist=True, batch_size=images.shape[0])
        for name, value in self.metrics.items():
            self.log(f"val/{name}", value, sync_dist=True, batch_size=images.shape[0])

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The `val/reconstruction` rows: the input, the input with masked patches (mask = 1) blanked, and the input
        with the predictions pasted into them. For methods whose `forward(images)` returns the per-patch prediction
        (B, L, p*p*C) and the mask (B, L); a prediction of normalised patches (`norm_pix_target`) is shown with the
        true patch statistics put back."""
        pred, mask = self(images)
        patches = self.backbone.patchify(images).float()
        if self.norm_pix_target:
            pred = denormalize_patches(pred, patches)
        keep = 1.0 - mask.unsqueeze(-1)
        return {"input": images, "masked": self.backbone.unpatchify(patches * keep),
                "reconstruction": self.backbone.unpatchify(patches * keep + pred.float() * (1.0 - keep))}

    @torch.no_grad()
    def extract_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.pooled_features(images, self.feature_pool)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """timm's rule: no decay for 1-D parameters and biases (and names in `no_weight_decay`); frozen skipped."""
        return param_groups_weight_decay(self, self.optim_config.weight_decay,
                                          no_weight_decay_list=self.optim_config.no_weight_decay)

    def configure_optimizers(self) -> dict[str, Any]:
        config = self.optim_config
        if config.lr is None:
            self.peak_lr = config.peak_lr(self.effective_batch_size())
        else:
            self.peak_lr = config.lr
        optimizer = torch.optim.AdamW(self.parameter_groups(), lr=self.peak_lr, betas=config.betas, eps=config.eps,
                                      fused=config.fused_on(self.device))
        peak, schedule = self.peak_lr, self.lr_schedule(self.peak_lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step) / peak)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
