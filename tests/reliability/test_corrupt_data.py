"""An ImageFolder run with 1 % corrupt files completes, names each corrupt file once and logs their count as
`data/skipped_samples` (distinct files so far) and `data/skipped_samples_epoch` (distinct files this epoch)."""
import numpy as np
import pytest
from conftest import MICRO
from PIL import Image

from lightning_mim.cli import run_cli


def test_imagefolder_with_one_percent_corrupt_files(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 200), ("val", 20)):
        for index in range(count):
            folder = tmp_path / split / f"class{index % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            if split == "train" and index in (17, 118):
                (folder / f"{index}.png").write_bytes(b"\x89PNG not really an image")
            else:
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    # two epochs, each with a validation and a k-NN pass over the whole train split: every pass re-reads the files
    with pytest.warns(RuntimeWarning) as record:
        cli = run_cli(["fit", *MICRO, "--data.source", "imagefolder", "--data.data_dir", str(tmp_path),
                       "--data.batch_size", "20", "--data.knn_bank_size", "200", "--trainer.max_epochs", "2",
                       "--trainer.limit_val_batches", "1", "--knn.every_n_epochs", "1",
                       "--trainer.default_root_dir", str(tmp_path / "run")])
    assert cli.trainer.global_step == 20
    assert cli.datamodule.skipped_samples == 2
    assert cli.trainer.callback_metrics["data/skipped_samples"].item() == 2
    assert cli.trainer.callback_metrics["data/skipped_samples_epoch"].item() == 2
    named = [str(warning.message) for warning in record if "skipped" in str(warning.message)]
    assert [sum(f"/{index}.png" in message for message in named) for index in (17, 118)] == [1, 1]
