"""`evaluate`'s fine-tuning curve: one curve.csv line per validated epoch and the same val/top1 in TensorBoard."""
from __future__ import annotations

import json
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_mim.cli import main as cli_main
from lightning_mim.eval.curve import CURVE_COLUMNS, read_curve

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
  max_epochs: 3
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
    assert tuple(lines[0].split(",")) == CURVE_COLUMNS and len(lines) == 4
    curve = read_curve(folder)
    assert [(row["epoch"], row["step"]) for row in curve] == [("1", "4"), ("2", "8"), ("3", "12")]
    result = json.loads((folder / "result.json").read_text())
    top1 = [float(row["val_top1"]) for row in curve]
    assert abs(top1[-1] - result["top1"]) < 1e-3
    assert abs(max(top1) - result["top1_best"]) < 1e-3
    assert all(float(row["train_loss"]) > 0 for row in curve)
    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    logged = [100 * event.value for event in events.Scalars("val/top1")]
    assert len(logged) == 3 and all(abs(a - b) < 1e-3 for a, b in zip(logged, top1))
