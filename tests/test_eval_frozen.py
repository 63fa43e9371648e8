"""`lightning-mim evaluate` on frozen features: the raw-pixel reference, the logreg protocol and the feature cache."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data import write_idx

from lightning_mim.eval import features as features_module
from lightning_mim.eval.evaluate import main as evaluate

SYNTHETIC = ["--data-source", "synthetic", "--synthetic-size", "64", "--batch-size", "16", "--num-workers", "0",
             "--knn-bank", "32", "--accelerator", "cpu"]


def region(rows: slice, columns: slice) -> np.ndarray:
    image = np.zeros((28, 28), dtype=np.uint8)
    image[rows, columns] = 255
    return image


def read_rows(results: Path) -> list[dict[str, str]]:
    with (results / "results.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_knn_on_raw_pixels_gives_the_hand_value(tmp_path: Path) -> None:
    top, bottom, left, right = slice(0, 14), slice(14, 28), slice(0, 14), slice(14, 28)
    full = slice(0, 28)
    # bank: A = left half (class 0), B = right half (class 1), C = top half (class 1); with mean 0 and std 1 the
    # features are the 0/1 pixels, so the cosine similarities are overlaps: cos(A, C) = cos(B, C) = 1/2, cos(A, B) = 0
    bank = np.stack([region(full, left), region(full, right), region(top, full)])
    # tests: left half -> A (class 0, right); right half -> B (1, right); top half -> C (1, wrong: labelled 0);
    # bottom-right quadrant -> B at 1/sqrt(2), A and C at 0 (1, right): 3 of 4
    tests = np.stack([region(full, left), region(full, right), region(top, full), region(bottom, right)])
    for prefix, images, labels in (("train", bank, [0, 1, 1]), ("t10k", tests, [0, 1, 0, 1])):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.array(labels))
    data_config = tmp_path / "data.yaml"
    data_config.write_text(f"data: {{source: fashion_mnist, data_dir: {tmp_path}, mean: [0.0], std: [1.0], "
                           f"batch_size: 2, num_workers: 0, knn_bank_size: null}}\n")
    rows = evaluate(["--ckpt", "pixels", "--protocols", "knn", "--data-config", str(data_config), "--k", "1",
                     "--accelerator", "cpu", "--results", str(tmp_path / "results")])
    assert rows[0]["top1"] == "75.00" and rows[0]["run"] == "pixels"


def test_pixels_rows_logreg_details_and_the_feature_cache(tmp_path: Path, monkeypatch) -> None:
    extracted: list[int] = []
    extract = features_module.extract_features

    def counting_extract(*args, **kwargs):
        result = extract(*args, **kwargs)
        extracted.append(result[0].shape[0])
        return result

    monkeypatch.setattr(features_module, "extract_features", counting_extract)
    results, data_config = tmp_path / "results", tmp_path / "data.yaml"
    data_config.write_text("data: {source: synthetic, synthetic_image_size: 8}\n")  # 8 x 8 RGB: 192 features
    arguments = ["--ckpt", "pixels", "--protocols", "knn,logreg", "--results", str(results), "--logreg-l2",
                 "1e-3,1e-1", "--data-config", str(data_config), *SYNTHETIC]
    evaluate(arguments)
    # the k-NN bank (32), the val split (64 // 4, shared by both protocols) and logreg's whole training split
    assert extracted == [16, 32, 64]
    rows = read_rows(results)
    assert [(row["run"], row["method"], row["protocol"], row["epochs"]) for row in rows] == [
        ("pixels", "pixels", "knn", "0"), ("pixels", "pixels", "logreg", "0")]
    assert all(0.0 <= float(row["top1"]) <= float(row["top5"]) <= 100.0 for row in rows)
    details = [json.loads(line) for line in (results / "logreg.jsonl").read_text().splitlines()]
    assert len(details) == 1 and details[0]["run"] == "pixels" and details[0]["timestamp"] == rows[1]["timestamp"]
    assert set(details[0]["heldout_top1"]) == {"0.001", "0.1"} and details[0]["l2"] in (1e-3, 1e-1)

    evaluate(arguments)  # everything read back from the cache
    assert extracted == [16, 32, 64]
    assert [row["top1"] for row in read_rows(results)[2:]] == [row["top1"] for row in rows]
    evaluate([*arguments, "--val-subset", "8", "--protocols", "knn"])  # another val split: only it is extracted
    assert extracted == [16, 32, 64, 8]
    evaluate([*arguments, "--feature-cache", "none"])  # extracted again, the val split once for both protocols
    assert extracted[4:] == [16, 32, 64]


def test_cached_features_are_the_raw_encoder_features(tmp_path: Path) -> None:
    recipe = tmp_path / "mae.yaml"
    recipe.write_text("seed_everything: 1\nmodel:\n  class_path: lightning_mim.methods.MAE\n  init_args:\n"
                      "    backbone: {size: micro, img_size: 16, patch_size: 4}\n    decoder_dim: 32\n"
                      "    decoder_depth: 1\n    decoder_heads: 4\n")
    cache = tmp_path / "cache"
    evaluate(["--ckpt", f"random:{recipe}", "--protocols", "knn", "--feature-cache", str(cache),
              "--results", str(tmp_path / "results"), *SYNTHETIC])
    stored = [torch.load(path, weights_only=True) for path in sorted(cache.glob("*.pt"))]
    assert len(stored) == 2
    for entry in stored:
        identity = json.loads(entry["identity"])
        assert identity["encoder"]["pool"] == "avg" and len(identity["encoder"]["weights_sha256"]) == 64
        assert entry["features"].shape[1] == 128  # ViT-micro's width, and not normalised:
        assert not torch.allclose(entry["features"].norm(dim=1), torch.ones(entry["features"].shape[0]))


def test_pixels_refuse_the_trained_protocols(capsys) -> None:
    with pytest.raises(SystemExit):
        evaluate(["--ckpt", "pixels", "--protocols", "knn,linear"])
    assert "--ckpt pixels has no encoder to train with linear: use --protocols knn,logreg" in capsys.readouterr().err


def test_a_bad_l2_grid_is_refused(capsys) -> None:
    with pytest.raises(SystemExit):
        evaluate(["--ckpt", "pixels", "--protocols", "logreg", "--logreg-l2", "1e-3,-1"])
    assert "not a comma-separated list of positive L2 strengths" in capsys.readouterr().err
