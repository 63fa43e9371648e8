"""Bad configuration fails before any compute, with a message that names the value."""
import pytest
from conftest import MICRO

from lightning_mim.cli import run_cli
from lightning_mim.data import MIMDataModule
from lightning_mim.methods.base import OptimConfig, cosine_momentum
from lightning_mim.reliability import check_cell_size, check_vocabulary

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
        check_cell_size(grid, cell)
    else:
        with pytest.raises(ValueError, match=str(cell)):
            check_cell_size(grid, cell)


def test_check_vocabulary():
    check_vocabulary(8192, 8192)
    with pytest.raises(ValueError, match="8192"):
        check_vocabulary(8192, 1000)
    with pytest.raises(ValueError):
        check_vocabulary(0, 0)
