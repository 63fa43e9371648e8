"""The robustness protocol: seeded ImageNet-C corruptions, the class mapping of the shift sets, and `evaluate
--protocols robustness` end to end on tiny data with a random-init micro encoder."""
from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_mim.eval import corruptions as corruptions_module
from lightning_mim.eval.corruptions import (
    CORRUPTIONS, FAMILIES, INSTALL, CorruptionCache, corrupt_image, corrupt_pixels, corruption_seed, from_pixels,
    load_imagecorruptions, parse_corruptions, to_pixels,
)
from lightning_mim.eval.evaluate import main as evaluate
from lightning_mim.eval.frozen import recorded_l2
from lightning_mim.eval.robustness import subset_indices, summarise
from lightning_mim.eval.shift import class_mapping, restricted_predictions
from lightning_mim.targets.base import MissingExtraError

needs_imagecorruptions = pytest.mark.skipif(importlib.util.find_spec("imagecorruptions") is None,
                                            reason=f"imagecorruptions is not installed: {INSTALL}")
RECIPE = """seed_everything: 3
model:
  class_path: lightning_mim.methods.MAE
  init_args:
    backbone: {size: micro, img_size: 16, patch_size: 4}
    decoder_dim: 32
    decoder_depth: 1
    decoder_heads: 4
"""
COMMON = ["--batch-size", "16", "--num-workers", "0", "--accelerator", "cpu", "--logreg-l2", "1e-2,1e-1"]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


@needs_imagecorruptions
def test_corruptions_are_seeded_per_image_whatever_the_batching(tmp_path: Path, monkeypatch) -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(6, 1, 28, 28, generator=generator).clamp(-2, 2)
    pixels = to_pixels(images, (0.5,), (0.25,))
    assert torch.allclose(from_pixels(pixels, (0.5,), (0.25,)), images, atol=0.5 / 255 / 0.25 + 1e-6)
    indices = torch.tensor([3, 10, 11, 40, 41, 99])
    whole = corrupt_pixels(pixels, indices, "shot_noise", 3, seed=5)
    split = torch.cat([corrupt_pixels(pixels[:2], indices[:2], "shot_noise", 3, 5),
                       corrupt_pixels(pixels[2:], indices[2:], "shot_noise", 3, 5)])
    assert torch.equal(whole, split)
    assert whole.shape == pixels.shape and whole.dtype == torch.uint8 and not torch.equal(whole, pixels)
    assert not torch.equal(whole, corrupt_pixels(pixels, indices, "shot_noise", 3, seed=6))
    # the cache gives back the same pixels without corrupting again
    cache = CorruptionCache(tmp_path, {"source": "test"})
    assert torch.equal(cache.corrupted(pixels, indices, "shot_noise", 3, 5), whole)
    monkeypatch.setattr(corruptions_module, "corrupt_pixels", lambda *args: pytest.fail("not read from the cache"))
    assert torch.equal(cache.corrupted(pixels, indices, "shot_noise", 3, 5), whole)
    # every corruption (the random ones through NumPy's generator or scikit-image's) repeats exactly, on the
    # 28 px grey images that are padded to the package's 32 px minimum
    image = (np.random.default_rng(1).random((28, 28)) * 255).astype(np.uint8)
    state = np.random.get_state()
    for name in CORRUPTIONS:
        first = corrupt_image(image, name, 2, corruption_seed(0, 7, name, 2))
        assert first.shape == image.shape and first.dtype == np.uint8, name
        assert np.array_equal(first, corrupt_image(image, name, 2, corruption_seed(0, 7, name, 2))), name
    assert all(np.array_equal(a, b) for a, b in zip(state, np.random.get_state()))  # the global state is restored


@needs_imagecorruptions
def test_noise_grows_with_severity_and_grey_is_the_rgb_corruption() -> None:
    grey = np.full((32, 32), 128, dtype=np.uint8)
    for name in FAMILIES["noise"]:
        distortion = [np.abs(corrupt_image(grey, name, severity, corruption_seed(0, 0, name, severity)).astype(float)
                             - 128).mean() for severity in range(1, 6)]
        assert all(low < high for low, high in zip(distortion, distortion[1:])), (name, distortion)
    # a deterministic corruption of a grey image equals the package's RGB result (its three channels are equal)
    image = (np.random.default_rng(2).random((32, 32)) * 255).astype(np.uint8)
    rgb = load_imagecorruptions()(np.stack([image] * 3, axis=-1), severity=4, corruption_name="contrast")
    assert np.array_equal(corrupt_image(image, "contrast", 4, 0), rgb[..., 0])


def test_corruption_names_and_the_missing_package_line(monkeypatch) -> None:
    assert parse_corruptions("noise,pixelate") == (*FAMILIES["noise"], "pixelate")
    assert len(parse_corruptions(None)) == 15
    with pytest.raises(ValueError, match="unknown corruption 'rain'"):
        parse_corruptions("rain")
    monkeypatch.setitem(sys.modules, "imagecorruptions", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'lightning_mim\[robustness\]'"):
        load_imagecorruptions()


def test_subset_and_summary() -> None:
    chosen = subset_indices(100, 10, seed=0)
    assert torch.equal(chosen, subset_indices(100, 10, seed=0)) and len(set(chosen.tolist())) == 10
    assert torch.equal(chosen, chosen.sort().values) and torch.equal(subset_indices(5, None, 0), torch.arange(5))
    top1 = {("knn", "clean", 0): 90.0, **{("knn", "fog", s): 10.0 * s for s in range(1, 6)},
            **{("knn", "snow", s): 50.0 for s in range(1, 6)}}
    summary = summarise(top1, ("fog", "snow"))["knn"]
    assert summary["per_corruption"] == {"fog": 30.0, "snow": 50.0} and summary["mca"] == 40.0
    assert summary["clean"] == 90.0


def test_shift_classes_map_to_training_indices_and_others_cannot_win() -> None:
    training = ["n01", "n02", "n03", "n04", "n05"]
    index = class_mapping(["n02", "n04", "n05"], training, "imagenet-r")
    assert index.tolist() == [1, 3, 4]
    with pytest.raises(ValueError, match="shift set 'bad'.*'n09'"):
        class_mapping(["n02", "n09"], training, "bad")
    scores = torch.tensor([[100.0, 1.0, 0.0, 2.0, 0.0],   # class 0 is outside the subset: n04 (position 1) wins
                           [0.0, 5.0, 9.0, 4.0, 6.0]])    # class 2 likewise: n05 (position 2) wins
    assert restricted_predictions(scores, index).tolist() == [1, 2]


def write_folder(root: Path, classes: dict[str, list[tuple[int, int, int]]]) -> None:
    for wnid, colours in classes.items():
        (root / wnid).mkdir(parents=True)
        for number, colour in enumerate(colours):
            Image.new("RGB", (16, 16), colour).save(root / wnid / f"{number}.png")


@needs_imagecorruptions
def test_evaluate_robustness_and_a_shift_folder(tmp_path: Path) -> None:
    recipe = tmp_path / "mae_micro.yaml"
    recipe.write_text(RECIPE)
    # five "ImageNet" classes of solid colours; the shift set holds three of them, with the training images' colours
    colours = {"n01": (250, 0, 0), "n02": (0, 250, 0), "n03": (0, 0, 250), "n04": (250, 250, 0), "n05": (0, 250, 250)}
    write_folder(tmp_path / "data" / "train", {wnid: [colour, colour] for wnid, colour in colours.items()})
    write_folder(tmp_path / "data" / "val", {wnid: [colour] for wnid, colour in colours.items()})
    write_folder(tmp_path / "shift", {wnid: [colours[wnid]] for wnid in ("n02", "n04", "n05")})
    results = tmp_path / "results"
    rows = evaluate(["--ckpt", f"random:{recipe}", "--protocols", "robustness,knn", "--data-source", "imagefolder",
                     "--data-dir", str(tmp_path / "data"), "--k", "1", "--corruptions", "contrast",
                     "--shift-dir", f"r={tmp_path / 'shift'}", "--results", str(results), *COMMON])
    by_protocol = {row["protocol"]: row for row in rows}
    assert list(by_protocol) == ["knn", "robustness-knn", "shift-r-knn"]  # robustness runs last
    # identical images have identical features: the 1-NN of each shift image is its own training image
    assert by_protocol["shift-r-knn"]["top1"] == "100.00" and by_protocol["shift-r-knn"]["val_images"] == 3
    assert by_protocol["robustness-knn"]["clean_top1"] == by_protocol["knn"]["top1"] == "100.00"
    details = read_csv(results / "robustness.csv")
    per_severity = [float(row["top1"]) for row in details if row["corruption"] == "contrast"
                    and row["severity"] != "mean"]
    mean_row = next(row for row in details if row["corruption"] == "mCA")
    assert float(mean_row["top1"]) == pytest.approx(sum(per_severity) / 5, abs=0.01)
    assert by_protocol["robustness-knn"]["top1"] == mean_row["top1"]
    # --corruptions none: the shift sets only (paper scale: the released ImageNet-A / -R / -Sketch / -C folders)
    rows = evaluate(["--ckpt", f"random:{recipe}", "--protocols", "knn,robustness", "--data-source", "imagefolder",
                     "--data-dir", str(tmp_path / "data"), "--k", "1", "--corruptions", "none",
                     "--shift-dir", f"r={tmp_path / 'shift'}", "--results", str(results), *COMMON])
    assert [(row["protocol"], row["top1"]) for row in rows] == [("knn", "100.00"), ("shift-r-knn", "100.00")]
    assert parse_corruptions("none") == ()
    with pytest.raises(ValueError, match="--corruptions none needs a --shift-dir"):
        evaluate(["--ckpt", f"random:{recipe}", "--protocols", "robustness", "--data-source", "imagefolder",
                  "--data-dir", str(tmp_path / "data"), "--corruptions", "none", "--results", str(results), *COMMON])


@needs_imagecorruptions
def test_logreg_robustness_refits_the_logreg_protocols_classifier(tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "mae_micro.yaml"
    recipe.write_text(RECIPE)
    rows = evaluate(["--ckpt", f"random:{recipe}", "--protocols", "logreg,robustness", "--data-source", "synthetic",
                     "--synthetic-size", "32", "--corruptions", "gaussian_noise", "--results",
                     str(tmp_path / "results"), *COMMON, "--logreg-l2", "1e-1"])
    by_protocol = {row["protocol"]: row for row in rows}
    assert list(by_protocol) == ["logreg", "robustness-logreg"]
    # the same fit on the same (whole) validation split: the same clean top-1
    assert by_protocol["robustness-logreg"]["clean_top1"] == by_protocol["logreg"]["top1"]
    assert by_protocol["robustness-logreg"]["val_images"] == by_protocol["logreg"]["val_images"]
    # a robustness-only call (the reproduce stage after knn,logreg) refits at the L2 the logreg row chose
    again = evaluate(["--ckpt", f"random:{recipe}", "--protocols", "robustness", "--data-source", "synthetic",
                      "--synthetic-size", "32", "--corruptions", "gaussian_noise", "--results",
                      str(tmp_path / "results"), *COMMON, "--logreg-l2", "1e-1,1e-3"])
    assert "robustness: logreg refitted at l2=0.1, the strength this encoder's logreg row chose" in \
        capsys.readouterr().out
    assert {row["protocol"]: row["clean_top1"] for row in again}["robustness-logreg"] == \
        by_protocol["robustness-logreg"]["clean_top1"]


def test_recorded_l2_is_the_latest_choice_of_the_same_encoder_within_the_grid(tmp_path: Path) -> None:
    records = [{"run": "a", "config_hash": "h", "l2": 1e-3}, {"run": "b", "config_hash": "h", "l2": 1e-1},
               {"run": "a", "config_hash": "other", "l2": 1e-2}, {"run": "a", "config_hash": "h", "l2": 1e-5}]
    (tmp_path / "logreg.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    identity = {"run": "a", "config_hash": "h"}
    assert recorded_l2(tmp_path, identity, (1e-3, 1e-5)) == 1e-5
    assert recorded_l2(tmp_path, identity, (1e-3,)) is None  # the latest choice is not in this grid: sweep again
    assert recorded_l2(tmp_path, {"run": "c", "config_hash": "h"}, (1e-5,)) is None
    assert recorded_l2(tmp_path / "empty", identity, (1e-5,)) is None


@needs_imagecorruptions
def test_finetune_robustness_scores_the_fine_tuned_model(tmp_path: Path) -> None:
    recipe = tmp_path / "mae_micro.yaml"
    recipe.write_text(RECIPE)
    rows = evaluate(["--ckpt", f"random:{recipe}", "--protocols", "robustness,finetune", "--data-source",
                     "synthetic", "--synthetic-size", "32", "--epochs", "1", "--corruptions", "pixelate",
                     "--feature-cache", "none", "--results", str(tmp_path / "results"), *COMMON])
    by_protocol = {row["protocol"]: row for row in rows}
    assert list(by_protocol) == ["finetune", "robustness-finetune"]  # no k-NN or logreg when fine-tuning ran
    # the final epoch's model on the same (whole) validation split: the same clean top-1
    assert by_protocol["robustness-finetune"]["clean_top1"] == by_protocol["finetune"]["top1"]
