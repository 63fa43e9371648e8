"""SLURM requeue at a step boundary, so that the requeued job continues exactly as an uninterrupted one."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

HPC_CHECKPOINT = re.compile(r"hpc_ckpt_(\d+)\.ckpt")


class RequeueExit(SystemExit):
    """Ends a run whose state is saved and whose job is requeued: exit status 0, no traceback."""

    def __init__(self) -> None:
        super().__init__(0)


def hpc_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The `hpc_ckpt_<n>.ckpt` files of `folder`, by n (Lightning resumes a SLURM job from the last one)."""
    found = [(int(match.group(1)), path) for path in Path(folder).glob("hpc_ckpt_*.ckpt")
             if (match := HPC_CHECKPOINT.fullmatch(path.name))]
    return [path for _, path in sorted(found)]


def slurm_job_id() -> str:
    """`<array job>_<task>` for an array task (what scontrol takes), else SLURM_JOB_ID."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job is not None:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ["SLURM_JOB_ID"]


class RequeueAtStepBoundary(Callback):
    """Under SLURM, the time-limit signal (`--signal=USR1@<seconds>`, the `requeue_signal`) and SIGTERM (sent before
    the kill by a preemption or `scancel`) only set a flag. At the end of the optimiser step at which every rank knows
    of it, the run writes `hpc_ckpt_<n>.ckpt` into `trainer.default_root_dir` (Lightning's convention: a requeued
    job, keeping its id, resumes from the last one when fit gets no ckpt_path), rank 0 calls `scontrol requeue
    <job id>`, and every process exits with status 0 (`RequeueExit`) once the step's metrics are logged. The state
    is the one a checkpoint of ModelCheckpoint at that step holds, so the requeued run repeats and skips no batch.
    A run that reaches its end removes the hpc checkpoints of its folder.

    Lightning's own handler saves from inside the signal handler, in the middle of a step (one batch skipped per
    requeue): this callback's handler is installed before Lightning's, which then leaves the signal alone; also pass
    `SLURMEnvironment(auto_requeue=False)` in the trainer's plugins. Outside SLURM the callback does nothing.
    For a fine-tuning run: `Trainer(plugins=[SLURMEnvironment(auto_requeue=False)],
    callbacks=[RequeueAtStepBoundary()], default_root_dir=<a folder of this job and this fit>)` and `trainer.fit`
    without ckpt_path resumes a requeued job."""

    def __init__(self, requeue_signal: str = "SIGUSR1") -> None:
        self.requeue_signal = signal.Signals[requeue_signal]
        self.active = False
        self.received: str | None = None  # the name of the first signal received
        self.saved_at: int | None = None  # the step whose end was saved; the run exits at the next hook
        self._last_step = -1
        self._group: Any = None
        self._pending: tuple[Any, torch.Tensor] | None = None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.received = self.received or signal.Signals(signum).name

    def _install_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum in (self.requeue_signal, signal.SIGTERM):
                signal.signal(signum, self._on_signal)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.active = stage == "fit" and SLURMEnvironment.detect()
        if not self.active:
            return
        # installed before Lightning registers its handlers: it then leaves the requeue signal to this one
        self._install_handlers()
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            # a CPU group of its own: the flags never touch the accelerator's stream
            self._group = dist.new_group(backend="gloo")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.active:
            self._install_handlers()  # Lightning's SIGTERM handler (registered after setup) raises mid-epoch

    def _agreed(self) -> bool:
        """Whether every rank stops at this step. One process reads its own flag. Several processes: each step
        starts a non-blocking all-reduce (max) of this rank's flag over a gloo group and waits for the one started
        at the previous step, which has long finished (every rank started it a step ago): no host-device sync and
        no wait in the step, at the price of stopping one step after the signal (seconds, against SLURM's
        warning of a minute or more). Every rank reads the same reduced value, so all stop at the same step."""
        if self._group is None:
            return self.received is not None
        stop = False
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            stop = bool(flag.item())  # a CPU tensor: no device sync
            self._pending = None
        if not stop:
            flag = torch.tensor([int(self.received is not None)], dtype=torch.int32)
            self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True), flag)
        return stop

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # with gradient accumulation only the batch that stepped ends a step
        if not self.active or self.saved_at is not None or trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        if not self._agreed():
            return
        existing = hpc_checkpoints(trainer.default_root_dir)
        number = int(HPC_CHECKPOINT.fullmatch(existing[-1].name).group(1)) + 1 if existing else 1
        path = Path(trainer.default_root_dir) / f"hpc_ckpt_{number}.ckpt"
        trainer.save_checkpoint(path)
        self.saved_at = trainer.global_step
        rank_zero_info(f"{self.received or 'a signal on another rank'}: saved {path} at the end of step "
                       f"{trainer.global_step}")

    def _requeue_and_exit(self, trainer: L.Trainer) -> None:
        if self.saved_at is None:
            return
        if trainer.is_global_zero:
            job_id = slurm_job_id()
            result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
            if result.returncode:
                rank_zero_warn(f"`scontrol requeue {job_id}` failed ({result.stderr.strip()}); resume the run with "
                               f"--ckpt_path {hpc_checkpoints(trainer.default_root_dir)[-1]}")
            else:
                rank_zero_info(f"requeued SLURM job {job_id}; it resumes from step {self.saved_at}")
        raise RequeueExit()

    # the first hooks after the saved step's metrics are logged (and its validation, if any, has run)
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._requeue_and_exit(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        last_epoch = trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs
        if not (last_epoch or 0 <= trainer.max_steps <= trainer.global_step):
            self._requeue_and_exit(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Training is over: nothing to requeue (the end removes the checkpoint); the last flag exchange, which every
        rank started at the last step, is collected."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.active and trainer.is_global_zero:
            for path in hpc_checkpoints(trainer.default_root_dir):
                path.unlink()
