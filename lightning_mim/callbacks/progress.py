"""Progress as text lines, for logs that are not a terminal."""
from __future__ import annotations

import time
from typing import Any

import lightning as L
from lightning.pytorch import Callback


class TextProgress(Callback):
    """When the trainer has no progress bar (the CLI turns it off where stdout is not a terminal, e.g. sbatch's
    `.out` file, which a bar floods with redraws), rank 0 prints one line every `every_n_steps` optimiser steps:
    step, epoch, loss and steps per second. The loss is read on those steps only (one device sync each): keep
    `every_n_steps` a multiple of `trainer.log_every_n_steps` (both 50 by default) so that they are logging steps."""

    def __init__(self, every_n_steps: int = 50) -> None:
        if every_n_steps < 1:
            raise ValueError(f"--progress.every_n_steps must be at least 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self._since: tuple[float, int] = (0.0, 0)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._since = (time.perf_counter(), trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if (trainer.progress_bar_callback is not None or not trainer.is_global_zero or step % self.every_n_steps
                or step == self._since[1]):
            return
        now = time.perf_counter()
        rate = (step - self._since[1]) / max(now - self._since[0], 1e-9)
        self._since = (now, step)
        total = f"/{trainer.max_steps}" if trainer.max_steps > 0 else ""
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        shown = f", loss {float(loss):.4g}" if loss is not None else ""
        print(f"step {step}{total} (epoch {trainer.current_epoch}){shown}, {rate:.2f} steps/s", flush=True)
