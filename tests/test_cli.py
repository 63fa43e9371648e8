"""The CLI end to end: print_config of the recipes, a short fit whose loss decreases with every TensorBoard tag, and
DDP with two CPU processes (gloo)."""
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_mim.reliability import safe_load
from lightning_mim.cli import run_cli
from micro_methods import micro_cli_model

ROOT = Path(__file__).resolve().parents[1]
MICRO_SYNTHETIC_DATA = [
    "--data.source", "synthetic", "--data.synthetic_size", "256", "--data.batch_size", "32",
    "--data.num_workers", "0", "--data.knn_bank_size", "128", "--data.val_subset", "64",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    "--trainer.log_every_n_steps", "1", "--throughput.log_every_n_steps", "4",
]


def micro_synthetic(method: str = "MAE") -> list[str]:
    return ["--config", str(ROOT / "configs/trainer/cpu.yaml"), *micro_cli_model(method), *MICRO_SYNTHETIC_DATA]


MICRO_SYNTHETIC = micro_synthetic("MAE")


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "lightning_mim.cli", *args]


# recipe folder -> method and lines its printed configuration must hold (LUT's recipes: tests/test_lut.py)
RECIPE_KEYS = {
    "mae": ("MAE", ("mask_ratio: 0.75", "norm_pix_loss: true", "lr_scaling: linear", "decoder_depth:", "knn:")),
    "simmim": ("SimMIM", ("mask_ratio: 0.6", "lr_scaling: linear", "knn:")),
    "symmim": ("SymMIM", ("temperature: 0.2", "momentum_base: 0.99", "mask_phase: fixed", "con: 1.0")),
    "mapet": ("MaPeT", ("predict_ratio: 0.75", "cooldown_epochs:", "crop: center_square", "tokenizer:")),
    "beit": ("BEiT", ("num_masked_patches:", "min_masked_per_block:", "crop: center_square", "tokenizer:")),
    "beyond_masking": ("BeyondMasking", ("objective:", "class_token: false", "pos_embed: sincos_1d", "qkv_bias: qv",
                                         "init: clipped_normal", "min_lr: 1.0e-05", "knn:")),
}
# loss terms each method logs as <split>_<kind>/loss_<term> (default: pixel/mim) and its image grids
LOSS_TERMS = {"SymMIM": ("pixel/loss_mim", "feature/loss_con"),
              "BeyondMasking": ("pixel/loss_centre", "pixel/loss_edge"),
              "BEiT": ("token/loss_mim",), "MaPeT": ("token/loss_mim",)}
IMAGE_TAGS = {"BeyondMasking": {"val/reconstruction", "val/degradation"}}
# Beyond Masking's per-patch, per-channel normalised target starts at its trivial level (small initial outputs) and the
# noisy 4 x 4 stripes are learnt slowly: 24 steps only lower it (0.992 x); tests/test_beyond_masking.py trains longer
LOSS_DECREASE = {"BeyondMasking": 1.0}


@pytest.mark.parametrize("recipe", sorted(path for folder in RECIPE_KEYS for path in (ROOT / "configs" / folder).glob(
    "*.yaml")), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_print_config_of_recipes(recipe, capsys, monkeypatch):
    # in this interpreter (a new one per recipe cost about 10 s each); the entry point itself runs in the DDP tests
    method, keys = RECIPE_KEYS[recipe.parent.name]
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as printed:
        run_cli(["fit", "--config", str(recipe), "--print_config"])
    assert printed.value.code in (0, None)
    stdout = capsys.readouterr().out
    assert f"class_path: lightning_mim.methods.{method}" in stdout
    for key in keys:
        assert key in stdout


@pytest.mark.parametrize("method", ["MAE", "SimMIM", "SymMIM", "BEiT", "MaPeT", "BeyondMasking"])
def test_fit_logs_common_tags_and_loss_decreases(tmp_path, method):
    cli = run_cli(["fit", *micro_synthetic(method), "--trainer.max_epochs", "3",
                   "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.class_path",
                   "lightning.pytorch.loggers.TensorBoardLogger", "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert cli.trainer.global_step == 3 * 8
    events = EventAccumulator(cli.trainer.logger.log_dir, size_guidance={"scalars": 0, "images": 0}).Reload()
    tags = set(events.Tags()["scalars"])
    terms = LOSS_TERMS.get(method, ("pixel/loss_mim",))
    assert {"train/loss", "train/lr", "val/loss", "val/knn_top1", "train/throughput_img_s"} <= tags
    assert {f"{split}_{term}" for split in ("train", "val") for term in terms} <= tags
    if method == "SymMIM":
        assert "train/teacher_momentum" in tags
    if method in ("BEiT", "MaPeT"):
        assert {"train/token_accuracy", "val/token_accuracy"} <= tags
    assert IMAGE_TAGS.get(method, {"val/reconstruction"}) == set(events.Tags()["images"])
    for tag in ("train_pixel/loss_mim", "train_feature/loss_con") if method == "SymMIM" else ("train/loss",):
        losses = [event.value for event in events.Scalars(tag)]
        # token methods start at ln V (16 random codes); within 24 steps they learn at least the codes' frequencies
        start = math.log(16) if method in ("BEiT", "MaPeT") else sum(losses[:4]) / 4
        assert sum(losses[-4:]) / 4 < LOSS_DECREASE.get(method, 0.8) * start, (tag, losses)
    assert Path(cli.trainer.checkpoint_callback.last_model_path).is_file()


# Beyond Masking's other objectives (its default, zoom_in_masking, is the "BeyondMasking" case): a grey encoder for
# de-colourisation, whose input is the grey version of the colour images
OTHER_OBJECTIVES = {objective: ("--model.objective", objective, *(("--model.backbone.in_chans", "1")
                                                                  if objective == "decolorize" else ()))
                    for objective in ("masking", "zoom_in", "zoom_out", "distortion", "blur", "decolorize")}


# SyncBatchNorm (LUT's paper configs) needs GPUs; on CPU each rank keeps its own BatchNorm statistics. LUT trains
# under DDP in tests/reliability/test_resume.py (straight, killed and resumed). Of Beyond Masking's other objectives,
# those that change the input's geometry (zoom in / out) or channels (de-colourisation) run under DDP here; masking,
# distortion and blur share the default objective's path (a per-sample pixel degradation of the same shape), and
# every objective trains in-process in tests/test_beyond_masking.py (about 20 s of the suite per DDP case).
DDP_OBJECTIVES = ("zoom_in", "zoom_out", "decolorize")


@pytest.mark.parametrize("method", ["MAE", "SimMIM", "SymMIM", "BEiT", "MaPeT", "BeyondMasking",
                                    *(f"BeyondMasking:{objective}" for objective in DDP_OBJECTIVES)])
def test_ddp_two_cpu_processes(tmp_path, method):
    method, _, objective = method.partition(":")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        cli_command("fit", *micro_synthetic(method), *OTHER_OBJECTIVES.get(objective, ()), "--trainer.devices", "2",
                    "--trainer.strategy", "ddp", "--trainer.max_epochs", "2",
                    "--trainer.default_root_dir", str(tmp_path),
                    "--trainer.logger", "false", "--checkpoint.dirpath", str(tmp_path / "ckpt")),
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MEMBER: 2/2" in result.stderr + result.stdout
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()
    if objective:
        assert safe_load(tmp_path / "ckpt" / "last.ckpt")["hyper_parameters"]["objective"] == objective


def test_python_dash_m_runs_the_cli(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "lightning_mim", "--help"], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "extra subcommands: make-shards" in result.stdout and "{fit,validate,test,predict}" in result.stdout


def own_image_folder(root: Path) -> Path:
    """A user's own ImageFolder: grey and colour images of sizes other than the model's."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 24), ("val", 8)):
        for index in range(count):
            folder = root / split / f"class{index % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            shape = (36, 20) if index % 3 else (40, 40, 3)
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(folder / f"{index}.png")
    return root


@pytest.mark.parametrize("in_chans", ["1", "3"])
def test_imagefolder_data_preset_trains_on_an_own_folder(tmp_path, in_chans):
    preset = ROOT / "configs/data/imagefolder.yaml"
    assert yaml.safe_load(preset.read_text())["data"]["num_workers"] > 0
    cli = run_cli(["fit", *MICRO_SYNTHETIC, "--config", str(preset), "--model.backbone.in_chans", in_chans,
                   "--data.data_dir", str(own_image_folder(tmp_path / "images")), "--data.batch_size", "8",
                   "--data.num_workers", "1", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
                   "--trainer.logger", "false", "--knn.every_n_epochs", "1000",
                   "--trainer.default_root_dir", str(tmp_path)])
    assert cli.datamodule.hparams.source == "imagefolder" and cli.trainer.global_step == 2
    images = next(iter(cli.datamodule.val_dataloader()))[0]
    assert images.shape == (8, int(in_chans), 32, 32)
    training_doc = (ROOT / "docs/training.md").read_text()
    data_row = next(line for line in training_doc.splitlines() if "`configs/data/`" in line)
    assert "`imagefolder`" in data_row
