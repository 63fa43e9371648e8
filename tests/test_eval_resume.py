"""`evaluate`'s linear probe and fine-tuning resume exactly: a run SIGKILLed in the middle of an epoch and rerun with
the same command continues from its working folder's `last.ckpt` (the end of the last finished epoch) and gives the
per-step losses, final top-1 and best top-1 of an uninterrupted run; once finished, a rerun trains nothing."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import yaml

from lightning_mim.backbone import BackboneConfig, MIMViT
from lightning_mim.eval.evaluate import COLUMNS, append_results, main
from lightning_mim.eval.weights import save_encoder

ROOT = Path(__file__).resolve().parents[1]
# 48 synthetic images in batches of 16: 3 steps an epoch, 2 epochs; the kill at step 4 is mid second epoch
EPOCHS, STEPS_PER_EPOCH, KILL_AT = 2, 3, 4
RECIPES = {
    "linear": {"model": {"pool": "avg", "optim": {"lr": 0.5, "warmup_epochs": 1}}},
    # Mixup / CutMix and RandAugment draw from numpy / python generators, drop path from torch's
    "finetune": {"model": {"drop_path_rate": 0.1, "optim": {"base_lr": 1.0e-3, "warmup_epochs": 1}}},
}
KILLED_RUN = """
import json, sys
sys.path.insert(0, {helpers!r})
from helpers import KillAtStep, LossRecorder
from lightning_mim.eval.evaluate import main
main(json.loads(sys.argv[1]), callbacks=[LossRecorder(sys.argv[2]), KillAtStep(int(sys.argv[3]))])
"""


class Recorder(L.Callback):
    """{global step: loss} of every optimiser step."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = outputs["loss"].item()


class NoTraining(L.Callback):
    def on_train_start(self, trainer, pl_module):
        raise AssertionError("a finished protocol was trained again")


def command(tmp_path: Path, name: str, protocol: str) -> list[str]:
    recipe = tmp_path / f"{protocol}_recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPES[protocol] | {"data": {"batch_size": 16}, "trainer": {
        "max_epochs": EPOCHS, "check_val_every_n_epoch": 1}}))
    encoder = tmp_path / "encoder.safetensors"
    if not encoder.exists():
        config = BackboneConfig(size="micro", img_size=16, patch_size=4)
        L.seed_everything(1, verbose=False)
        save_encoder(MIMViT(config).state_dict(), config, encoder)
    return ["--ckpt", str(encoder), "--protocols", protocol, f"--{protocol}-config", str(recipe),
            "--results", str(tmp_path / name), "--data-source", "synthetic", "--synthetic-size", "48",
            "--num-workers", "0", "--accelerator", "cpu", "--seed", "5"]


@pytest.mark.parametrize("protocol", ["linear", "finetune"])
def test_killed_evaluation_resumes_with_the_losses_and_metrics_of_a_straight_run(tmp_path, protocol):
    straight = Recorder()
    (expected,) = main(command(tmp_path, "straight", protocol), callbacks=[straight])
    assert sorted(straight.losses) == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))

    args = command(tmp_path, "resumed", protocol)
    record = tmp_path / "killed.txt"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN.format(helpers=str(ROOT / "tests" / "reliability")),
                             json.dumps(args), str(record), str(KILL_AT)], capture_output=True, text=True,
                            env=env, timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]
    (folder,) = (tmp_path / "resumed" / "eval").glob("*/*")
    assert (folder / "last.ckpt").is_file() and not (folder / "result.json").exists()
    assert not (tmp_path / "resumed" / "results.csv").exists()

    resumed = Recorder()
    (got,) = main(args, callbacks=[resumed])
    # the epoch cut short is trained again from its start (the checkpoint of the end of epoch 1)
    assert sorted(resumed.losses) == list(range(STEPS_PER_EPOCH + 1, EPOCHS * STEPS_PER_EPOCH + 1))
    before_kill = {int(step): float(loss) for step, loss in (line.split() for line in record.read_text().splitlines())}
    assert sorted(before_kill) == list(range(1, KILL_AT + 1))
    for step, loss in (before_kill | resumed.losses).items():
        assert abs(loss - straight.losses[step]) <= 1e-6 * abs(straight.losses[step]), (step, loss)
    for column in ("top1", "top5", "top1_best", "val_images", "epochs"):
        assert got[column] == expected[column], column
    assert got["val_images"] == 12  # the synthetic val split: a quarter of 48, all of it scored

    # finished: the same command reports the stored result without training
    (again,) = main(args, callbacks=[NoTraining()])
    assert again["top1"] == got["top1"] and again["top1_best"] == got["top1_best"]
    with (tmp_path / "resumed" / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["protocol"] for row in rows] == [protocol, protocol]
    assert float(rows[0]["top1"]) <= float(rows[0]["top1_best"])


def test_a_results_csv_of_older_columns_is_rewritten_with_its_rows_kept(tmp_path):
    old = ("run", "method", "config_hash", "protocol", "top1", "top5", "epochs", "seconds", "timestamp")
    (tmp_path / "results.csv").write_text(",".join(old) + "\nmae/v0/last.ckpt,MAE,abc,knn,50.00,90.00,0,1.0,t0\n")
    (tmp_path / "results.md").write_text("| " + " | ".join(old) + " |\n|" + "---|" * len(old) + "\n| old |\n")
    row = dict.fromkeys(COLUMNS, "x") | {"top1_best": "51.00", "val_images": 50000}
    append_results(tmp_path, [row])
    with (tmp_path / "results.csv").open() as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert tuple(reader.fieldnames) == COLUMNS
    assert rows[0]["top1"] == "50.00" and rows[0]["top1_best"] == "" and rows[0]["val_images"] == ""
    assert rows[1]["val_images"] == "50000"
    markdown = (tmp_path / "results.md").read_text().splitlines()
    assert markdown[2] == "| old |" and markdown[4] == "| " + " | ".join(COLUMNS) + " |"
