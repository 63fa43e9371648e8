"""Online weighted k-NN accuracy of the encoder's features, logged at the end of validation."""
from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from lightning_mim.callbacks.mode import ModeGuard
from lightning_mim.eval.knn import extract_features, gather_features, knn_accuracy


class KNNMonitor(L.Callback):
    """Logs `val/knn_top1` (and `val/knn_top5` with >= 5 classes): the bank is the datamodule's
    `knn_bank_dataloader()`, the queries its `val_dataloader()`, features from `pl_module.extract_features`.

    Each rank extracts every world_size-th batch of both loaders, the features are gathered, and every rank computes
    the same accuracy. During `fit` it runs when (epoch + 1) is a multiple of `every_n_epochs`; under `validate` it
    always runs. The last result is kept in `self.last`.
    """

    def __init__(self, k: int = 20, temperature: float = 0.07, every_n_epochs: int = 1) -> None:
        if k < 1 or temperature <= 0 or every_n_epochs < 1:
            raise ValueError(f"need k >= 1, temperature > 0 and every_n_epochs >= 1, got {k}, {temperature}, "
                             f"{every_n_epochs}")
        self.k = k
        self.temperature = temperature
        self.every_n_epochs = every_n_epochs
        self.last: dict[str, float] = {}

    def _due(self, trainer: L.Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        return trainer.state.fn != TrainerFn.FITTING or (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _features(self, trainer: L.Trainer, pl_module: L.LightningModule, loader: Any,
                  already_split: bool = False) -> tuple[torch.Tensor, ...]:
        """Features of this rank's share of `loader` (every world_size-th batch, unless the loader is already
        this rank's share), gathered from all ranks."""
        rank, world = (0, 1) if already_split else (trainer.global_rank, trainer.world_size)
        with trainer.precision_plugin.forward_context():
            features, labels = extract_features(pl_module.extract_features, loader, pl_module.device,
                                                rank=rank, world_size=world)
        return gather_features(features, labels, all_gather=pl_module.all_gather, world_size=trainer.world_size,
                               device=pl_module.device)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._due(trainer):
            return
        datamodule = trainer.datamodule
        if datamodule is None:
            raise RuntimeError("KNNMonitor needs a datamodule with knn_bank_dataloader() and val_dataloader()")
        with ModeGuard(pl_module), torch.no_grad():
            bank, bank_labels = self._features(trainer, pl_module, datamodule.knn_bank_dataloader())
            test, test_labels = self._features(trainer, pl_module, datamodule.val_dataloader(),
                                               already_split=getattr(datamodule, "val_split_by_rank", False))
            if bank.shape[0] == 0 or test.shape[0] == 0:
                rank_zero_warn("KNNMonitor: the k-NN bank or the validation set is empty; no k-NN accuracy logged")
                return
            self.last = knn_accuracy(bank.to(pl_module.device), bank_labels, test, test_labels,
                                     datamodule.num_classes, k=self.k, temperature=self.temperature)
        for name, value in self.last.items():
            pl_module.log(f"val/knn_{name}", value, sync_dist=False, rank_zero_only=False)
