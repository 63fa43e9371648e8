"""Input / masked input / reconstruction image grids in TensorBoard."""
from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torchvision.utils import make_grid

from lightning_mim.callbacks.mode import ModeGuard

ROWS = ("input", "masked", "reconstruction")


class ReconstructionImages(L.Callback):
    """Writes a grid of `num_images` validation images (rows: input, masked, reconstruction from
    `pl_module.reconstruct`, un-normalised with the datamodule's mean/std and clamped to [0, 1]) to every
    TensorBoard logger under `val/reconstruction` at `trainer.global_step`, on rank 0. A method may name other rows
    and another tag with the attributes `reconstruction_rows` (keys of its `reconstruct` output, each (B, C, H, W) of
    one size) and `reconstruction_tag` (Beyond Masking: input, degraded, target, reconstruction in `val/degradation`).

    The images are the first `num_images` of the first validation batch, cached once so every grid shows the same
    images. During `fit` it runs when (epoch + 1) is a multiple of `every_n_epochs`.
    """

    def __init__(self, num_images: int = 8, every_n_epochs: int = 1) -> None:
        if num_images < 1 or every_n_epochs < 1:
            raise ValueError(f"need num_images >= 1 and every_n_epochs >= 1, got {num_images}, {every_n_epochs}")
        self.num_images = num_images
        self.every_n_epochs = every_n_epochs
        self.images: torch.Tensor | None = None

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.images is None and trainer.is_global_zero and batch_idx == 0 and dataloader_idx == 0:
            # a copy, so the cache does not keep the whole batch alive
            self.images = batch[0][: self.num_images].detach().to("cpu", copy=True)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or self.images is None:
            return
        if trainer.state.fn == TrainerFn.FITTING and (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        writers = [logger.experiment for logger in trainer.loggers if hasattr(logger.experiment, "add_image")]
        if not writers:
            return
        with ModeGuard(pl_module), torch.no_grad(), trainer.precision_plugin.forward_context():
            outputs = pl_module.reconstruct(self.images.to(pl_module.device))
        if outputs is None:  # nothing to show (a token method without its tokenizer)
            return
        datamodule = trainer.datamodule
        shape = (1, -1, 1, 1)
        mean = torch.tensor(datamodule.mean_for(pl_module.in_chans), dtype=torch.float32).view(shape)
        std = torch.tensor(datamodule.std_for(pl_module.in_chans), dtype=torch.float32).view(shape)
        keys = getattr(pl_module, "reconstruction_rows", ROWS)
        rows = [(outputs[key].detach().float().cpu() * std + mean).clamp(0.0, 1.0) for key in keys]
        grid = make_grid(torch.cat(rows), nrow=self.images.shape[0])
        tag = getattr(pl_module, "reconstruction_tag", "val/reconstruction")
        for writer in writers:
            writer.add_image(tag, grid, global_step=trainer.global_step)
