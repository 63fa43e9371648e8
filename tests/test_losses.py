import pytest
import torch

from lightning_mim.losses import masked_mse, normalize_patches


def test_norm_pix_ramp_hand_computed():
    # pred = 0 and each target patch is a ramp a, a+1, ..., a+767: the normalised ramp has sum of squares
    # (n-1) * var / (var + eps), so the per-patch MSE is (767/768) / (1 + 1e-6 / var), independent of a
    n = 768
    ramp = torch.arange(n, dtype=torch.float64)
    patches = torch.stack([ramp + a for a in (0.0, 10.0, -3.5)])[None].float()
    var = ramp.var().item()
    expected = (767 / 768) / (1 + 1e-6 / var)
    target = normalize_patches(patches)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert masked_mse(torch.zeros_like(target), target, mask).item() == pytest.approx(expected, rel=1e-6)


def test_unmasked_patches_do_not_change_the_loss():
    pred, target = torch.randn(2, 5, 12), torch.randn(2, 5, 12)
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 1, 1, 0]], dtype=torch.float32)
    base = masked_mse(pred, target, mask)
    changed = pred.clone()
    changed[mask == 0] += 100
    assert masked_mse(changed, target, mask) == base
    by_hand = ((pred - target) ** 2).mean(-1)[mask == 1].mean()
    assert torch.allclose(base, by_hand)


def test_losses_run_in_float32_under_bf16():
    pred = torch.randn(2, 4, 8, dtype=torch.bfloat16)
    target = normalize_patches(torch.randn(2, 4, 8, dtype=torch.bfloat16))
    assert target.dtype == torch.float32
    assert masked_mse(pred, target, torch.ones(2, 4)).dtype == torch.float32
