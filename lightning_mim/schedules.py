"""The per-step learning-rate schedule: its shapes (warm-up + cosine, warm-up + steps) and `StepSchedule`, which
turns an `OptimConfig` and the trainer's run length into the lr of each optimiser step, for pre-training methods
and for the classifiers of linear probing and fine-tuning alike."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from lightning_mim.methods.base import OptimConfig


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, peak: float, final: float = 0.0) -> float:
    """Linear warm-up from 0 to `peak` over `warmup_steps`, then half-cosine from `peak` to `final` at `total_steps`."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_multistep(step: int, warmup_steps: int, peak: float, milestones: tuple[int, ...], rate: float) -> float:
    """Linear warm-up from 0 to `peak` over `warmup_steps`, then `peak * rate ** (milestones passed)`."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    return peak * rate ** sum(step >= milestone for milestone in milestones)


class StepSchedule:
    """Mixin for a LightningModule with an `optim_config` (`OptimConfig`): the effective batch, the run's step
    counts and the lr of each optimiser step, all read from the attached trainer and DataModule."""

    optim_config: OptimConfig

    def effective_batch_size(self) -> int:
        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "batch_size"):
            raise RuntimeError("the lr scaling rule needs the per-device batch size: train with a MIMDataModule "
                               "or set optim.lr to an absolute value")
        return datamodule.batch_size * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def total_steps(self) -> int:
        return max(1, int(self.trainer.estimated_stepping_batches))

    def steps_per_epoch(self) -> float:
        return self.total_steps() / max(1, self.trainer.max_epochs or 1)

    def warmup_steps(self) -> int:
        if self.optim_config.warmup_steps is not None:
            return self.optim_config.warmup_steps
        return int(round(self.optim_config.warmup_epochs * self.steps_per_epoch()))

    def lr_schedule(self, peak: float) -> Callable[[int], float]:
        """The lr of each optimiser step, peaking at `peak`, as the configured schedule gives it."""
        config, warmup, total = self.optim_config, self.warmup_steps(), self.total_steps()
        if config.schedule == "multistep":
            milestones = tuple(int(round(epoch * self.steps_per_epoch())) for epoch in config.decay_epochs)
            return lambda step: warmup_multistep(step, warmup, peak, milestones, config.decay_rate)
        decay_end = total - int(round(config.cooldown_epochs * self.steps_per_epoch()))
        if config.cooldown_epochs and decay_end <= warmup:
            raise ValueError(f"optim.cooldown_epochs {config.cooldown_epochs} leaves no cosine decay: the run has "
                             f"{total} steps ({self.steps_per_epoch():g} per epoch) and {warmup} warm-up steps; "
                             f"lower cooldown_epochs (0 for a run bounded by max_steps)")
        return lambda step: warmup_cosine(step, decay_end, warmup, peak, config.min_lr)
