"""A NaN/inf loss skips the optimiser step (and LUT's teacher update) on the device; too many in a row stop the run
at the next logging step."""
import math

import lightning as L
import pytest
import torch

from lightning_mim.data import MIMDataModule
from lightning_mim.methods import MAE
from lightning_mim.nonfinite import NonFiniteStepGuard
from micro_methods import METHODS, micro_method


def micro(method: type, max_nonfinite: int = 20, fused: bool | None = None) -> L.LightningModule:
    optim = dict(lr=1e-3, min_lr=1e-3, warmup_steps=0, max_consecutive_nonfinite=max_nonfinite, fused=fused)
    return micro_method(method, optim=optim)


def synthetic() -> MIMDataModule:
    return MIMDataModule(source="synthetic", synthetic_size=64, synthetic_image_size=16, batch_size=8,
                         num_workers=0, persistent_workers=False, knn_bank_size=8, val_subset=8)


class PoisonBatches(L.Callback):
    """Turns the images of the chosen batches into NaN and records the parameters around every step."""

    def __init__(self, poisoned: set[int]) -> None:
        self.poisoned = poisoned
        self.changed: dict[int, bool] = {}
        self.teacher_changed: dict[int, bool] = {}

    @staticmethod
    def _snapshot(module: torch.nn.Module) -> torch.Tensor:
        return torch.cat([p.detach().flatten().clone() for p in module.parameters()])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        views, _ = batch
        if batch_idx in self.poisoned:
            for view in views if isinstance(views, (list, tuple)) else [views]:
                view.fill_(math.nan)
        self.before = self._snapshot(pl_module.backbone)
        if hasattr(pl_module, "teacher"):
            self.teacher_before = self._snapshot(pl_module.teacher)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.changed[batch_idx] = not torch.equal(self.before, self._snapshot(pl_module.backbone))
        if hasattr(pl_module, "teacher"):
            self.teacher_changed[batch_idx] = not torch.equal(self.teacher_before, self._snapshot(pl_module.teacher))


def fit(model: L.LightningModule, callback: PoisonBatches, steps: int, log_every_n_steps: int = 50,
        accumulate: int = 1) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        max_steps=steps, callbacks=[callback], log_every_n_steps=log_every_n_steps,
                        accumulate_grad_batches=accumulate)
    trainer.fit(model, datamodule=synthetic())
    return trainer


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
@pytest.mark.parametrize("method", METHODS, ids=lambda cls: cls.__name__)
def test_nan_batch_is_skipped_and_run_continues(method, fused):
    callback = PoisonBatches({2, 3})
    model = micro(method, fused=fused)
    trainer = fit(model, callback, steps=6, log_every_n_steps=5)
    assert trainer.optimizers[0].defaults["fused"] is fused
    assert callback.changed == {0: True, 1: True, 2: False, 3: False, 4: True, 5: True}
    if hasattr(model, "teacher"):
        assert callback.teacher_changed == {0: True, 1: True, 2: False, 3: False, 4: True, 5: True}
    assert model.skipped_steps == 2
    assert trainer.callback_metrics["train/skipped_steps"].item() == 2  # logged at step 5
    assert all(torch.isfinite(p).all() for p in model.parameters())
    state = trainer.optimizers[0].state
    assert {int(state[p]["step"]) for p in model.parameters() if p.requires_grad} == {4}


def test_a_nan_micro_batch_skips_its_whole_accumulation_window():
    callback = PoisonBatches({3})  # the second micro-batch of the second window
    model = micro(MAE)
    fit(model, callback, steps=3, accumulate=2)
    assert callback.changed == {0: False, 1: True, 2: False, 3: False, 4: False, 5: True}
    assert model.skipped_steps == 1


def test_consecutive_nan_batches_stop_the_run_at_a_logging_step():
    callback = PoisonBatches({1, 2, 3, 4})
    with pytest.raises(FloatingPointError, match="NaN/inf on 3 consecutive steps"):
        fit(micro(MAE, max_nonfinite=3), callback, steps=8, log_every_n_steps=1)
    assert max(callback.changed) == 2  # stopped inside batch 3, the third NaN batch in a row


def test_consecutive_nan_batches_are_reported_at_the_end_of_a_run_without_logging_step():
    callback = PoisonBatches({1, 2, 3, 4})
    with pytest.raises(FloatingPointError, match="NaN/inf on 4 consecutive steps"):
        fit(micro(MAE, max_nonfinite=3), callback, steps=6, log_every_n_steps=50)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
def test_guard_restores_batchnorm_statistics_and_skips_the_update(fused):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused, foreach=None if fused else True)
    guard = NonFiniteStepGuard(limit=5)

    def step(inputs):
        saved = guard.snapshot_buffers(model)
        loss = model(inputs).square().mean()
        guard.observe(loss, saved)
        loss.backward()
        guard.after_backward()
        guard.before_optimizer_step(optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return guard.after_optimizer_step(optimizer)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert step(torch.full((8, 4), math.nan)).item() == 1.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert "found_inf" not in optimizer.__dict__
    assert step(torch.randn(8, 4)).item() == 0.0
    after = model.state_dict()
    assert not torch.equal(before["1.running_mean"], after["1.running_mean"])
    assert not torch.equal(before["0.weight"], after["0.weight"])
    assert after["1.num_batches_tracked"].item() == 1  # the skipped forward pass's increment was put back
    assert guard.skipped_steps == 1
