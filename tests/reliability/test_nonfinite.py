"""A NaN/inf loss skips the optimiser step (and LUT's teacher update); too many in a row stop the run."""
import math

import lightning as L
import pytest
import torch

from lightning_mim.data import MIMDataModule
from lightning_mim.methods import LUT, MAE


def micro(method: type, max_nonfinite: int = 20) -> L.LightningModule:
    optim = dict(lr=1e-3, min_lr=1e-3, warmup_steps=0, max_consecutive_nonfinite=max_nonfinite)
    extra = dict(head_hidden_dim=32) if method is LUT else {}
    return method(backbone=dict(size="micro", img_size=16, patch_size=4), decoder_dim=32, decoder_depth=1,
                  decoder_heads=2, optim=optim, **extra)


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
        if isinstance(pl_module, LUT):
            self.teacher_before = self._snapshot(pl_module.teacher)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.changed[batch_idx] = not torch.equal(self.before, self._snapshot(pl_module.backbone))
        if isinstance(pl_module, LUT):
            self.teacher_changed[batch_idx] = not torch.equal(self.teacher_before, self._snapshot(pl_module.teacher))


def fit(model: L.LightningModule, callback: PoisonBatches, steps: int) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        max_steps=steps, callbacks=[callback])
    trainer.fit(model, datamodule=synthetic())
    return trainer


@pytest.mark.parametrize("method", [MAE, LUT], ids=["MAE", "LUT"])
def test_nan_batch_is_skipped_and_run_continues(method):
    callback = PoisonBatches({2, 3})
    model = micro(method)
    trainer = fit(model, callback, steps=6)
    assert callback.changed == {0: True, 1: True, 2: False, 3: False, 4: True, 5: True}
    if method is LUT:
        assert callback.teacher_changed == {0: True, 1: True, 2: False, 3: False, 4: True, 5: True}
    assert model.skipped_steps == 2
    assert trainer.callback_metrics["train/skipped_steps"].item() == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_consecutive_nan_batches_stop_the_run():
    callback = PoisonBatches({1, 2, 3, 4})
    with pytest.raises(FloatingPointError, match="NaN/inf on 3 consecutive steps"):
        fit(micro(MAE, max_nonfinite=3), callback, steps=8)
