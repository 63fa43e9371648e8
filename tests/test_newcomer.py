"""What a new user meets first: run folders named after their recipe, one-line configuration errors, no empty run
folders after a failed start."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import yaml
from jsonargparse import Namespace

from lightning_mim.cli import MIMCLI, main, run_cli
from lightning_mim.data import MIMDataModule
from lightning_mim.methods import MIMMethod

ROOT = Path(__file__).resolve().parents[1]
DEMO_RECIPE = ROOT / "configs/mae/vit_micro_p4_demo_fmnist.yaml"
RECIPES = sorted([*(ROOT / "configs/mae").glob("*.yaml"), *(ROOT / "configs/lut").glob("*.yaml")])


class Named(Exception):
    """Raised with the logger configuration once the CLI has named the run, before any model is built."""


class NamingOnly(MIMCLI):
    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()
        raise Named(self.config[self.subcommand].trainer.logger)


def logger_of(*args: str) -> Namespace:
    with pytest.raises(Named) as stop:
        NamingOnly(MIMMethod, MIMDataModule, subclass_mode_model=True, args=["fit", *args])
    return stop.value.args[0]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: f"{path.parent.name}/{path.stem}")
def test_each_recipe_logs_under_runs_and_its_own_name(recipe: Path) -> None:
    logger = logger_of("--config", str(recipe))
    assert logger.init_args.save_dir == "runs"
    assert logger.init_args.name == f"{recipe.parent.name}_{recipe.stem}"


def test_a_users_own_recipe_names_the_run_not_the_demo(tmp_path: Path) -> None:
    own = tmp_path / "flowers.yaml"
    own.write_text(DEMO_RECIPE.read_text())
    assert logger_of("--config", str(own)).init_args.name == "mae_flowers"
    overrides = tmp_path / "lut_bigger_decoder.yaml"
    overrides.write_text(yaml.safe_dump({"model": {"class_path": "lightning_mim.methods.LUT",
                                                   "init_args": {"decoder_depth": 2}}}))
    assert logger_of("--config", str(DEMO_RECIPE), "--config", str(overrides)).init_args.name == "lut_bigger_decoder"
    data_only = tmp_path / "my_data.yaml"
    data_only.write_text(yaml.safe_dump({"data": {"batch_size": 8}}))
    assert logger_of("--config", str(DEMO_RECIPE), "--config", str(data_only)).init_args.name == \
        "mae_vit_micro_p4_demo_fmnist"
    own.rename(tmp_path / "mae_flowers.yaml")
    assert logger_of("--config", str(tmp_path / "mae_flowers.yaml")).init_args.name == "mae_flowers"
    assert logger_of("--model", "LUT").init_args.name == "lut"
    assert logger_of("--model", "LUT", "--trainer.logger.init_args.name", "mine").init_args.name == "mine"


def test_a_run_logs_to_runs_recipe_version(tmp_path: Path) -> None:
    recipe = tmp_path / "flowers.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"class_path": "lightning_mim.methods.MAE", "init_args": {
        "backbone": {"size": "micro", "img_size": 16, "patch_size": 4}, "decoder_dim": 32, "decoder_depth": 1,
        "decoder_heads": 2, "optim": {"lr": 1e-3, "warmup_steps": 1}}}}))
    cli = run_cli(["fit", "--config", str(ROOT / "configs/trainer/cpu.yaml"), "--config", str(recipe),
                   "--data.source", "synthetic", "--data.synthetic_size", "32", "--data.synthetic_image_size", "16",
                   "--data.batch_size", "16", "--data.num_workers", "0", "--data.knn_bank_size", "16",
                   "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar",
                   "false", "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")])
    assert Path(cli.trainer.logger.log_dir) == tmp_path / "runs" / "mae_flowers" / "version_0"
    assert Path(cli.trainer.checkpoint_callback.last_model_path).parent == \
        tmp_path / "runs" / "mae_flowers" / "version_0" / "checkpoints"


MICRO_FIT = ["fit", "--config", str(ROOT / "configs/trainer/cpu.yaml"), "--model", "MAE",
             "--model.backbone.size", "micro", "--model.backbone.img_size", "16", "--model.backbone.patch_size", "4",
             "--model.decoder_dim", "32", "--model.decoder_depth", "1", "--model.decoder_heads", "2",
             "--data.source", "synthetic", "--data.synthetic_size", "32", "--data.synthetic_image_size", "16",
             "--data.batch_size", "16", "--data.num_workers", "0", "--data.knn_bank_size", "16",
             "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false"]


@pytest.mark.parametrize("extra,message", [
    (["--model.backbone.img_size", "30"], "image size 30 is not divisible by patch size 4: pick an image size"),
    (["--model.mask_ratio", "1.0"], "mask ratio must lie in (0, 1), got 1.0: e.g. 0.75 for MAE"),
    (["--data.source", "imagefolder", "--data.data_dir", "/nonexistent/images"],
     "/nonexistent/images/train is not a directory; source 'imagefolder' expects DATA_DIR/train/<class>/<image>"),
], ids=["model_check", "method_check", "data_setup"])
def test_a_configuration_error_prints_one_line_and_leaves_no_run_folder(tmp_path: Path, capsys, monkeypatch,
                                                                       extra: list[str], message: str) -> None:
    monkeypatch.delenv("LIGHTNING_MIM_DEBUG", raising=False)
    with pytest.raises(SystemExit) as stop:
        main([*MICRO_FIT, "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), *extra])
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.splitlines()
    errors = [index for index, line in enumerate(lines) if line.startswith("lightning-mim: error:")]
    assert len(errors) == 1 and lines[errors[0]].startswith(f"lightning-mim: error: {message}")
    assert lines[errors[0] + 1] == "(LIGHTNING_MIM_DEBUG=1 shows the traceback)"
    assert not list((tmp_path / "runs").glob("*/version_*"))


def test_debug_flag_keeps_the_traceback(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LIGHTNING_MIM_DEBUG", "1")
    with pytest.raises(ValueError, match="image size 30 is not divisible"):
        main([*MICRO_FIT, "--trainer.logger", "false", "--model.backbone.img_size", "30"])


class FailAfterFirstStep(L.Callback):
    """Stops a run with an error once it has made an optimiser step."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= 1:
            raise ValueError("failed after a step")


def test_a_run_that_trained_keeps_its_folder_when_it_fails(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LIGHTNING_MIM_DEBUG", "1")
    with pytest.raises(ValueError, match="failed after a step"):
        main([*MICRO_FIT, "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.max_steps", "3",
              "--trainer.callbacks+=test_newcomer.FailAfterFirstStep"])
    assert [path.name for path in (tmp_path / "runs" / "mae").iterdir()] == ["version_0"]
