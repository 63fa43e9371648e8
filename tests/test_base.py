import math

import pytest
import torch
import torch.nn as nn

from lightning_mim.methods import MAE
from lightning_mim.methods.base import OptimConfig, cosine_momentum, ema_update_, make_teacher
from lightning_mim.schedules import warmup_cosine


def test_lr_schedule_values_from_lut_spec():
    # E = 1600 epochs, 40 warm-up, peak 2.4e-3; one step per epoch makes t = step
    def lr(t):
        return warmup_cosine(t, 1600, 40, 2.4e-3)

    assert lr(0) == 0
    assert lr(20) == pytest.approx(1.2e-3)
    assert lr(40) == pytest.approx(2.4e-3)
    assert lr(820) == pytest.approx(1.2e-3)
    assert lr(1600) == pytest.approx(0.0, abs=1e-12)


def test_momentum_schedule():
    assert cosine_momentum(0, 1000) == pytest.approx(0.996)
    assert cosine_momentum(500, 1000) == pytest.approx(0.998)
    assert cosine_momentum(999, 1000) > 0.99999


@pytest.mark.parametrize(
    "config, batch, expected",
    [
        (OptimConfig(base_lr=1.5e-4), 4096, 2.4e-3),  # MAE: linear / 256
        (OptimConfig(base_lr=1.5e-4, lr_scaling="sqrt", lr_reference_batch=16), 4096, 2.4e-3),  # LUT sqrt(eff)/4
        (OptimConfig(base_lr=1.5e-4, lr_scaling="sqrt", lr_reference_batch=16), 1024, 1.2e-3),
        (OptimConfig(base_lr=1.5e-4), 1024, 6e-4),
        (OptimConfig(lr=1e-3), 4096, 1e-3),
    ],
)
def test_lr_scaling_rules(config, batch, expected):
    assert config.peak_lr(batch) == pytest.approx(expected)


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)


def test_ema_covers_buffers_and_matches_hand_rolled_update():
    torch.manual_seed(0)
    student = TinyNet()
    teacher = make_teacher(student)
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    expected = {k: v.clone().double() for k, v in teacher.state_dict().items()}
    for step, m in enumerate([0.9, 0.5, 0.99]):
        with torch.no_grad():
            student.linear.weight.add_(torch.randn(4, 3))
        student.train()
        student.bn(torch.randn(8, 4))  # updates running stats and num_batches_tracked
        ema_update_(teacher, student, m)
        for k, v in student.state_dict().items():
            expected[k] = m * expected[k] + (1 - m) * v.double()
            if not v.is_floating_point():
                expected[k] = expected[k].trunc()
    for k, v in teacher.state_dict().items():
        assert torch.allclose(v.double(), expected[k], atol=1e-6), k
    assert teacher.bn.num_batches_tracked.dtype == torch.long


def test_weight_decay_groups_follow_mae_rule():
    model = MAE(backbone=dict(size="micro", img_size=32, patch_size=4), decoder_dim=64, decoder_depth=1,
                decoder_heads=4)
    no_decay, decay = model.parameter_groups()
    names = {id(p): n for n, p in model.named_parameters()}
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "backbone.cls_token" in decay_names and "decoder.mask_token" in decay_names
    assert "backbone.pos_embed" not in decay_names | no_decay_names  # frozen sin-cos
    assert all(n.endswith(".bias") or ".norm" in n or "norm1" in n or "norm2" in n for n in no_decay_names)
    assert all(p.ndim >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0 and decay["weight_decay"] == 0.05


def test_hparams_are_plain_for_weights_only_checkpoints():
    model = MAE(backbone=dict(size="micro", img_size=32, patch_size=4), optim=OptimConfig(base_lr=1e-3),
                decoder_dim=64, decoder_depth=1, decoder_heads=4)
    assert isinstance(model.hparams["optim"], dict) and model.hparams["optim"]["base_lr"] == 1e-3
    assert math.isclose(model.optim_config.base_lr, 1e-3)
