"""Skipping the optimiser steps whose loss is NaN/inf, decided on the device so that the training step never waits
for the accelerator (no `.item()`, no `if tensor:`)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

SavedBuffers = list[tuple[torch.Tensor, torch.Tensor]]


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Fused Adam / AdamW / SGD leave parameters and state untouched when `optimizer.found_inf` is 1: the flag
    torch's GradScaler sets, read on the device inside the fused kernel."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and bool(optimizer.defaults.get("fused"))


class NonFiniteStepGuard:
    """Per optimiser step: `saved = snapshot_buffers(module)` before the forward pass, `observe(loss, saved, gather)`
    after it and `after_backward()` after its backward pass (every micro-batch of an accumulation window),
    `before_optimizer_step(optimizer)` once the gradients are reduced, `after_optimizer_step(optimizer)` after the
    step, which returns the step's skip flag as a 0-dim float tensor (1.0 = skipped) for gating other updates (an
    EMA teacher) on the device.

    A step is skipped on every rank when the loss is non-finite on any rank (`gather` is the module's `all_gather`)
    or on any micro-batch of the window. BatchNorm-style buffers that a non-finite forward pass changed are put back.
    With a fused optimiser the skip costs no host-device synchronisation; other optimisers (e.g. `fused=False`) read
    the flag on the host once per step and drop the gradients of a skipped step.

    The counts stay on the device; `skipped_steps` and `check_limit` synchronise, so call them on logging steps.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the consecutive non-finite step limit must be >= 1, got {limit}")
        self.limit = limit
        self.restored_count = 0
        self._pending: torch.Tensor | None = None
        self._to_restore: tuple[SavedBuffers, torch.Tensor] | None = None
        self._count: torch.Tensor | None = None
        self._run: torch.Tensor | None = None
        self._worst: torch.Tensor | None = None

    @staticmethod
    def snapshot_buffers(module: nn.Module) -> SavedBuffers:
        """Copies of the running statistics of the normalisation layers in training mode (BatchNorm, SyncBatchNorm,
        InstanceNorm with `track_running_stats`): the only buffers a forward pass updates. Fixed tables (sin-cos
        positions) are left out, so the hot path copies nothing for a plain ViT."""
        return [(buffer, buffer.detach().clone()) for submodule in module.modules()
                if submodule.training and getattr(submodule, "track_running_stats", False)
                for buffer in submodule.buffers(recurse=False)]

    @torch.no_grad()
    def observe(self, loss: torch.Tensor, saved: SavedBuffers,
                gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        nonfinite = (~torch.isfinite(loss.detach())).float().reshape(())
        if gather is not None:
            nonfinite = gather(nonfinite).amax()
        self._to_restore = (saved, nonfinite)
        self._pending = nonfinite if self._pending is None else torch.maximum(self._pending, nonfinite)

    @torch.no_grad()
    def after_backward(self) -> None:
        """Put back the buffers of a non-finite micro-batch; after the backward pass, which may need their
        versions (BatchNorm saves its running statistics for backward)."""
        if self._to_restore is None:
            return
        saved, nonfinite = self._to_restore
        self._to_restore = None
        for buffer, before in saved:
            buffer.copy_(torch.where(nonfinite.bool(), before, buffer))

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._pending is None:
            return
        if skips_on_device(optimizer):
            optimizer.found_inf = self._pending
        elif bool(self._pending):
            for group in optimizer.param_groups:
                for parameter in group["params"]:
                    parameter.grad = None

    @torch.no_grad()
    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
        skipped, self._pending = self._pending, None
        if skipped is None:
            return None
        if optimizer.__dict__.get("found_inf") is skipped:
            del optimizer.found_inf
        if self._count is None:
            self._count, self._run, self._worst = (torch.zeros_like(skipped) for _ in range(3))
        self._count += skipped
        self._run = (self._run + 1) * skipped
        self._worst = torch.maximum(self._worst, self._run)
        return skipped

    def count_tensor(self) -> torch.Tensor | None:
        """All skipped steps of the run, those before a resume included, on the device (no synchronisation);
        None before the first step."""
        return None if self._count is None else self._count + self.restored_count

    @property
    def skipped_steps(self) -> int:
        """All skipped steps of the run, those before a resume included (synchronises)."""
        count = self.count_tensor()
        return self.restored_count if count is None else int(count.item())

    def check_limit(self, global_step: int) -> None:
        """Raise when some `limit` consecutive steps were skipped since the start (synchronises)."""
        worst = 0 if self._worst is None else int(self._worst.item())
        if worst >= self.limit:
            raise FloatingPointError(
                f"the training loss was NaN/inf on {worst} consecutive steps (limit {self.limit}, checked on logging "
                f"steps; global step {global_step}): stopping. Lower optim.lr or check the data; "
                f"optim.max_consecutive_nonfinite sets this limit")
