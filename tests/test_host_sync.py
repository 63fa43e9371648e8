"""Training steps between logging steps read no tensor value on the host: on a GPU each such read (`.item()`,
`if tensor:`, `float(tensor)`, `torch.tensor(number, device=...)` as Lightning's `self.log(name, float)` does) would
make the CPU wait for the device. Recorded on the CPU with a TorchFunctionMode, which sees every such call.

Lightning turns the progress bar's values into numbers after every batch; the method gives it host copies, made on
logging steps, and those conversions are left out of the record."""
import sys

import lightning as L
import pytest
import torch
from torch.overrides import TorchFunctionMode

from lightning_mim.data import MIMDataModule
from lightning_mim.methods import MAE
from lightning_mim.methods.base import is_logging_step
from micro_methods import METHODS, micro_method

HOST_READS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__,
              torch.Tensor.__index__, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu}
FROM_HOST = {torch.tensor, torch.as_tensor, torch.scalar_tensor}


class RecordHostReads(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_READS and not progress_bar_conversion():
            self.calls.append(func.__name__)
        elif func in FROM_HOST and "device" in kwargs:
            self.calls.append(func.__name__)
        return func(*args, **kwargs)


def progress_bar_conversion() -> bool:
    frame = sys._getframe(2)
    for _ in range(4):
        if frame is None:
            return False
        if frame.f_code.co_name == "convert_tensors_to_scalars":
            return True
        frame = frame.f_back
    return False


class HostReadsPerStep(L.Callback):
    """Records the host reads from the start of training to its end, per training batch: from the batch's start to
    the next one's (forward, backward, optimiser and scheduler steps, the EMA update, every callback's and the
    progress bar's work; the next batch comes from a loader worker, where decoding and augmenting reads CPU tensors
    as it should)."""

    def __init__(self) -> None:
        self.per_step: dict[int, list[str]] = {}

    def on_train_start(self, trainer, pl_module):
        self.mode = RecordHostReads()
        self.mode.__enter__()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.mode.calls = self.per_step.setdefault(trainer.global_step + 1, [])

    def on_train_end(self, trainer, pl_module):
        self.mode.__exit__(None, None, None)


def run(method: type, fused: bool | None, log_every_n_steps: int = 4, steps: int = 8) -> dict[int, list[str]]:
    model = micro_method(method, optim=dict(lr=1e-3, warmup_steps=2, fused=fused))
    data = MIMDataModule(source="synthetic", synthetic_size=64, synthetic_image_size=16, batch_size=8,
                         num_workers=1, persistent_workers=False, knn_bank_size=8, val_subset=8)
    recorder = HostReadsPerStep()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, limit_val_batches=0, max_steps=steps,
                        log_every_n_steps=log_every_n_steps, callbacks=[recorder])
    trainer.fit(model, datamodule=data)
    return recorder.per_step


@pytest.mark.parametrize("method", METHODS, ids=lambda cls: cls.__name__)
def test_no_host_reads_outside_logging_steps(method):
    per_step = run(method, fused=None)  # the default optimiser: fused AdamW
    assert sorted(per_step) == list(range(1, 9))
    logging_steps = {4, 8}
    for step, calls in per_step.items():
        if step in logging_steps:
            assert calls, "logging steps read the logged values: the recorder must see them"
        else:
            assert calls == [], f"step {step} read tensors on the host: {calls}"


def test_an_unfused_optimiser_reads_the_skip_flag_once_per_step():
    # (foreach AdamW also reads its step counts, which it keeps on the host)
    per_step = run(MAE, fused=False)
    assert {step: calls.count("__bool__") for step, calls in per_step.items() if step % 4} == {
        step: 1 for step in per_step if step % 4}


class CudaSyncIsAnError(L.Callback):
    """CUDA's own check: every synchronising call raises, from the start of a non-logging step to its end."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not is_logging_step(trainer):
            torch.cuda.set_sync_debug_mode("error")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", METHODS, ids=lambda cls: cls.__name__)
def test_no_cuda_synchronisation_outside_logging_steps(method):
    fit_raising_on_cuda_sync(micro_method(method, optim=dict(lr=1e-3, warmup_steps=2)))


def fit_raising_on_cuda_sync(model: L.LightningModule) -> None:
    """8 bf16 steps on the GPU, logging every 4th, where any CUDA synchronisation on the other steps raises."""
    data = MIMDataModule(source="synthetic", synthetic_size=64, synthetic_image_size=16, batch_size=8,
                         num_workers=1, persistent_workers=False, knn_bank_size=8, val_subset=8)
    trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", logger=False,
                        enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0, max_steps=8,
                        log_every_n_steps=4, callbacks=[CudaSyncIsAnError()])
    try:
        trainer.fit(model, datamodule=data)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert trainer.global_step == 8


def test_every_method_is_checked():
    assert {cls.__name__ for cls in METHODS} == {"BEiT", "BeyondMasking", "LUT", "MAE", "MaPeT", "SimMIM", "SymMIM"}
