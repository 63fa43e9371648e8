"""Bad configuration fails before any compute, with a message that names the value."""
import pytest
from conftest import MICRO

from lightning_mim.cli import run_cli
from lightning_mim.data import MIMDataModule
from lightning_mim.masking import check_cell_size
from lightning_mim.methods import SymMIM
from lightning_mim.methods.base import OptimConfig, cosine_momentum
from lightning_mim.reliability import check_vocabulary

CLI_CASES = {
    "img_size_not_divisible": (["--model.backbone.img_size", "30"], "30"),
    "mae_mask_ratio_one": (["--model.mask_ratio", "1.0"], "1.0"),
    "mae_mask_ratio_zero": (["--model.mask_ratio", "0.0"], "0.0"),
    "lut_mask_ratio_below_half": (["--model", "LUT", "--model.mask_ratio", "0.4"], "0.4"),
    "unknown_backbone_size": (["--model.backbone.size", "colossal"], "colossal"),
    "unknown_method": (["--model", "Nope"], "Nope"),
    "lut_momentum_above_one": (["--model", "LUT", "--model.momentum_base", "1.5"], "1.5"),
    "lut_momentum_negative": (["--model", "LUT", "--model.momentum_final", "-0.1"], "-0.1"),
    "negative_lr": (["--model.optim.lr", "-1e-3"], "-0.001"),
    "negative_base_lr": (["--model.optim.base_lr", "-1"], "-1"),
    "unknown_lr_scaling": (["--model.optim.lr_scaling", "cubic"], "cubic"),
    "negative_warmup": (["--model.optim.warmup_steps", "-5"], "-5"),
    "beta_one": (["--model.optim.betas", "[0.9, 1.0]"], "1.0"),
    "zero_nonfinite_limit": (["--model.optim.max_consecutive_nonfinite", "0"], "0"),
    "zero_batch_size": (["--data.batch_size", "0"], "0"),
    "unknown_source": (["--data.source", "ftp"], "ftp"),
}


@pytest.mark.parametrize("extra,needle", CLI_CASES.values(), ids=CLI_CASES.keys())
def test_bad_cli_value_is_refused(extra, needle):
    with pytest.raises((ValueError, SystemExit)) as error:
        run_cli([*MICRO, *extra], run=False)
    if error.type is ValueError:
        assert needle in str(error.value)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(source="imagefolder", data_dir="/nonexistent/data"), "/nonexistent/data"),
    (dict(source="webdataset", train_shards="/nonexistent/train-{000000..000009}.tar", train_samples=10),
     "/nonexistent"),
], ids=["missing_folder", "shards_match_nothing"])
def test_missing_data_is_refused_at_setup(kwargs, needle):
    data = MIMDataModule(num_workers=0, **kwargs)
    with pytest.raises((FileNotFoundError, ValueError), match=needle):
        data.setup("fit")


def test_folder_without_class_subfolders(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        (tmp_path / split / "image.png").write_bytes(b"")
    with pytest.raises((FileNotFoundError, ValueError)):
        MIMDataModule(source="imagefolder", data_dir=str(tmp_path), num_workers=0).setup("fit")


def test_optim_and_momentum_constructors():
    with pytest.raises(ValueError, match="min_lr"):
        OptimConfig(min_lr=-1.0)
    with pytest.raises(ValueError, match="momentum_base"):
        cosine_momentum(0, 10, base=1.2)


@pytest.mark.parametrize("grid,cell,ok", [(14, 2, True), (14, 7, True), (14, 4, False), (14, 0, False)])
def test_check_cell_size(grid, cell, ok):
    if ok:
        assert check_cell_size((grid, grid), cell) == (grid // cell, grid // cell)
    else:
        with pytest.raises(ValueError, match=rf"a cell of {cell} x {cell} .* use a mask cell of \[1, 2, 7, 14\]"):
            check_cell_size((grid, grid), cell)


def test_symmim_coarse_cells_must_tile_the_grid():
    with pytest.raises(ValueError, match=r"SymMIM mask_patch_size 8 at image size 28, patch 4: a cell of 2 x 2 .*\[1, 7\]"):
        SymMIM(backbone=dict(size="micro", img_size=28, patch_size=4), mask_patch_size=8)


def test_check_vocabulary():
    check_vocabulary(8192, 8192)
    with pytest.raises(ValueError, match="8192"):
        check_vocabulary(8192, 1000)
    with pytest.raises(ValueError):
        check_vocabulary(0, 0)


def test_global_batch_that_does_not_split_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"global_batch_size=30 does not split over 1 device\(s\) x 4"):
        run_cli(["fit", *MICRO, "--data.global_batch_size", "30", "--trainer.accumulate_grad_batches", "4",
                 "--trainer.max_steps", "1", "--trainer.default_root_dir", str(tmp_path)])
    assert not (tmp_path / "checkpoints").exists()


def test_global_batch_sets_the_per_device_batch_and_the_lr_rule(tmp_path):
    cli = run_cli(["fit", *MICRO, "--data.global_batch_size", "32", "--trainer.accumulate_grad_batches", "2",
                   "--model.optim.lr", "null", "--model.optim.base_lr", "1e-3", "--trainer.max_steps", "1",
                   "--trainer.default_root_dir", str(tmp_path)])
    assert cli.datamodule.batch_size == 16
    assert cli.model.effective_batch_size() == 32
    assert cli.model.peak_lr == pytest.approx(1e-3 * 32 / 256)


def test_resuming_with_another_configuration_is_refused_and_names_both_values(tmp_path):
    common = [*MICRO, "--trainer.default_root_dir", str(tmp_path), "--checkpoint.dirpath", str(tmp_path / "ckpt")]
    run_cli(["fit", *common, "--trainer.max_steps", "1"])
    with pytest.raises(ValueError, match=r"model.backbone.patch_size: 4 in the checkpoint, 8 in this run"):
        run_cli(["fit", *common, "--model.backbone.patch_size", "8", "--trainer.max_steps", "2",
                 "--ckpt_path", str(tmp_path / "ckpt/last.ckpt")])
    with pytest.raises(ValueError, match=r"model.mask_ratio: 0.75 in the checkpoint, 0.6 in this run"):
        run_cli(["fit", *common, "--model.mask_ratio", "0.6", "--trainer.max_steps", "2"])  # automatic resume
    with pytest.raises(ValueError, match=r"data.batch_size: 16 in the checkpoint, 8 in this run"):
        run_cli(["fit", *common, "--data.batch_size", "8", "--trainer.max_steps", "2"])
    cli = run_cli(["fit", *common, "--model.backbone.grad_checkpointing", "true", "--trainer.max_steps", "2"])
    assert cli.trainer.global_step == 2
