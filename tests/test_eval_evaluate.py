"""`lightning-mim evaluate` on a tiny synthetic pre-training run writes results.csv and results.md."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
from test_data import fake_fashion_mnist

from lightning_mim.cli import main as cli_main
from lightning_mim.cli import run_cli
from lightning_mim.eval.evaluate import COLUMNS, CONFIG_DIR, config_hash

RECIPE = """seed_everything: 3
model:
  class_path: lightning_mim.methods.MAE
  init_args:
    backbone: {size: micro, img_size: 16, patch_size: 4}
    decoder_dim: 32
    decoder_depth: 1
    decoder_heads: 4
    optim: {lr: 1.0e-3, warmup_steps: 1}
"""
ARGS = ["--data-source", "synthetic", "--synthetic-size", "64", "--batch-size", "16", "--epochs", "1",
        "--num-workers", "0", "--knn-bank", "64", "--accelerator", "cpu"]


def read_rows(results: Path) -> list[dict[str, str]]:
    with (results / "results.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_evaluate_writes_both_result_files(tmp_path: Path) -> None:
    recipe = tmp_path / "mae_micro.yaml"
    recipe.write_text(RECIPE)
    cli = run_cli(["fit", "--config", str(recipe), "--data.source", "synthetic", "--data.synthetic_size", "64",
                   "--data.synthetic_image_size", "16", "--data.batch_size", "16", "--data.num_workers", "0",
                   "--data.knn_bank_size", "32", "--trainer.accelerator", "cpu", "--trainer.max_steps", "2",
                   "--trainer.enable_progress_bar", "false", "--trainer.logger.class_path",
                   "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.init_args.save_dir", str(tmp_path),
                   "--trainer.logger.init_args.name", "mae"])
    checkpoint = Path(cli.trainer.checkpoint_callback.last_model_path)
    results = tmp_path / "results"
    cli_main(["evaluate", "--ckpt", str(checkpoint), "--protocols", "knn,linear,finetune", "--results", str(results),
              *ARGS])
    written = read_rows(results)
    assert tuple(written[0]) == COLUMNS and [row["protocol"] for row in written] == ["knn", "linear", "finetune"]
    assert {row["method"] for row in written} == {"MAE"}
    assert {row["run"] for row in written} == {"mae/version_0/last.ckpt"}
    assert {row["config_hash"] for row in written} == {config_hash(dict(cli.model.hparams))}
    assert len(written[0]["config_hash"]) == 10
    assert all(0.0 <= float(row["top1"]) <= float(row["top5"]) <= 100.0 for row in written)
    assert [row["epochs"] for row in written] == ["0", "1", "1"]
    markdown = (results / "results.md").read_text().splitlines()
    assert markdown[0] == "| " + " | ".join(COLUMNS) + " |" and len(markdown) == 2 + 3

    # the recipe's random initialisation: same hyper-parameters, so the same config hash, under its own run name
    cli_main(["evaluate", "--ckpt", f"random:{recipe}", "--protocols", "knn", "--results", str(results), *ARGS])
    written = read_rows(results)
    assert len(written) == 4 and written[-1]["run"] == "random:mae_micro" and written[-1]["protocol"] == "knn"
    assert written[-1]["config_hash"] == written[0]["config_hash"]
    assert len((results / "results.md").read_text().splitlines()) == 2 + 4

    # the configuration the run saved next to its checkpoints (it also holds fit's ckpt_path, trainer, ...) gives
    # the same initialisation, named after the run
    saved = checkpoint.parents[1] / "config.yaml"
    cli_main(["evaluate", "--ckpt", f"random:{saved}", "--protocols", "knn", "--results", str(results), *ARGS])
    written = read_rows(results)
    assert written[-1]["run"] == "random:mae/version_0" and written[-1]["method"] == "MAE"
    assert written[-1]["config_hash"] == written[0]["config_hash"]
    assert written[-1]["top1"] == written[-2]["top1"]

    # the encoder exported from the checkpoint, and the checkpoint kept outside the run folder: same method, config
    # hash and run
    exported, kept = tmp_path / "encoder.safetensors", tmp_path / "kept" / "best.ckpt"
    cli_main(["export", str(checkpoint), str(exported)])
    kept.parent.mkdir()
    shutil.copy(checkpoint, kept)
    for path in exported, kept:
        cli_main(["evaluate", "--ckpt", str(path), "--protocols", "knn", "--results", str(results), *ARGS])
    written = read_rows(results)
    assert [row["run"] for row in written[-2:]] == ["mae/version_0/encoder.safetensors", "mae/version_0/best.ckpt"]
    assert {(row["method"], row["config_hash"]) for row in written[-2:]} == {("MAE", written[0]["config_hash"])}
    assert written[-2]["top1"] == written[-1]["top1"] == written[0]["top1"]


def test_evaluate_linear_probe_under_two_process_ddp_writes_one_row(tmp_path: Path) -> None:
    import subprocess
    import sys

    recipe = tmp_path / "mae_micro.yaml"
    recipe.write_text(RECIPE)
    results = tmp_path / "results"
    command = [sys.executable, "-m", "lightning_mim.cli", "evaluate", "--ckpt", f"random:{recipe}", "--protocols",
               "linear", "--results", str(results), *ARGS, "--devices", "2", "--strategy", "ddp"]
    finished = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "MEMBER: 2/2" in finished.stdout + finished.stderr
    written = read_rows(results)
    assert [row["protocol"] for row in written] == ["linear"]
    assert 0.0 <= float(written[0]["top1"]) <= 100.0


@pytest.mark.parametrize("data_args,found", [
    (["--data-config", str(CONFIG_DIR / "data" / "fashion_mnist.yaml")], "28x28 with 1 channel(s) (fashion_mnist)"),
    (["--data-source", "synthetic", "--synthetic-size", "32"], "16x16 with 3 channel(s) (synthetic)"),
], ids=["size", "channels"])
def test_evaluating_on_data_of_another_format_names_both(tmp_path: Path, capsys, monkeypatch, data_args: list[str],
                                                         found: str) -> None:
    monkeypatch.delenv("LIGHTNING_MIM_DEBUG", raising=False)
    grey = tmp_path / "mae_grey.yaml"
    grey.write_text(RECIPE.replace("patch_size: 4}", "patch_size: 4, in_chans: 1}"))
    (tmp_path / "fmnist").mkdir()
    fashion_mnist = fake_fashion_mnist(tmp_path / "fmnist")
    with pytest.raises(SystemExit):
        cli_main(["evaluate", "--ckpt", f"random:{grey}", "--protocols", "knn", "--results", str(tmp_path / "results"),
                  "--data-dir", str(fashion_mnist), "--num-workers", "0", *data_args])
    assert (f"lightning-mim: error: the encoder takes 16x16 images with 1 channel(s) but the data are {found}"
            in capsys.readouterr().err)
    assert not (tmp_path / "results").exists()
    cli_main(["evaluate", "--ckpt", f"random:{grey}", "--protocols", "knn", "--results", str(tmp_path / "results"),
              "--data-dir", str(fashion_mnist), "--num-workers", "0", "--knn-bank", "12", *data_args,
              "--adapt-images"])
    assert [row["protocol"] for row in read_rows(tmp_path / "results")] == ["knn"]


def test_an_encoder_pre_trained_on_the_source_at_another_size_is_evaluated_at_its_size(tmp_path: Path,
                                                                                       monkeypatch) -> None:
    """The SimMIM / SymMIM demos pre-train on Fashion-MNIST resized to 32 px: evaluate takes their checkpoints as
    they are, while a checkpoint pre-trained on other data still needs --adapt-images."""
    monkeypatch.delenv("LIGHTNING_MIM_DEBUG", raising=False)
    (tmp_path / "fmnist").mkdir()
    fashion_mnist = fake_fashion_mnist(tmp_path / "fmnist")
    common = ["--model", "SimMIM", "--model.backbone.size", "micro", "--model.backbone.img_size", "32",
              "--model.backbone.patch_size", "4", "--model.backbone.in_chans", "1", "--model.mask_patch_size", "8",
              "--data.num_workers", "0", "--data.batch_size", "4", "--trainer.max_steps", "1",
              "--trainer.logger", "false", "--trainer.limit_val_batches", "0", "--knn.every_n_epochs", "1000",
              "--trainer.enable_progress_bar", "false"]
    for source, extra in (("fashion_mnist", ["--data.data_dir", str(fashion_mnist)]),
                          ("synthetic", ["--data.synthetic_size", "8"])):
        run_cli(["fit", *common, "--data.source", source, *extra, "--trainer.default_root_dir", str(tmp_path / source),
                 "--checkpoint.dirpath", str(tmp_path / source / "ckpt")])
    evaluate = ["evaluate", "--protocols", "knn", "--data-dir", str(fashion_mnist), "--num-workers", "0",
                "--knn-bank", "12", "--results", str(tmp_path / "results")]
    cli_main([*evaluate, "--ckpt", str(tmp_path / "fashion_mnist" / "ckpt" / "last.ckpt")])
    assert [row["protocol"] for row in read_rows(tmp_path / "results")] == ["knn"]
    with pytest.raises(SystemExit):
        cli_main([*evaluate, "--ckpt", str(tmp_path / "synthetic" / "ckpt" / "last.ckpt")])
