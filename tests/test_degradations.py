"""Beyond Masking's degradations and alignments (shared/methods/beyond_masking.md sections 2 and 6), against
hand-computed values and numpy's symmetric padding."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_mim import degradations as deg


def test_area_resize_is_adaptive_average_pooling_both_ways():
    ramp = torch.arange(4.0).expand(1, 1, 4, 4)
    # output column i averages input columns floor(4i/6) .. ceil(4(i+1)/6) - 1
    up = deg.area_resize(ramp, 6)
    assert up[0, 0, 0].tolist() == [0.0, 0.5, 1.0, 2.0, 2.5, 3.0]
    images = torch.randn(2, 3, 288, 288)
    torch.testing.assert_close(deg.area_resize(images, 224), F.adaptive_avg_pool2d(images, 224))
    small = torch.randn(2, 3, 160, 160)
    torch.testing.assert_close(deg.area_resize(small, 224), F.adaptive_avg_pool2d(small, 224))


def test_centre_crop_is_the_fixed_central_224_of_288():
    images = torch.randn(2, 3, 288, 288)
    assert torch.equal(deg.centre_crop(images, 32), images[:, :, 32:256, 32:256])


def test_border_bands_mse_is_a_sum_of_four_band_means():
    target = torch.randn(2, 3, 288, 288)
    assert deg.border_bands_mse(target + 1.0, target, 32).item() == pytest.approx(4.0)
    assert deg.border_bands_mse(target, target, 32).item() == 0.0
    inside = target.clone()
    inside[:, :, 32:256, 32:256] += 5.0  # the centre is not part of the edge loss
    assert deg.border_bands_mse(inside, target, 32).item() == 0.0
    top = target.clone()
    top[:, :, :32] += 2.0  # top band mean 4 + left / right bands 0 + bottom 0
    assert deg.border_bands_mse(top, target, 32).item() == pytest.approx(4.0)


@pytest.mark.parametrize("left, top", [(0, 0), (63, 0), (17, 42), (0, 63), (63, 63)])
def test_zoom_out_canvas_is_numpy_symmetric_padding(left, top):
    crop = torch.randn(2, 3, 160, 160)
    canvas = deg.symmetric_pad(crop, 224, torch.tensor([left, top]))
    expected = np.pad(crop.numpy(), ((0, 0), (0, 0), (top, 64 - top), (left, 64 - left)), mode="symmetric")
    assert canvas.shape == (2, 3, 224, 224)
    assert np.array_equal(canvas.numpy(), expected)
    assert torch.equal(canvas[:, :, top:top + 160, left:left + 160], crop)


def test_zoom_out_offset_is_one_pair_in_0_to_63():
    generator = torch.Generator().manual_seed(0)
    offsets = torch.stack([deg.draw_zoom_out_offset(64, generator=generator) for _ in range(2000)])
    assert offsets.shape == (2000, 2)
    assert offsets.min() == 0 and offsets.max() == 63


def test_symmetric_pad_refuses_a_border_wider_than_the_image():
    with pytest.raises(ValueError, match="at most"):
        deg.symmetric_pad(torch.zeros(1, 3, 100, 100), 224, torch.tensor([0, 0]))


def test_fisheye_identity_at_zero_magnitude():
    images = torch.randn(2, 3, 32, 32)
    centres = torch.tensor([[0.3, -0.7], [-1.0, 1.0]])
    warped = deg.fisheye(images, centres, torch.zeros(2))
    torch.testing.assert_close(warped, images, atol=1e-3, rtol=0)


def test_fisheye_corner_sample_at_centre_0_magnitude_0_2():
    grid = deg.fisheye_grid(224, torch.zeros(1, 2), torch.tensor([0.2]))
    # g' = -1 + 0.2 * sqrt(2) * 1 at the top-left corner
    torch.testing.assert_close(grid[0, 0, 0], torch.tensor([-0.71716, -0.71716]), atol=1e-5, rtol=0)
    assert -1.0 + 0.2 * math.sqrt(2) == pytest.approx(-0.71716, abs=1e-5)


def test_fisheye_grid_stays_inside_and_fixes_its_centre():
    generator = torch.Generator().manual_seed(0)
    centres, _ = deg.draw_fisheye(500, generator=generator)
    corners = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]])
    grid = deg.fisheye_grid(33, torch.cat([centres, corners]), torch.full((504,), 0.25))
    assert grid.abs().max() <= 1.0 + 1e-6
    # c = (0.5, -0.5) is the base-grid point (column 24, row 8) of 33 points: it maps to itself
    centre = torch.tensor([[0.5, -0.5]])
    grid = deg.fisheye_grid(33, centre, torch.tensor([0.2]))
    torch.testing.assert_close(grid[0, 8, 24], centre[0])
    images = torch.randn(1, 3, 33, 33)
    torch.testing.assert_close(deg.fisheye(images, centre, torch.tensor([0.2]))[0, :, 8, 24], images[0, :, 8, 24])


def test_fisheye_draws_lie_in_their_ranges():
    centres, magnitudes = deg.draw_fisheye(1000, generator=torch.Generator().manual_seed(1))
    assert centres.min() >= -1.0 and centres.max() <= 1.0
    assert magnitudes.min() >= 0.15 and magnitudes.max() <= 0.25


@pytest.mark.parametrize("groups", [1, 3])
def test_blur_of_a_constant_image_with_mean_taps(groups):
    colour = torch.tensor([0.3, -0.5, 1.1])
    images = colour.view(1, 3, 1, 1).expand(2, 3, 24, 24).contiguous()
    kernels = torch.full((2, 3, 3 // groups, 7, 7), 1.0 / 49)
    out = deg.blur(images, kernels, torch.zeros(3), groups=groups)
    assert out.shape == (2, 3, 24, 24)
    expected = colour.sum().expand(3) if groups == 1 else colour
    torch.testing.assert_close(out[:, :, 3:-3, 3:-3], expected.view(1, 3, 1, 1).expand(2, 3, 18, 18))
    assert not out.requires_grad


def test_blur_uses_each_samples_kernels_and_the_bias():
    images = torch.randn(2, 3, 16, 16)
    kernels = deg.draw_blur_kernels(2, 3, generator=torch.Generator().manual_seed(0))
    bias = torch.tensor([0.05, -0.02, 0.01])
    out = deg.blur(images, kernels, bias)
    for index in range(2):
        expected = F.conv2d(images[index:index + 1], kernels[index], bias, padding=3)
        torch.testing.assert_close(out[index:index + 1], expected)


def test_blur_published_layer_gives_7_by_230_by_230():
    images = torch.randn(1, 3, 224, 224)
    out = deg.blur(images, torch.randn(1, 7, 3, 1, 1), torch.zeros(7), padding=3)
    assert out.shape == (1, 7, 230, 230)  # Conv2d(3, 7, 1, padding=3): crashes the 224 patch embedding


def test_blur_draws_and_bias_bounds():
    kernels = deg.draw_blur_kernels(200, 3, generator=torch.Generator().manual_seed(0))
    assert kernels.shape == (200, 3, 3, 7, 7)
    assert kernels.mean().item() == pytest.approx(1 / 49, abs=5e-4)
    assert kernels.std().item() == pytest.approx(0.02, rel=0.02)
    assert deg.blur_bias_bound(3, 7, 1) == pytest.approx(0.0825, abs=1e-4)
    assert deg.blur_bias_bound(3, 7, 3) == pytest.approx(0.1429, abs=1e-4)
    assert deg.blur_bias_bound(3, 1, 1) == pytest.approx(0.577, abs=1e-3)


def test_decolorize_is_the_weighted_channel_sum():
    images = torch.randn(2, 3, 8, 8)
    weights = torch.tensor([0.1, 0.6, 0.3])
    grey = deg.decolorize(images, weights)
    assert grey.shape == (2, 1, 8, 8)
    torch.testing.assert_close(grey[:, 0], 0.1 * images[:, 0] + 0.6 * images[:, 1] + 0.3 * images[:, 2])
    draws = torch.stack([deg.draw_grey_weights(generator=torch.Generator().manual_seed(i)) for i in range(500)])
    assert draws.shape == (500, 3) and draws.min() >= 0.0 and draws.max() <= 0.667
    with pytest.raises(ValueError, match="grey weights"):
        deg.decolorize(torch.zeros(1, 1, 8, 8), weights)
