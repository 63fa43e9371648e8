"""An ImageFolder run with 1 % corrupt files completes and reports the skipped count as `data/skipped_samples`."""
import numpy as np
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
    cli = run_cli(["fit", *MICRO, "--data.source", "imagefolder", "--data.data_dir", str(tmp_path),
                   "--data.batch_size", "20", "--trainer.max_epochs", "1", "--trainer.default_root_dir",
                   str(tmp_path / "run")])
    assert cli.trainer.global_step == 10
    assert cli.datamodule.skipped_samples == 2
    assert cli.trainer.callback_metrics["data/skipped_samples"].item() == 2
