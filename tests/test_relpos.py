"""BEiT's relative position bias on the shared backbone (hand-written index tables, masks, kept-token gathers),
the round trip with timm's Beit, and fine-tuning it with a table per block."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lightning_mim.backbone import BackboneConfig, MIMViT
from lightning_mim.backbone.rel_pos import combine_attention_masks, relative_position_bias
from lightning_mim.backbone.timm_beit import build_timm_beit, to_beit_state
from lightning_mim.eval.evaluate import CONFIG_DIR
from lightning_mim.eval.finetune import FineTune
from lightning_mim.eval.weights import load_encoder_state, load_into, main, save_encoder

# a cls token, 2 x 2 patches in raster order (0,0), (0,1), (1,0), (1,1): entry (dr + 1) * 3 + (dc + 1) for the
# offset (dr, dc) of the query from the key; 9 = cls -> token, 10 = token -> cls, 11 = cls -> cls
INDEX_2X2 = [
    [11, 9, 9, 9, 9],
    [10, 4, 3, 1, 0],
    [10, 5, 4, 2, 1],
    [10, 7, 6, 4, 3],
    [10, 8, 7, 5, 4],
]
# 3 x 3 patches: entry (dr + 2) * 5 + (dc + 2); 25 = cls -> token, 26 = token -> cls, 27 = cls -> cls
INDEX_3X3 = [
    [27, 25, 25, 25, 25, 25, 25, 25, 25, 25],
    [26, 12, 11, 10, 7, 6, 5, 2, 1, 0],
    [26, 13, 12, 11, 8, 7, 6, 3, 2, 1],
    [26, 14, 13, 12, 9, 8, 7, 4, 3, 2],
    [26, 17, 16, 15, 12, 11, 10, 7, 6, 5],
    [26, 18, 17, 16, 13, 12, 11, 8, 7, 6],
    [26, 19, 18, 17, 14, 13, 12, 9, 8, 7],
    [26, 22, 21, 20, 17, 16, 15, 12, 11, 10],
    [26, 23, 22, 21, 18, 17, 16, 13, 12, 11],
    [26, 24, 23, 22, 19, 18, 17, 14, 13, 12],
]


def rel_pos_config(mode: str = "shared", **overrides) -> BackboneConfig:
    return BackboneConfig(**({"size": "micro", "img_size": 16, "patch_size": 4, "pos_embed": "none", "qkv_bias": "qv",
                              "rel_pos_bias": mode, "init": "simmim", "timm_kwargs": {"init_values": 0.1}}
                             | overrides))


def randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter random (tables, LayerScale and biases too: their init is zero or constant); a fused qkv bias
    keeps its k third at zero (BEiT has none)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.normal_(std=0.5 if "relative_position" in name else 0.1)
            if name.endswith("attn.qkv.bias"):
                third = parameter.shape[0] // 3
                parameter[third:2 * third] = 0
    return model.eval()


@pytest.mark.parametrize("grid, expected", [((2, 2), INDEX_2X2), ((3, 3), INDEX_3X3)])
def test_index_table_by_hand(grid: tuple[int, int], expected: list[list[int]]) -> None:
    config = rel_pos_config(img_size=4 * grid[0])
    model = MIMViT(config)
    assert model.relative_position_index.tolist() == expected
    entries = (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3
    assert tuple(model.rel_pos_bias.relative_position_bias_table.shape) == (entries, 4)
    assert torch.count_nonzero(model.rel_pos_bias.relative_position_bias_table) == 0  # starts at zero
    assert "relative_position_index" not in model.state_dict()  # rebuilt from the grid, as in timm


def test_bias_values_and_gathered_positions_by_hand() -> None:
    index = torch.tensor(INDEX_2X2)
    table = torch.stack([torch.arange(12.0), -torch.arange(12.0)], dim=1)  # head 0: the entry, head 1: minus it
    bias = relative_position_bias(table, index)
    assert bias.shape == (1, 2, 5, 5)
    assert bias[0, 0].tolist() == INDEX_2X2 and torch.equal(bias[0, 1], -bias[0, 0])
    positions = torch.tensor([[0, 2, 4], [0, 4, 1]])  # cls + patches 1, 3; cls + patches 3, 0
    gathered = relative_position_bias(table, index, positions)
    assert gathered[0, 0].tolist() == [[11, 9, 9], [10, 4, 1], [10, 7, 4]]
    assert gathered[1, 0].tolist() == [[11, 9, 9], [10, 4, 8], [10, 0, 4]]


def test_bool_mask_becomes_minus_infinity_before_the_bias() -> None:
    bias = torch.ones(1, 1, 2, 2)
    allowed = torch.tensor([[True, False], [True, True]])
    assert combine_attention_masks(allowed, bias)[0, 0].tolist() == [[1.0, float("-inf")], [1.0, 1.0]]
    assert combine_attention_masks(torch.full((2, 2), 2.0), bias)[0, 0].tolist() == [[3.0, 3.0], [3.0, 3.0]]
    assert combine_attention_masks(None, bias) is bias


@pytest.mark.parametrize("mode", ["shared", "per_block"])
def test_kept_tokens_see_their_own_positions(mode: str) -> None:
    """forward_kept gathers the bias: it equals the full forward with the dropped patches masked out as keys."""
    model = randomised(MIMViT(rel_pos_config(mode)))
    images = torch.randn(2, 3, 16, 16)
    keep = torch.tensor([[5, 0, 12, 7], [3, 15, 1, 9]])
    kept = model.forward_kept(images, keep)
    allowed = torch.zeros(2, 17, dtype=torch.bool)
    allowed[:, 0] = True
    allowed.scatter_(1, keep + 1, True)
    full = model.forward_full(images, attn_mask=allowed[:, None, None, :])
    expected = torch.cat([full[:, :1], torch.gather(full, 1, (keep + 1)[..., None].expand(-1, -1, 128))], dim=1)
    torch.testing.assert_close(kept, expected, atol=1e-5, rtol=0)
    # without the gather (the bias of positions 0..4 whatever the patches) the outputs differ
    assert not torch.allclose(model.forward_tokens(model.prepend_prefix(torch.gather(
        model.embed_patches(images), 1, keep[..., None].expand(-1, -1, 128))), positions=torch.arange(5).expand(2, -1)),
        expected, atol=1e-3)


def test_rel_pos_refuses_other_sequences_and_non_beit_attention() -> None:
    model = MIMViT(rel_pos_config())
    with pytest.raises(ValueError, match="is not the cls token and the 16 patches"):
        model.forward_tokens(torch.randn(1, 9, 128))
    with pytest.raises(ValueError, match="set class_token: true and qkv_bias: qv"):
        rel_pos_config(qkv_bias="qkv")
    with pytest.raises(ValueError, match="unknown rel_pos_bias"):
        rel_pos_config("global")


@pytest.mark.parametrize("mode", ["shared", "per_block"])
def test_timm_beit_round_trip(mode: str) -> None:
    config = rel_pos_config(mode)
    beit = randomised(build_timm_beit(config))
    state, report = load_encoder_state(beit.state_dict(), config)
    assert not report.missing and not report.unexpected
    model = MIMViT(config).eval()
    load_into(model, state, report)
    images = torch.randn(2, 3, 16, 16)
    assert (model.forward_full(images) - beit.forward_features(images)).abs().max() <= 1e-6
    exported = to_beit_state(model.state_dict(), config)
    assert exported.keys() == beit.state_dict().keys()
    assert all(torch.equal(value, beit.state_dict()[key]) for key, value in exported.items())


def test_export_of_a_simmim_checkpoint_loads_into_timm_beit(tmp_path: Path) -> None:
    config = rel_pos_config()
    backbone = randomised(MIMViT(config))
    path = tmp_path / "last.ckpt"
    state = {f"backbone.{key}": value for key, value in backbone.state_dict().items()}
    hyper = {"backbone": config.to_dict(), "_class_path": "lightning_mim.methods.SimMIM"}
    torch.save({"state_dict": state | {"mask_token": torch.zeros(1, 1, 128)}, "hyper_parameters": hyper}, path)
    output = main([str(path), str(tmp_path / "encoder.safetensors")])
    beit = build_timm_beit(config).eval()
    beit.load_state_dict(load_file(str(output)), strict=True)
    images = torch.randn(2, 3, 16, 16)
    assert torch.equal(beit.forward_features(images), backbone.forward_full(images))
    state, report = load_encoder_state(output, config)  # and back: the exported file reads as MIMViT weights
    load_into(reloaded := MIMViT(config), state, report)
    assert all(torch.equal(value, backbone.state_dict()[key]) for key, value in reloaded.state_dict().items())


def test_finetune_copies_the_shared_table_to_every_block_and_decays_it(tmp_path: Path) -> None:
    config = rel_pos_config()
    encoder = randomised(MIMViT(config))
    weights = save_encoder(encoder.state_dict(), config, tmp_path / "encoder.safetensors")
    recipe = yaml.safe_load((CONFIG_DIR / "eval" / "finetune_simmim_vit_b16_in1k.yaml").read_text())["model"]
    assert recipe["rel_pos_bias"] == "per_block" and recipe["global_pool"] == "avg"
    module = FineTune(config, num_classes=10, pretrained=str(weights), **(recipe | {"global_pool": "token"}))
    shared = encoder.rel_pos_bias.relative_position_bias_table
    assert module.model.rel_pos_bias is None
    for block in module.model.blocks:
        assert torch.equal(block.attn.relative_position_bias_table, shared)
    images = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(module.model.eval().forward_features(images), encoder.forward_full(images),
                               atol=1e-6, rtol=0)
    tables = {id(block.attn.relative_position_bias_table) for block in module.model.blocks}
    decayed = {id(p) for group in module.optimizer_groups() if group["weight_decay"] > 0 for p in group["params"]}
    assert tables <= decayed
    with pytest.raises(ValueError, match="unknown rel_pos_bias"):
        FineTune(config, num_classes=10, rel_pos_bias="both")
