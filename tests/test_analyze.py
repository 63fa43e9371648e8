"""Representation analyses: the spectrum of a constructed matrix, attention distance and entropy of hand-made maps,
the captured attention against a direct computation, and `lightning-mim analyze` end to end."""
import csv
import math

import pytest
import torch

from lightning_mim.backbone import build_backbone
from lightning_mim.eval import analyze
from lightning_mim.eval.representation import (
    attention_distance, attention_entropy, capture_attention, feature_spectrum, patch_distances,
)


def matrix_with_singular_values(values: list[float], rows: int = 64) -> torch.Tensor:
    """A (rows, len(values)) matrix with zero column means whose singular values are `values`: U diag(s) V^T with
    U's columns orthonormal and orthogonal to the ones vector (QR of [ones, random columns], first column dropped)."""
    generator = torch.Generator().manual_seed(0)
    columns = torch.cat([torch.ones(rows, 1, dtype=torch.float64),
                         torch.randn(rows, len(values), generator=generator, dtype=torch.float64)], dim=1)
    left = torch.linalg.qr(columns)[0][:, 1:]
    right = torch.linalg.qr(torch.randn(len(values), len(values), generator=generator, dtype=torch.float64))[0]
    return left @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ right.T


def test_spectrum_of_a_constructed_matrix():
    spectrum = feature_spectrum(matrix_with_singular_values([4.0, 2.0, 1.0, 1.0]), threshold=0.3)
    assert torch.allclose(spectrum.singular_values, torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=torch.float64))
    entropy = 1.75 * math.log(2)  # p = (1/2, 1/4, 1/8, 1/8): 1/2 + 2/4 + 3/8 + 3/8 = 1.75 bits
    assert spectrum.entropy == pytest.approx(entropy, abs=1e-9)
    assert spectrum.effective_rank == pytest.approx(math.exp(entropy), abs=1e-9)
    assert spectrum.above_threshold == 2  # 1.0 and 0.5 exceed 0.3; 0.25 does not
    assert torch.allclose(spectrum.normalised_log, torch.log(torch.tensor([1.0, 0.5, 0.25, 0.25], dtype=torch.float64)))


def test_a_flat_spectrum_has_full_effective_rank_and_the_mean_is_removed():
    features = matrix_with_singular_values([3.0] * 5) + 100.0  # a common offset is not a direction of variation
    assert feature_spectrum(features).effective_rank == pytest.approx(5.0, abs=1e-9)


def test_patch_distances_of_a_2x2_grid():
    p = 16
    expected = torch.tensor([[0, p, p, p * math.sqrt(2)],
                             [p, 0, p * math.sqrt(2), p],
                             [p, p * math.sqrt(2), 0, p],
                             [p * math.sqrt(2), p, p, 0]], dtype=torch.float64)
    assert torch.allclose(patch_distances((2, 2), p), expected)


def test_attention_distance_of_hand_made_maps():
    p, tokens = 16, 4  # a 2 x 2 grid
    one_hot_self = torch.eye(tokens)[None, None]
    uniform = torch.full((1, 1, tokens, tokens), 1 / tokens)
    right_or_left = torch.tensor([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]], dtype=torch.float32)
    maps = torch.cat([one_hot_self, uniform, right_or_left[None, None]], dim=1)  # three heads
    distance = attention_distance(maps, (2, 2), p)
    assert torch.allclose(distance, torch.tensor([0.0, (2 * p + p * math.sqrt(2)) / 4, p], dtype=torch.float64))
    entropy = attention_entropy(maps)
    assert torch.allclose(entropy, torch.tensor([0.0, math.log(4), 0.0], dtype=torch.float64))


def test_a_cls_token_is_left_out_of_the_distance_and_counted_in_the_entropy():
    # a cls token first: each patch query gives half its attention to cls and half to itself
    attention = torch.zeros(1, 1, 5, 5)
    attention[0, 0, 0] = 0.2
    attention[0, 0, 1:, 0] = 0.5
    attention[0, 0, 1:, 1:] = 0.5 * torch.eye(4)
    assert attention_distance(attention, (2, 2), 16, prefix_tokens=1).item() == pytest.approx(0.0)
    assert attention_entropy(attention, prefix_tokens=1).item() == pytest.approx(math.log(2))


def test_captured_attention_is_the_backbones_own():
    torch.manual_seed(0)
    model = build_backbone(size="micro", img_size=16, patch_size=4, in_chans=1).eval()
    images = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        fused_output = model.forward_full(images)
        with capture_attention(model) as maps:
            unfused_output = model.forward_full(images)
    assert len(maps) == len(model.blocks) and maps[0].shape == (2, 4, 17, 17)
    assert torch.allclose(fused_output, unfused_output, atol=1e-5)
    assert all(block.attn.fused_attn for block in model.blocks)  # restored
    # a direct computation of block 0's attention: softmax(q k^T / sqrt(d)) of its own projections
    block, heads = model.blocks[0], model.blocks[0].attn.num_heads
    with torch.no_grad():
        tokens = model.norm_pre(model.prepend_prefix(model.embed_patches(images)))
        q, k, _ = block.attn.qkv(block.norm1(tokens)).reshape(2, 17, 3, heads, -1).permute(2, 0, 3, 1, 4)
        direct = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(dim=-1)
    assert torch.allclose(maps[0], direct, atol=1e-6)


def test_analyze_command_writes_tables_figures_and_tensorboard(tmp_path):
    recipe = "configs/mae/vit_micro_p4_demo_fmnist.yaml"
    analyses = analyze.main(["--ckpt", f"random:{recipe}", "--ckpt", f"random:{recipe}", "--out", str(tmp_path),
                             "--data-source", "synthetic", "--synthetic-size", "16", "--images", "16",
                             "--batch-size", "8", "--adapt-images", "--accelerator", "cpu"])
    assert len({analysis.run for analysis in analyses}) == 2  # two encoders with the same name get distinct labels
    # the same recipe and seed: the same encoder, the same numbers
    assert analyses[0].spectra["patch"].effective_rank == pytest.approx(analyses[1].spectra["patch"].effective_rank)
    rows = list(csv.DictReader((tmp_path / "analysis.csv").open()))
    depth = 4
    assert sum(row["quantity"] == "attention_distance_px" and row["head"] == "mean" for row in rows) == 2 * depth
    assert {row["quantity"] for row in rows} >= {"effective_rank_patch", "effective_rank_pooled", "attention_entropy"}
    for name in ("spectrum", "attention_distance", "attention_entropy"):
        assert (tmp_path / f"{name}.png").stat().st_size > 0
    assert len(list((tmp_path / "tensorboard").iterdir())) == 2
