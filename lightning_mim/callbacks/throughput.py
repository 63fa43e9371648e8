"""Training throughput in images per second."""
from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn


class Throughput(L.Callback):
    """Logs `train/throughput_img_s` (all devices) and `train/throughput_img_s_per_device` every
    `log_every_n_steps` training batches, measured over the batches since the previous log and after the first
    `warmup_steps` batches of the fit. Images per batch = the first view's batch size; the total multiplies by the
    world size (every rank is assumed to see the same batch size, so no collective is needed).

    Time spent in validation is left out. On CUDA the device is synchronised only at the edges of a measurement
    window (end of warm-up, each logging step, validation start and end), never in other training steps. The values
    go straight to `trainer.loggers` (like Lightning's LearningRateMonitor), because `self.log` from a callback
    only reaches the logger on the trainer's own `log_every_n_steps` boundaries. `self.history` keeps every logged
    record.
    """

    def __init__(self, log_every_n_steps: int = 50, warmup_steps: int = 5) -> None:
        if log_every_n_steps < 1 or warmup_steps < 0:
            raise ValueError(f"need log_every_n_steps >= 1 and warmup_steps >= 0, got {log_every_n_steps}, "
                             f"{warmup_steps}")
        self.log_every_n_steps = log_every_n_steps
        self.warmup_steps = warmup_steps
        self.history: list[dict[str, float]] = []
        self._reset()

    def _reset(self) -> None:
        self._batches_seen = 0
        self._window_start: float | None = None  # None while the clock is stopped (warm-up, validation)
        self._window_seconds = 0.0
        self._window_batches = 0
        self._window_images = 0

    @staticmethod
    def _now(pl_module: L.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()
        if self.warmup_steps == 0:
            self._window_start = self._now(pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._batches_seen += 1
        if self._batches_seen <= self.warmup_steps:
            if self._batches_seen == self.warmup_steps:
                self._window_start = self._now(pl_module)
            return
        views = batch[0]
        self._window_images += (views[0] if isinstance(views, (tuple, list)) else views).shape[0]
        self._window_batches += 1
        if self._window_batches < self.log_every_n_steps:
            return
        now = self._now(pl_module)
        seconds = self._window_seconds + now - self._window_start
        per_device = self._window_images / seconds
        record = {"train/throughput_img_s": per_device * trainer.world_size,
                  "train/throughput_img_s_per_device": per_device}
        self.history.append({"step": float(trainer.global_step), **record})
        for logger in trainer.loggers:
            logger.log_metrics(record, step=trainer.global_step)
        self._window_start, self._window_seconds = now, 0.0
        self._window_batches = self._window_images = 0

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and self._window_start is not None:
            self._window_seconds += self._now(pl_module) - self._window_start
            self._window_start = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
        if fitting and self._batches_seen >= self.warmup_steps:
            self._window_start = self._now(pl_module)
