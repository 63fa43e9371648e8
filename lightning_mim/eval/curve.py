"""The validation curve of `evaluate`'s linear probe and fine-tuning: one line per validated epoch appended to
`curve.csv` in the protocol's working folder (resume-safe: a rerun appends after the epochs already written), beside
the TensorBoard logs of the same run."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

CURVE_NAME = "curve.csv"
# The share of the validated epochs whose gain `late_gain` measures, and the fewest validated epochs it needs.
LATE_FRACTION = 0.25
LATE_MIN_EPOCHS = 4
CURVE_COLUMNS = ("epoch", "step", "val_top1", "val_top5", "val_loss", "train_loss", "lr")
METRICS = {"val_top1": "val/top1", "val_top5": "val/top5", "val_loss": "val/loss", "train_loss": "train/loss",
           "lr": "train/lr"}


class ValidationCurve(L.Callback):
    """Appends `epoch, step, val_top1, val_top5, val_loss, train_loss, lr` to `<folder>/curve.csv` after every
    validation (accuracies in %; train_loss and lr: their last logged values). An epoch re-run after a kill between
    its validation and its checkpoint appears twice; the last line of an epoch is the one that counts."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / CURVE_NAME

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics
        if trainer.sanity_checking or not trainer.is_global_zero or "val/top1" not in metrics:
            return
        row: dict[str, Any] = {"epoch": trainer.current_epoch + 1, "step": trainer.global_step}
        for column, name in METRICS.items():
            value = float(metrics[name]) if name in metrics else None
            scale = 100.0 if column in ("val_top1", "val_top5") else 1.0
            row[column] = "" if value is None else f"{value * scale:.6g}"
        new = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CURVE_COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow(row)
        print(" | ".join(f"{key}={value}" for key, value in row.items()), flush=True)


def curve_logger(folder: Path) -> TensorBoardLogger:
    """TensorBoard logs of a linear probe / fine-tuning in `<folder>/tensorboard` (one version for every resumed
    part, so the curve continues)."""
    return TensorBoardLogger(str(folder), name="tensorboard", version="", default_hp_metric=False)


def read_curve(folder: Path) -> list[dict[str, str]]:
    """The rows of `<folder>/curve.csv`, the last line of each epoch kept, in epoch order."""
    path = Path(folder) / CURVE_NAME
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        by_epoch = {int(row["epoch"]): row for row in csv.DictReader(handle)}
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def late_gain(curve: list[dict[str, str]]) -> float | None:
    """Points by which the best val top-1 of the last quarter of the validated epochs exceeds the best before them
    (negative: the curve fell back), the measure of a plateau; None with fewer than LATE_MIN_EPOCHS epochs."""
    top1 = [float(row["val_top1"]) for row in curve if row["val_top1"]]
    if len(top1) < LATE_MIN_EPOCHS:
        return None
    late = max(1, round(len(top1) * LATE_FRACTION))
    return max(top1[-late:]) - max(top1[:-late])


__all__ = ["CURVE_COLUMNS", "CURVE_NAME", "LATE_FRACTION", "ValidationCurve", "curve_logger", "late_gain",
           "read_curve"]
