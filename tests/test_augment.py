"""Batched device augmentations (lightning_mim/augment.py) against torchvision's float kernels (to float rounding)
and against the per-image PIL pipeline they replace (to stated 8-bit tolerances), hand-computed values, the draws,
LUT's view 2 with known draws, and the data path that applies them (augment_on device vs loader)."""
import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageFilter, ImageOps
from torchvision.transforms import v2

from lightning_mim import augment as A
from lightning_mim.data import MIMDataModule
from lightning_mim.data.device_views import has_device_views
from lightning_mim.data.seeding import sample_seed, seeded_generators
from lightning_mim.methods import LUT, MAE, SimMIM
from lightning_mim.methods.lut import JITTER, LUTViews, WindowPaddedCrop, augment_view2, draw_colour
from micro_methods import micro_method

LEVEL = 1 / 255


def pil_images(count: int = 8, size: int = 24, seed: int = 0) -> list[Image.Image]:
    """Smooth colour images with noise on top (like the benchmark's JPEGs)."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        noisy = np.asarray(coarse, dtype=np.float32) + rng.normal(0, 20, (size, size, 3))
        images.append(Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)))
    return images


def to_batch(images: list[Image.Image]) -> torch.Tensor:
    return torch.stack([TF.pil_to_tensor(image) for image in images]).float() / 255


IMAGES = pil_images()
BATCH = to_batch(IMAGES)
FACTORS = torch.tensor([0.6, 0.7, 0.8, 0.9, 1.1, 1.2, 1.3, 1.4])
SHIFTS = torch.linspace(-0.1, 0.1, 8)
SIGMAS = torch.tensor([0.5, 0.6, 0.8, 1.0, 1.3, 1.5, 1.7, 2.0])


# --------------------------------------------------------------------------------------- hand-computed values
def test_hand_computed_values():
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    assert torch.allclose(A.grayscale(red), torch.full((1, 3, 2, 2), 0.2989))
    green = A.adjust_hue(red, torch.tensor([1 / 3]))
    assert torch.allclose(green, torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2), atol=1e-6)
    flat = torch.full((2, 3, 2, 2), 0.8)
    assert torch.allclose(A.adjust_brightness(flat, torch.tensor([0.5, 2.0])),
                          torch.stack([torch.full((3, 2, 2), 0.4), torch.ones(3, 2, 2)]))
    two_tone = torch.tensor([0.2, 0.6]).view(1, 1, 1, 2).expand(1, 3, 1, 2)
    mean_luma = 0.4 * sum(A.LUMA)  # the weights sum to 0.9999
    assert torch.allclose(A.adjust_contrast(two_tone, torch.tensor([0.0])), torch.full((1, 3, 1, 2), mean_luma))
    assert torch.allclose(A.adjust_contrast(two_tone, torch.tensor([2.0]))[0, 0, 0],
                          torch.tensor([0.4 - mean_luma, 1.2 - mean_luma]), rtol=0, atol=1e-6)
    levels = torch.tensor([127.0, 128.0, 200.0]).view(1, 1, 1, 3) / 255
    assert torch.allclose(A.solarize(levels, 128 / 255) * 255, torch.tensor([127.0, 127.0, 55.0]).view(1, 1, 1, 3))
    grey = torch.rand(2, 1, 4, 4)
    assert A.adjust_saturation(grey, FACTORS[:2]) is grey and A.adjust_hue(grey, SHIFTS[:2]) is grey
    impulse = torch.zeros(1, 1, 9, 9)
    impulse[0, 0, 4, 4] = 1.0
    blurred = A.gaussian_blur(impulse, torch.tensor([1.0]), radius=3)
    weights = torch.exp(-0.5 * torch.arange(-3.0, 4.0) ** 2)
    weights /= weights.sum()
    assert torch.allclose(blurred[0, 0, 1:8, 1:8], torch.outer(weights, weights), atol=1e-7)


# ------------------------------------------------------------------------------------ torchvision float kernels
@pytest.mark.parametrize("op, batched, reference", [
    ("brightness", lambda x: A.adjust_brightness(x, FACTORS), lambda x, b: TF.adjust_brightness(x, FACTORS[b].item())),
    ("contrast", lambda x: A.adjust_contrast(x, FACTORS), lambda x, b: TF.adjust_contrast(x, FACTORS[b].item())),
    ("saturation", lambda x: A.adjust_saturation(x, FACTORS), lambda x, b: TF.adjust_saturation(x, FACTORS[b].item())),
    ("hue", lambda x: A.adjust_hue(x, SHIFTS), lambda x, b: TF.adjust_hue(x, SHIFTS[b].item())),
    ("grayscale", lambda x: A.grayscale(x), lambda x, b: TF.rgb_to_grayscale(x, 3)),
    ("solarize", lambda x: A.solarize(x, 0.5), lambda x, b: TF.solarize(x, 0.5)),
])
def test_ops_equal_torchvision_float_kernels_per_sample(op, batched, reference):
    expected = torch.stack([reference(BATCH[b], b) for b in range(len(BATCH))])
    torch.testing.assert_close(batched(BATCH), expected, rtol=0, atol=2e-6)


def test_blur_equals_torchvision_gaussian_away_from_the_edges():
    # torchvision pads by reflection, the batched blur (like PIL) by replication: compare where neither reaches
    got = A.gaussian_blur(BATCH, SIGMAS, radius=6)
    expected = torch.stack([TF.gaussian_blur(BATCH[b], [13, 13], [SIGMAS[b].item()] * 2) for b in range(8)])
    torch.testing.assert_close(got[..., 6:-6, 6:-6], expected[..., 6:-6, 6:-6], rtol=0, atol=2e-6)


# ---------------------------------------------------------------------------------- the PIL reference pipeline
def pil_batch(function) -> torch.Tensor:
    return to_batch([function(image, b) for b, image in enumerate(IMAGES)])


@pytest.mark.parametrize("batched, pil, max_levels", [
    # PIL rounds to 8 bits after each op: within one level (plus float rounding)
    (lambda x: A.adjust_brightness(x, FACTORS), lambda i, b: TF.adjust_brightness(i, FACTORS[b].item()), 1.2),
    (lambda x: A.adjust_contrast(x, FACTORS), lambda i, b: TF.adjust_contrast(i, FACTORS[b].item()), 1.2),
    (lambda x: A.adjust_saturation(x, FACTORS), lambda i, b: TF.adjust_saturation(i, FACTORS[b].item()), 1.2),
    (lambda x: A.grayscale(x), lambda i, b: i.convert("L").convert("RGB"), 1.0),
    (lambda x: A.solarize(x, 128 / 255), lambda i, b: ImageOps.solarize(i, 128), 0.0),
], ids=["brightness", "contrast", "saturation", "grayscale", "solarize"])
def test_ops_match_pil_within_one_level(batched, pil, max_levels):
    difference = (batched(BATCH) - pil_batch(pil)).abs()
    assert difference.max() <= max_levels * LEVEL + 1e-6


def test_hue_matches_pil_within_its_8_bit_hsv_rounding():
    # PIL shifts the hue of an 8-bit HSV image: its hue has 256 steps, which moves low-saturation pixels most
    difference = (A.adjust_hue(BATCH, SHIFTS) - pil_batch(lambda i, b: TF.adjust_hue(i, SHIFTS[b].item()))).abs()
    assert difference.mean() <= 1.0 * LEVEL
    assert difference.flatten().quantile(0.99) <= 7 * LEVEL
    assert difference.max() <= 16 * LEVEL


def test_blur_matches_pil_gaussian_blur_radius_as_sigma():
    # PIL approximates the Gaussian of standard deviation `radius` by three box blurs
    difference = (A.gaussian_blur(BATCH, SIGMAS, radius=6)
                  - pil_batch(lambda i, b: i.filter(ImageFilter.GaussianBlur(SIGMAS[b].item())))).abs()
    assert difference.mean(dim=(1, 2, 3)).max() <= 1.0 * LEVEL
    assert difference[..., 4:-4, 4:-4].max() <= 5 * LEVEL


# ---------------------------------------------------------------------------------------------- colour jitter
def jitter_draw(order: list[list[int]]) -> A.JitterDraw:
    batch = len(order)
    return A.JitterDraw(FACTORS[:batch], FACTORS.flip(0)[:batch], FACTORS[:batch].roll(1), SHIFTS[:batch],
                        torch.tensor(order))


def test_jitter_applies_the_ops_in_each_samples_own_order():
    functions = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    orders = [[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]]
    draw = jitter_draw(orders)
    got = A.color_jitter(BATCH[:4], draw)
    for b, order in enumerate(orders):
        factors = [draw.brightness[b], draw.contrast[b], draw.saturation[b], draw.hue[b]]
        expected = BATCH[b]
        for index in order:
            expected = functions[index](expected, factors[index].item())
        torch.testing.assert_close(got[b], expected, rtol=0, atol=3e-6)
    reordered = A.color_jitter(BATCH[:4], jitter_draw(orders[1:] + orders[:1]))
    assert (reordered - got).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # the order matters for every sample


def test_jitter_without_hue_leaves_hue_shifts_out():
    draw = jitter_draw([[3, 0, 1, 2]] * 4)
    expected = A.adjust_saturation(A.adjust_contrast(A.adjust_brightness(BATCH[:4], draw.brightness),
                                                     draw.contrast), draw.saturation)
    assert torch.equal(A.color_jitter(BATCH[:4], draw, hue=False), expected)


def test_draws_ranges_order_and_generator():
    generator = torch.Generator().manual_seed(5)
    draw = A.draw_color_jitter(4000, 0.4, 0.3, 0.2, 0.1, generator=generator)
    for values, low, high in ((draw.brightness, 0.6, 1.4), (draw.contrast, 0.7, 1.3), (draw.saturation, 0.8, 1.2),
                              (draw.hue, -0.1, 0.1)):
        assert values.shape == (4000,) and low <= values.min() and values.max() <= high
        assert values.min() < low + 0.01 and values.max() > high - 0.01
    assert torch.equal(draw.order.sort(dim=1).values, torch.arange(4).expand(4000, 4))
    assert len({tuple(row) for row in draw.order.tolist()}) == 24
    again = A.draw_color_jitter(4000, 0.4, 0.3, 0.2, 0.1, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(draw, again))
    applied = A.draw_apply(4000, 0.8, generator=generator)
    assert applied.dtype == torch.bool and 0.77 < applied.float().mean() < 0.83
    choice = A.draw_choice(3000, 3, generator=generator)
    assert torch.equal(torch.bincount(choice, minlength=3) > 900, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="hue must lie in"):
        A.draw_color_jitter(2, hue=0.6)
    with pytest.raises(ValueError, match="probability"):
        A.draw_apply(2, 1.5)


def test_apply_where_and_one_of_select_per_sample():
    images, other, third = torch.zeros(3, 1, 2, 2), torch.ones(3, 1, 2, 2), torch.full((3, 1, 2, 2), 2.0)
    chosen = A.apply_where(torch.tensor([True, False, True]), other, images)
    assert chosen[:, 0, 0, 0].tolist() == [1.0, 0.0, 1.0]
    picked = A.one_of(torch.tensor([2, 0, 1]), images, other, third)
    assert picked[:, 0, 0, 0].tolist() == [2.0, 0.0, 1.0]


# ------------------------------------------------------------------------------------------- LUT's view 2
def lut_view2_with_pil(image: Image.Image, draws, b: int) -> Image.Image:
    """LUTViews' PIL ops for sample b with the given draws (the reference the batched view 2 replaces)."""
    functions = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    jitter = draws.jitter
    if draws.jitter_applied[b]:
        factors = [jitter.brightness[b], jitter.contrast[b], jitter.saturation[b], jitter.hue[b]]
        for index in jitter.order[b].tolist():
            image = functions[index](image, factors[index].item())
    choice = int(draws.choice[b])
    if choice == 0:
        return image.convert("L").convert("RGB")
    if choice == 1:
        return ImageOps.solarize(image, 128)
    return image.filter(ImageFilter.GaussianBlur(draws.blur_radius[b].item()))


def test_lut_view2_with_known_draws_matches_the_pil_pipeline():
    draws = draw_colour(8, True, generator=torch.Generator().manual_seed(3))
    draws = draws._replace(jitter_applied=torch.tensor([True, True, True, True, True, True, False, False]),
                           choice=torch.tensor([0, 1, 2, 0, 1, 2, 1, 2]),
                           blur_radius=torch.tensor([1.0, 1.0, 0.8, 1.0, 1.0, 1.6, 1.0, 1.2]))
    got = augment_view2(BATCH, draws)
    expected = to_batch([lut_view2_with_pil(image, draws, b) for b, image in enumerate(IMAGES)])
    difference = (got - expected).abs().mean(dim=(1, 2, 3))
    assert difference.max() <= 2 * LEVEL, difference * 255
    model = micro_method(LUT, img_size=24)
    view1, view2 = model.augment_views((BATCH, BATCH.clone()), draws)
    assert view1 is BATCH and torch.equal(view2, got)


def test_lut_grey_jitter_is_brightness_and_contrast_only():
    draws = draw_colour(6, False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws.jitter.saturation, torch.ones(6)) and torch.equal(draws.jitter.hue, torch.zeros(6))
    grey = BATCH[:6, :1]
    assert augment_view2(grey, draws).shape == grey.shape
    assert JITTER == (0.4, 0.4, 0.2, 0.1)


# ------------------------------------------------------------------------------ loader part against the reference
def seeded(transform, image: Image.Image, seed: int):
    with seeded_generators(sample_seed(0, 0, seed)):
        return transform(image)


@pytest.mark.parametrize("method", [MAE, SimMIM], ids=lambda cls: cls.__name__)
def test_device_path_equals_the_loader_path_exactly_for_crop_only_views(method):
    model = micro_method(method, img_size=16)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    for seed, image in enumerate(IMAGES[:4]):
        crop = seeded(model.loader_views(), image, seed)
        assert crop.dtype == torch.uint8 and crop.shape == (3, 16, 16)
        device = A.normalize(A.to_unit_float(crop[None]), torch.tensor(mean), torch.tensor(std))[0]
        assert torch.equal(device, seeded(model.train_transform(mean, std), image, seed))


def test_window_padded_crop_equals_padding_the_whole_image_first():
    image = torch.randint(0, 256, (3, 20, 27), dtype=torch.uint8)
    fast, reference = WindowPaddedCrop(18, padding=4, padding_mode="reflect"), v2.RandomCrop(
        18, padding=4, padding_mode="reflect")
    for seed in range(40):  # windows at every edge and corner, and inside
        torch.manual_seed(seed)
        got = fast(image)
        torch.manual_seed(seed)
        assert torch.equal(got, reference(image))


def test_lut_crops_are_the_reference_views_geometry():
    model = micro_method(LUT, img_size=16)
    image = pil_images(1, 40)[0]
    for seed in range(6):
        crop1, _ = seeded(model.loader_views(), image, seed)
        reference1, _ = seeded(LUTViews(16, (0.0,) * 3, (1.0,) * 3), image, seed)
        assert crop1.dtype == torch.uint8 and crop1.shape == (3, 16, 16)
        # the same crop and flip; the resize runs on the uint8 tensor instead of PIL (both antialiased bicubic)
        assert (A.to_unit_float(crop1) - reference1).abs().mean() <= 1.5 * LEVEL


# --------------------------------------------------------------------------------------------- the data path
class FakeTrainer:
    def __init__(self, module, training: bool) -> None:
        self.lightning_module, self.training = module, training
        self.global_rank, self.world_size, self.accumulate_grad_batches = 0, 1, 1


def test_datamodule_augments_training_batches_on_the_device_only():
    model = micro_method(LUT, img_size=16)
    data = MIMDataModule(source="synthetic", synthetic_size=16, synthetic_image_size=16, batch_size=4,
                         num_workers=0, knn_bank_size=4, val_subset=4)
    data.trainer = FakeTrainer(model, training=True)
    data.setup("fit")
    (view1, view2), labels = next(iter(data.train_dataloader()))
    assert view1.dtype == view2.dtype == torch.uint8 and view1.shape == (4, 3, 16, 16)
    torch.manual_seed(0)
    out1, out2 = data.on_after_batch_transfer(([view1, view2], labels), 0)[0]
    mean, std = torch.tensor(data.mean_for(3)), torch.tensor(data.std_for(3))
    assert torch.equal(out1, A.normalize(A.to_unit_float(view1), mean, std))
    torch.manual_seed(0)
    draws = draw_colour(4, True)
    assert torch.equal(out2, A.normalize(augment_view2(A.to_unit_float(view2), draws), mean, std))
    data.trainer.training = False  # validation batches pass unchanged
    batch = next(iter(data.val_dataloader()))
    assert data.on_after_batch_transfer(batch, 0) is batch


def test_device_views_follow_true_half_precision():
    from lightning.pytorch.plugins.precision import HalfPrecision

    model = micro_method(MAE, img_size=16)
    data = MIMDataModule(source="synthetic", synthetic_size=8, synthetic_image_size=16, batch_size=4,
                         num_workers=0, knn_bank_size=4, val_subset=4)
    data.trainer = FakeTrainer(model, training=True)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert data.on_after_batch_transfer(batch, 0)[0].dtype == torch.float32
    data.trainer.precision_plugin = HalfPrecision("bf16-true")
    assert data.on_after_batch_transfer(batch, 0)[0].dtype == torch.bfloat16


def test_a_method_that_overrides_only_train_transform_keeps_its_views_in_the_loader():
    class OwnViews(MAE):
        def train_transform(self, mean, std):
            return v2.Compose([v2.PILToTensor(), v2.CenterCrop(16), v2.ToDtype(torch.float32, scale=True)])

    class OwnCrop(SimMIM):  # loader_views of its own, train_transform composed from it by the base
        pass

    assert not has_device_views(OwnViews(backbone=dict(size="micro", img_size=16, patch_size=4), decoder_dim=32,
                                         decoder_depth=1, decoder_heads=2))
    assert has_device_views(micro_method(LUT)) and has_device_views(micro_method(MAE))
    assert has_device_views(OwnCrop(backbone=dict(size="micro", img_size=16, patch_size=4), mask_patch_size=8))
    own = OwnViews(backbone=dict(size="micro", img_size=16, patch_size=4), decoder_dim=32, decoder_depth=1,
                   decoder_heads=2)
    data = MIMDataModule(source="synthetic", synthetic_size=8, synthetic_image_size=16, batch_size=4,
                         num_workers=0, knn_bank_size=4, val_subset=4)
    data.trainer = FakeTrainer(own, training=True)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch[0].dtype == torch.float32 and data.on_after_batch_transfer(batch, 0) is batch


def test_augment_on_loader_binds_the_per_image_reference_and_bad_values_fail():
    model = micro_method(LUT, img_size=16)
    data = MIMDataModule(source="synthetic", synthetic_size=16, synthetic_image_size=16, batch_size=4,
                         num_workers=0, knn_bank_size=4, val_subset=4, augment_on="loader")
    data.trainer = FakeTrainer(model, training=True)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch[0][1].dtype == torch.float32 and data.on_after_batch_transfer(batch, 0) is batch
    with pytest.raises(ValueError, match="augment_on 'gpu'.*'device'.*'loader'"):
        MIMDataModule(source="synthetic", augment_on="gpu")
    assert isinstance(model.train_transform((0.5,) * 3, (0.5,) * 3), LUTViews)
    assert isinstance(micro_method(MAE).train_transform((0.5,) * 3, (0.5,) * 3).transforms[0], v2.Compose)
