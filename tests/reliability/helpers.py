"""Callbacks the subprocess runs of the reliability tests load by class path (`helpers.<Name>`)."""
import os
import signal
import time

import lightning as L

from lightning_mim.callbacks import RequeueAtStepBoundary


class LossRecorder(L.Callback):
    """Appends `global_step loss` to a text file after every optimiser step."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with open(self.path, "a") as handle:
            handle.write(f"{trainer.global_step} {outputs['loss'].item():.10g}\n")


class RankRecorder(L.Callback):
    """Appends `global_step loss generator` to `<path>.<rank>` after every optimiser step: this rank's loss and a
    digest of its torch generator state (which the masks and the device augmentations draw from)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import hashlib

        import torch

        digest = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()[:16]
        with open(f"{self.path}.{trainer.global_rank}", "a") as handle:
            handle.write(f"{trainer.global_step} {outputs['loss'].item():.10g} {digest}\n")


class KillAtStep(L.Callback):
    """SIGKILLs its own process at the start of the batch after `step` (the checkpoint of `step` is on disk)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class DieOnRank(L.Callback):
    """Rank `rank` exits abruptly (no cleanup) at the start of step `step`."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            os._exit(3)


class Announce(L.Callback):
    """Creates the file `path` once `step` optimiser steps are done, so a test knows when to send a signal. With
    `await_signal`, the run then waits (up to `timeout` s) until the signal has reached this process's
    `RequeueAtStepBoundary`, so a slow delivery on a loaded machine cannot let the run finish first."""

    def __init__(self, path: str, step: int, await_signal: bool = False, timeout: float = 600.0) -> None:
        self.path, self.step, self.await_signal, self.timeout = path, step, await_signal, timeout

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        open(self.path, "w").close()
        if self.await_signal:
            requeue = next(callback for callback in trainer.callbacks if isinstance(callback, RequeueAtStepBoundary))
            deadline = time.monotonic() + self.timeout
            while requeue.received is None and time.monotonic() < deadline:
                time.sleep(0.1)


class PoisonOnRank(L.Callback):
    """Rank `rank` turns its images into NaN at the start of step `step`."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            batch[0].fill_(float("nan"))


class RecordParameterChanges(L.Callback):
    """Writes `<path>.<rank>`: one line a step, `step changed sum`, whether the parameters changed in the step and
    their sum after it."""

    def __init__(self, path: str) -> None:
        self.path = path

    @staticmethod
    def _flat(pl_module):
        import torch

        return torch.cat([p.detach().flatten() for p in pl_module.parameters()]).clone()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = self._flat(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        after = self._flat(pl_module)
        with open(f"{self.path}.{trainer.global_rank}", "a") as handle:
            handle.write(f"{trainer.global_step} {int(not bool((after == self.before).all()))} "
                         f"{float(after.double().sum()):.12g}\n")


class SignalAtStep(L.Callback):
    """Sends `signal` (a name) to its own process in the middle of step `step`, on every rank or on rank `rank`."""

    def __init__(self, step: int, signal: str = "SIGUSR1", rank: int | None = None) -> None:
        self.step, self.signal, self.rank = step, signal, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step - 1 and self.rank in (None, trainer.global_rank):
            os.kill(os.getpid(), getattr(signal, self.signal))
