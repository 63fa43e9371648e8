"""Loading official and project checkpoints into timm ViTs (lightning_mim.eval.weights)."""
from __future__ import annotations

import argparse
import pickle
import socket
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer

from lightning_mim.backbone import BackboneConfig, MIMViT, timm_model_name
from lightning_mim.eval.weights import (
    backbone_config_of, export_encoder, load_encoder_state, load_into, main, read_checkpoint,
)
from lightning_mim.methods import LUT, MAE

MICRO = BackboneConfig(size="micro", img_size=16, patch_size=4, in_chans=3)


def timm_encoder(config: BackboneConfig = MICRO, **overrides) -> VisionTransformer:
    return VisionTransformer(**(config.timm_kwargs_full() | overrides))


def mae_official_checkpoint(encoder: dict[str, torch.Tensor]) -> dict:
    """MAE's `{"model": ...}` layout: encoder keys under a DDP `module.` prefix plus the decoder and mask token."""
    state = {f"module.{key}": value.clone() for key, value in encoder.items()}
    state |= {"module.mask_token": torch.randn(1, 1, 64), "module.decoder_embed.weight": torch.randn(64, 128),
              "module.decoder_pos_embed": torch.randn(1, 17, 64),
              "module.decoder_blocks.0.attn.qkv.weight": torch.randn(192, 64),
              "module.decoder_norm.weight": torch.randn(64), "module.decoder_pred.weight": torch.randn(48, 64)}
    return {"model": state, "epoch": 1599}


def test_mae_official_layout_loads_without_unexpected_keys() -> None:
    encoder = timm_encoder().state_dict()
    state, report = load_encoder_state(mae_official_checkpoint(encoder), MICRO)
    assert report.layout == "official:model" and not report.unexpected and not report.missing
    assert {"module.mask_token", "module.decoder_embed.weight", "module.decoder_pred.weight"} <= set(report.dropped)
    model = timm_encoder()
    load_into(model, state, report)
    for key, value in model.state_dict().items():
        assert torch.equal(value, encoder[key]), key


def test_lut_official_layout_drops_projector_predictor_and_norm_under_global_pool() -> None:
    encoder = timm_encoder().state_dict()
    state = {f"backbone.{key}": value for key, value in encoder.items()}
    state |= {"head.0.weight": torch.randn(256, 128), "head.1.weight": torch.randn(256),
              "head.1.bias": torch.randn(256),
              "head.1.running_mean": torch.randn(256), "head.1.running_var": torch.rand(256),
              "head.1.num_batches_tracked": torch.tensor(5), "head.3.weight": torch.randn(128, 256),
              "predictor.0.weight": torch.randn(256, 128), "mask_token": torch.randn(1, 1, 128),
              "decoder_embed.weight": torch.randn(64, 128)}
    loaded, report = load_encoder_state({"model": state}, MICRO, global_pool=True)
    assert not any(key.startswith(("head", "predictor", "norm.")) for key in loaded)
    assert {"head.0.weight", "head.1.running_var", "head.3.weight", "backbone.norm.weight"} <= set(report.dropped)
    assert sorted(report.missing) == ["fc_norm.bias", "fc_norm.weight"] and not report.unexpected
    classifier = timm_encoder(num_classes=10, global_pool="avg")
    head_before = classifier.head.weight.clone()
    load_into(classifier, loaded, report, allow_missing=("head.*", "fc_norm.*"))
    assert torch.equal(classifier.head.weight, head_before)
    assert torch.equal(classifier.blocks[0].attn.qkv.weight, encoder["blocks.0.attn.qkv.weight"])


def beit_checkpoint(encoder: dict[str, torch.Tensor], layer_scale: bool) -> tuple[dict, dict]:
    """BEiT / MaPeT layout: q_bias and v_bias instead of qkv.bias, optional gamma_1 / gamma_2."""
    state, biases = {}, {}
    for key, value in encoder.items():
        if key.endswith("attn.qkv.bias"):
            prefix = key[: -len("qkv.bias")]
            q, v = torch.randn(128), torch.randn(128)
            state[prefix + "q_bias"], state[prefix + "v_bias"] = q, v
            biases[key] = torch.cat([q, torch.zeros(128), v])
        elif ".ls1." in key or ".ls2." in key:
            state[key.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2")] = value
        else:
            state[key] = value
    if not layer_scale:
        state |= {f"blocks.{i}.gamma_{j}": torch.rand(128) for i in range(4) for j in (1, 2)}
    return {"model": state}, biases


def test_beit_layout_fuses_qv_bias_and_maps_layer_scale() -> None:
    config = BackboneConfig(size="micro", img_size=16, patch_size=4, timm_kwargs={"init_values": 0.1})
    source = timm_encoder(config)
    torch.nn.init.normal_(source.blocks[2].ls1.gamma)
    checkpoint, biases = beit_checkpoint(source.state_dict(), layer_scale=True)
    state, report = load_encoder_state(checkpoint, config)
    assert not report.unexpected and not report.missing
    assert report.renamed["blocks.2.gamma_1"] == "blocks.2.ls1.gamma"
    model = timm_encoder(config)
    load_into(model, state, report)
    for key, bias in biases.items():
        assert torch.equal(model.state_dict()[key], bias)
        assert torch.count_nonzero(model.state_dict()[key][128:256]) == 0
    assert torch.equal(model.blocks[2].ls1.gamma, source.blocks[2].ls1.gamma)


def test_beit_layer_scale_without_init_values_and_rel_pos_bias_are_reported() -> None:
    checkpoint, _ = beit_checkpoint(timm_encoder().state_dict(), layer_scale=False)
    checkpoint["model"]["rel_pos_bias.relative_position_bias_table"] = torch.randn(10, 4)
    state, report = load_encoder_state(checkpoint, MICRO)
    assert "blocks.0.gamma_1" in report.unexpected
    assert "rel_pos_bias.relative_position_bias_table" in report.unexpected
    with pytest.raises(ValueError, match="unexpected keys"):
        load_into(timm_encoder(), state, report)


def mapet_checkpoint(encoder: dict[str, torch.Tensor]) -> dict:
    """MaPeT layout (timm train script): `state_dict` with `attn.q` (D -> D) and `attn.kv` (D -> 2D, k then v)
    linears, timm layer scale `ls1.gamma` / `ls2.gamma`, the mask token and the token head `decoder`."""
    state = {}
    for key, value in encoder.items():
        if ".attn.qkv." in key:
            prefix, kind = key.split(".qkv.")
            state[f"{prefix}.q.{kind}"], state[f"{prefix}.kv.{kind}"] = value[:128].clone(), value[128:].clone()
        else:
            state[key] = value
    state |= {"mask_positional_token": torch.randn(1, 1, 128), "decoder.weight": torch.randn(8192, 128),
              "decoder.bias": torch.zeros(8192)}
    return {"state_dict": state, "epoch": 309, "arch": "mapet_base"}


def test_mapet_layout_fuses_q_and_kv() -> None:
    config = BackboneConfig(size="micro", img_size=16, patch_size=4, timm_kwargs={"init_values": 0.1})
    source = timm_encoder(config)
    for parameter in source.parameters():
        torch.nn.init.normal_(parameter)
    state, report = load_encoder_state(mapet_checkpoint(source.state_dict()), config, global_pool=True)
    assert report.layout == "official:state_dict" and not report.unexpected
    assert sorted(report.missing) == ["fc_norm.bias", "fc_norm.weight"]
    assert {"mask_positional_token", "decoder.weight", "norm.weight"} <= set(report.dropped)
    assert report.renamed["blocks.1.attn.kv.weight"] == "blocks.1.attn.qkv.weight"
    model = timm_encoder(config, global_pool="avg", num_classes=5)
    load_into(model, state, report, allow_missing=("head.*", "fc_norm.*"))
    for key, value in source.state_dict().items():
        if not key.startswith("norm."):
            assert torch.equal(model.state_dict()[key], value), key
    # without layer scale in the target, the gammas are reported, never dropped
    _, plain_report = load_encoder_state(mapet_checkpoint(source.state_dict()), MICRO)
    assert "blocks.0.ls1.gamma" in plain_report.unexpected


def test_released_mapet_finetuned_checkpoint_loads_whole() -> None:
    """MaPeT's released `vit_standard_*` fine-tuned models: q / kv split, layer scale, avg pooling with fc_norm (no
    final norm) and the 1000-class head, under the timm train script's `state_dict`."""
    config = BackboneConfig(size="micro", img_size=16, patch_size=4, timm_kwargs={"init_values": 0.1})
    source = timm_encoder(config, global_pool="avg", num_classes=1000)
    for parameter in source.parameters():
        torch.nn.init.normal_(parameter)
    released = mapet_checkpoint({k: v for k, v in source.state_dict().items() if not k.startswith("norm.")})
    for key in ("mask_positional_token", "decoder.weight", "decoder.bias"):
        del released["state_dict"][key]
    state, report = load_encoder_state(released, config, global_pool=True, num_classes=1000)
    assert not report.missing and not report.unexpected and not report.dropped
    model = timm_encoder(config, global_pool="avg", num_classes=1000)
    load_into(model, state, report)
    images = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model.eval()(images), source.eval()(images))


def test_lut_lightning_checkpoint_takes_the_student_never_the_teacher() -> None:
    model = LUT(backbone=MICRO, decoder_dim=32, decoder_depth=1, decoder_heads=4, head_hidden_dim=64)
    with torch.no_grad():
        for parameter in model.teacher.parameters():
            parameter.add_(1.0)
    state, report = load_encoder_state({"state_dict": model.state_dict()}, MICRO)
    assert report.layout == "lightning" and not report.unexpected and not report.missing
    assert any(key.startswith("teacher.backbone.") for key in report.dropped)
    assert any(key.startswith("projector.") for key in report.dropped)
    assert not any(key.startswith(("teacher", "head", "projector", "predictor")) for key in state)
    assert set(report.dropped) == {key for key in model.state_dict() if not key.startswith("backbone.")}
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(state[key], value), key


def test_shape_mismatch_names_both_shapes() -> None:
    checkpoint = {"model": timm_encoder().state_dict()}
    wrong = BackboneConfig(size="micro", img_size=32, patch_size=4)
    with pytest.raises(ValueError, match=r"pos_embed: checkpoint \(1, 17, 128\) vs model \(1, 65, 128\)"):
        load_encoder_state(checkpoint, wrong)
    with pytest.raises(ValueError, match=r"pos_embed: checkpoint \(1, 17, 128\) vs model \(1, 5, 128\); "
                                         r"patch_embed.proj.weight: checkpoint \(128, 3, 4, 4\) vs model "
                                         r"\(128, 3, 8, 8\)"):
        load_encoder_state(checkpoint, BackboneConfig(size="micro", img_size=16, patch_size=8))
    with pytest.raises(ValueError, match=r"cls_token: checkpoint \(1, 1, 128\) vs model \(1, 1, 192\)"):
        load_encoder_state(checkpoint, BackboneConfig(size="tiny", img_size=16, patch_size=4))


class _Payload:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_malicious_pickle_is_refused_without_running(tmp_path: Path) -> None:
    victim = tmp_path / "pwned"
    checkpoint = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "payload": _Payload(victim)}, checkpoint)
    assert not victim.exists()
    with pytest.raises(pickle.UnpicklingError):
        load_encoder_state(checkpoint, MICRO)
    with pytest.raises(pickle.UnpicklingError):
        read_checkpoint(checkpoint)
    assert not victim.exists()


def test_training_checkpoint_with_argparse_namespace_loads(tmp_path: Path) -> None:
    encoder = timm_encoder().state_dict()
    path = tmp_path / "checkpoint-1599.pth"
    torch.save(mae_official_checkpoint(encoder) | {"args": argparse.Namespace(blr=1.5e-4, model="mae")}, path)
    state, report = load_encoder_state(path, MICRO)
    assert not report.unexpected and not report.missing and read_checkpoint(path)["args"].blr == 1.5e-4


def lightning_checkpoint(tmp_path: Path, config: BackboneConfig) -> tuple[Path, MAE]:
    model = MAE(backbone=config, decoder_dim=32, decoder_depth=1, decoder_heads=4)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": model.state_dict(),
                "hyper_parameters": dict(model.hparams) | {"_class_path": "lightning_mim.methods.MAE"}}, path)
    return path, model


def test_export_round_trips_bit_exactly_into_timm(tmp_path: Path) -> None:
    path, model = lightning_checkpoint(tmp_path, MICRO)
    output = main([str(path), str(tmp_path / "encoder.safetensors")])
    assert backbone_config_of(output) == MICRO
    assert not any(key.startswith("decoder") for key in load_file(str(output)))
    encoder = VisionTransformer(**MICRO.timm_kwargs_full())
    encoder.load_state_dict(load_file(str(output)), strict=True)
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(encoder.state_dict()[key], value), key
    images = torch.randn(2, 3, 16, 16)
    model.backbone.eval()
    assert torch.equal(encoder.eval().forward_features(images), model.backbone.forward_full(images))


def test_export_loads_through_timm_create_model_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("timm tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    config = BackboneConfig(size="tiny", img_size=224, patch_size=16, in_chans=3)
    path, model = lightning_checkpoint(tmp_path, config)
    output = export_encoder(path, tmp_path / "tiny.safetensors")
    created = timm.create_model(timm_model_name(config), pretrained=True,
                                pretrained_cfg_overlay=dict(file=str(output)), num_classes=0)
    assert set(created.state_dict()) == set(model.backbone.state_dict())
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(created.state_dict()[key], value), key
    images = torch.randn(2, 3, 224, 224)
    model.backbone.eval()
    assert torch.equal(created.eval().forward_features(images), model.backbone.forward_full(images))


def test_missing_keys_raise_unless_allowed() -> None:
    state = {key: value for key, value in MIMViT(MICRO).state_dict().items() if not key.startswith("norm.")}
    with pytest.raises(ValueError, match=r"missing keys \['norm.weight', 'norm.bias'\]"):
        load_into(timm_encoder(), state)
    report = load_into(timm_encoder(), state, allow_missing=("norm.*",))
    assert report.missing == ["norm.weight", "norm.bias"]
