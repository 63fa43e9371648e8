"""The k-CLIP and VQ-KD recipes pin their tokenizer's settings, and a codebook fitted with other settings (here a tiny
one recording `tokenizer fit`'s defaults) is refused at start-up with the command that fits the recipe's."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from lightning_mim.targets import build_tokenizer
from lightning_mim.targets.kmeans import save_codebook

ROOT = Path(__file__).resolve().parents[1]
KCLIP = sorted([*ROOT.glob("configs/beit/*kclip*.yaml"), *ROOT.glob("configs/mapet/*kclip*.yaml")])
VQKD = sorted([*ROOT.glob("configs/beit/*vqkd*.yaml"), *ROOT.glob("configs/mapet/*vqkd*.yaml")])


def tokenizer_of(recipe: Path) -> dict:
    return yaml.safe_load(recipe.read_text())["model"]["init_args"]["tokenizer"]


def test_the_recipes_state_the_papers_tokenizer_settings():
    assert len(KCLIP) == 4 and len(VQKD) == 4
    for recipe in KCLIP:  # mapet.md 2.1: faiss Kmeans(k=8192, nredo=5, max_points_per_centroid=512), 448-px view
        tokenizer = tokenizer_of(recipe)
        assert (tokenizer["features"], tokenizer["vocab_size"], tokenizer["input_size"], tokenizer["nredo"],
                tokenizer["max_points_per_centroid"]) == ("open_clip:RN50x64", 8192, 448, 5, 512), recipe.name
    for recipe in VQKD:
        tokenizer = tokenizer_of(recipe)
        assert tokenizer["path"].endswith("vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth")
        assert (tokenizer["vocab_size"], tokenizer["input_size"]) == (8192, 224), recipe.name


@pytest.mark.parametrize("recorded,differs", [
    ({"vocab_size": 16, "nredo": 1, "max_points_per_centroid": 256},
     "vocab_size 16 (the recipe: 8192), nredo 1 (the recipe: 5), max_points_per_centroid 256 (the recipe: 512)"),
    ({"vocab_size": 8192, "nredo": 5, "max_points_per_centroid": 256}, "max_points_per_centroid 256 (the recipe: 512)"),
], ids=["fit-defaults", "points-per-centroid"])
def test_a_codebook_fitted_otherwise_than_its_recipe_is_refused_with_the_fit_command(tmp_path, recorded, differs):
    codebook = tmp_path / "kclip.safetensors"
    save_codebook(torch.randn(recorded["vocab_size"], 8), codebook,
                  {"kind": "kmeans", "features": "open_clip:RN50x64", "weights": None, "input_size": 448,
                   "patch_size": 32, "in_chans": 3, "dim": 8} | recorded)
    tokenizer = tokenizer_of(ROOT / "configs/mapet/vit_b16_300ep_in1k_kclip.yaml") | {"path": str(codebook)}
    expected = (f"{codebook} was fitted with {differs}: it is not the codebook the recipe asks for. Fit that one "
                f"with: lightning-mim tokenizer fit {codebook} --features open_clip:RN50x64 --weights "
                f"checkpoints/RN50x64.pt --input-size 448 --vocab-size 8192 --nredo 5 --max-points-per-centroid 512 "
                f"--compute-dtype float16 --source imagefolder --data-dir <ImageNet-1k folder>")
    with pytest.raises(ValueError) as refused:
        build_tokenizer(tokenizer)
    assert str(refused.value).startswith(expected)
