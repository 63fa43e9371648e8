"""Labelled image grids (input / masked input / prediction, ...) in TensorBoard."""
from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid

from lightning_mim.callbacks.mode import ModeGuard

GRIDS = {"val/reconstruction": ("input", "masked", "reconstruction")}
# the label drawn left of each row, by key of the method's `reconstruct` output (a method's `row_labels` overrides)
ROW_LABELS = {"reconstruction": "prediction", "degraded": "degraded+masked", "degraded_view": "degraded"}
MIN_TILE = 64  # tiles are scaled up (nearest) to at least this many pixels so small images stay readable
LABEL_WIDTH = 140
FONT_SIZE = 13


def labelled_grid(rows: list[torch.Tensor], labels: list[str]) -> torch.Tensor:
    """One (3, H, W) uint8 image: each row (N, C, h, w) in [0, 1] as a line of tiles scaled up to at least
    `MIN_TILE` pixels, with its label drawn in a strip on the left."""
    count, height = rows[0].shape[0], rows[0].shape[-2]
    scale = max(1, -(-MIN_TILE // height))
    tiles = torch.cat(rows).repeat_interleave(scale, -2).repeat_interleave(scale, -1)
    grid = make_grid(tiles, nrow=count, padding=2, pad_value=1.0)  # 3 channels, grey rows repeated
    pixels = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    canvas = Image.new("RGB", (LABEL_WIDTH + pixels.shape[1], pixels.shape[0]), "white")
    canvas.paste(Image.fromarray(pixels), (LABEL_WIDTH, 0))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default(size=FONT_SIZE)
    row_height = (pixels.shape[0] - 2) / len(rows)
    for index, label in enumerate(labels):
        draw.text((4, 2 + (index + 0.5) * row_height), label, fill="black", font=font, anchor="lm")
    return torch.from_numpy(np.array(canvas)).permute(2, 0, 1)


class ReconstructionImages(L.Callback):
    """Writes labelled grids of `num_images` validation images to every TensorBoard logger, on rank 0: by default
    `val/reconstruction` with the rows input, masked input and prediction from `pl_module.reconstruct`,
    un-normalised with the datamodule's mean/std and clamped to [0, 1]. A method may name other grids with the
    attribute `image_grids` (tag -> keys of its `reconstruct` output, each (B, C, H, W) of one size; Beyond Masking
    adds `val/degradation`) and other row labels with `row_labels` (key -> label).

    The images are the first `num_images` of the validation set, taken once so every grid shows the same images.
    During `fit` the grids are written after validation when (epoch + 1) is a multiple of `every_n_epochs`, and once
    more when training ends unless the last grid is already of the last step: so every run has one, whether or not it
    validated (`--trainer.limit_val_batches 0`, or runs shorter than a validation interval).
    """

    def __init__(self, num_images: int = 8, every_n_epochs: int = 1) -> None:
        if num_images < 1 or every_n_epochs < 1:
            raise ValueError(f"need num_images >= 1 and every_n_epochs >= 1, got {num_images}, {every_n_epochs}")
        self.num_images = num_images
        self.every_n_epochs = every_n_epochs
        self.images: torch.Tensor | None = None
        self.logged_step: int | None = None

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
        self.write_grids(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (not trainer.is_global_zero or self.logged_step == trainer.global_step
                or not any(hasattr(logger.experiment, "add_image") for logger in trainer.loggers)):
            return
        if self.images is None:
            self.images = self._first_validation_images(trainer)
        if self.images is not None:
            self.write_grids(trainer, pl_module)

    def _first_validation_images(self, trainer: L.Trainer) -> torch.Tensor | None:
        """The first `num_images` of the datamodule's validation loader (the images validation would show), or None
        without one."""
        datamodule = trainer.datamodule
        loader = datamodule.val_dataloader() if datamodule is not None and hasattr(datamodule, "val_dataloader") \
            else None
        for images, _ in loader or []:
            return images[: self.num_images].detach().to("cpu", copy=True)
        return None

    def write_grids(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
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
        labels = {**ROW_LABELS, **getattr(pl_module, "row_labels", {})}
        for tag, keys in getattr(pl_module, "image_grids", GRIDS).items():
            rows = [(outputs[key].detach().float().cpu() * std + mean).clamp(0.0, 1.0) for key in keys]
            grid = labelled_grid(rows, [labels.get(key, key) for key in keys])
            for writer in writers:
                writer.add_image(tag, grid, global_step=trainer.global_step)
        self.logged_step = trainer.global_step
