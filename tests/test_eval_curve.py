"""`evaluate`'s fine-tuning curve: one curve.csv line per validated epoch, the same val/top1 in TensorBoard, and the
late gain that says whether it reached a plateau."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_mim.cli import main as cli_main
from lightning_mim.eval.curve import CURVE_COLUMNS, late_gain, read_curve

RECIPE = """seed_everything: 3
model:
  class_path: lightning_mim.methods.MAE
  init_args:
    backbone: {size: micro, img_size: 16, patch_size: 4}
    decoder_dim: 32
    optim: {lr: 1.0e-3, warmup_steps: 1}
"""
FINETUNE = """model:
  optim: {lr: 1.0e-3, warmup_epochs: 1}
  mixup: 0.0
  cutmix: 0.0
  auto_augment: null
  crop: padded
trainer:
  max_epochs: 4
  check_val_every_n_epoch: 1
  log_every_n_steps: 1
"""


def test_fine_tuning_writes_one_curve_line_per_epoch_and_tensorboard_agrees(tmp_path: Path) -> None:
    (tmp_path / "mae.yaml").write_text(RECIPE)
    (tmp_path / "finetune.yaml").write_text(FINETUNE)
    results = tmp_path / "results"
    cli_main(["evaluate", "--ckpt", f"random:{tmp_path / 'mae.yaml'}", "--protocols", "finetune",
              "--finetune-config", str(tmp_path / "finetune.yaml"), "--results", str(results),
              "--data-source", "synthetic", "--synthetic-size", "64", "--batch-size", "16", "--num-workers", "0",
              "--accelerator", "cpu"])
    (folder,) = (results / "eval").glob("*/finetune-*")
    lines = (folder / "curve.csv").read_text().splitlines()
    assert tuple(lines[0].split(",")) == CURVE_COLUMNS and len(lines) == 5
    curve = read_curve(folder)
    assert [(row["epoch"], row["step"]) for row in curve] == [("1", "4"), ("2", "8"), ("3", "12"), ("4", "16")]
    result = json.loads((folder / "result.json").read_text())
    top1 = [float(row["val_top1"]) for row in curve]
    assert abs(top1[-1] - result["top1"]) < 1e-3
    assert abs(max(top1) - result["top1_best"]) < 1e-3
    assert all(float(row["train_loss"]) > 0 for row in curve)
    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    logged = [100 * event.value for event in events.Scalars("val/top1")]
    assert len(logged) == 4 and all(abs(a - b) < 1e-3 for a, b in zip(logged, top1))
    # four validated epochs: the last quarter is epoch 4, against the best of epochs 1-3
    with (results / "results.csv").open() as handle:
        (row,) = csv.DictReader(handle)
    assert float(row["late_gain"]) == pytest.approx(top1[3] - max(top1[:3]), abs=0.006)


def curve_of(top1: list[float]) -> list[dict[str, str]]:
    return [{"epoch": str(epoch), "val_top1": str(value)} for epoch, value in enumerate(top1, 1)]


def test_late_gain_is_the_last_quarters_best_over_the_best_before_it() -> None:
    # eight epochs: the last two against the first six
    assert late_gain(curve_of([50, 60, 70, 71, 72, 73, 72.5, 73.2])) == pytest.approx(0.2)
    assert late_gain(curve_of([50, 60, 70, 80, 85, 86, 88, 90])) == pytest.approx(4.0)  # still rising
    assert late_gain(curve_of([50, 60, 70, 80, 79, 78, 77, 76])) == pytest.approx(-3.0)  # fell back
    # 30 epochs: round(7.5) = 8 late epochs (23-30)
    assert late_gain(curve_of([float(epoch) for epoch in range(1, 31)])) == pytest.approx(30 - 22)
    assert late_gain(curve_of([50, 60, 70])) is None  # under four validated epochs: no plateau to speak of
