"""Checkpointing that never leaves `last.ckpt` behind the final weights."""
from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class MIMCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, plus: when training ends between two scheduled saves (`max_steps` or `max_time`
    reached mid-epoch), `last.ckpt` is rewritten with the final state. Lightning 2.6 only writes it at the end of
    training if no checkpoint was saved before, so a run stopped mid-epoch would keep the last epoch's weights."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        else:
            super().on_train_end(trainer, pl_module)
