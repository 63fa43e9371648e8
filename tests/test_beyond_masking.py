"""Beyond Masking (shared/methods/beyond_masking.md section 6): the target, the loss forms and alignments of every
objective, the shared-backbone options it needs, parameter counts, schedules, and that every objective trains."""
import math

import lightning as L
import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer

from lightning_mim import degradations as deg
from lightning_mim.augment import normalize, to_unit_float
from lightning_mim.backbone import build_backbone, patchify, sincos_1d_interleaved, unpatchify
from lightning_mim.data import IMAGENET_MEAN, IMAGENET_STD, MIMDataModule
from lightning_mim.eval.weights import export_encoder
from lightning_mim.losses import masked_mse, normalize_patches_per_channel
from lightning_mim.masking import random_masking
from lightning_mim.methods import BeyondMasking
from lightning_mim.schedules import warmup_cosine
from lightning_mim.methods.beyond_masking import OBJECTIVES
from test_host_sync import HostReadsPerStep, fit_raising_on_cuda_sync

PAPER_BACKBONE = dict(class_token=False, pos_embed="sincos_1d", qkv_bias="qv", init="clipped_normal")
MICRO_DECODER = dict(decoder_dim=32, decoder_depth=1, decoder_heads=2)


def micro(objective: str, img_size: int = 16, patch_size: int = 4, **kwargs) -> BeyondMasking:
    backbone = dict(size="micro", img_size=img_size, patch_size=patch_size, **PAPER_BACKBONE,
                    in_chans=1 if objective == "decolorize" else 3)
    return BeyondMasking(backbone=backbone, objective=objective, **{**MICRO_DECODER, **kwargs})


def smooth_images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(batch, 3, 3, 3, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=True)


# ------------------------------------------------------------------------------------------------ target and losses
def test_per_channel_patch_normalisation():
    patch = torch.zeros(1, 3, 16, 16)
    patch[0, 0] = (torch.arange(256) % 2).float().view(16, 16)  # red alternates 0, 1; green and blue 0
    target = normalize_patches_per_channel(patchify(patch, 16), 3)[0, 0].view(256, 3)
    expected = 0.5 / (math.sqrt(64 / 255) + 1e-6)
    assert expected == pytest.approx(0.998043, abs=1e-6)
    torch.testing.assert_close(target[:, 0], (torch.arange(256) % 2 * 2 - 1).float() * expected)
    assert target[:, 1:].abs().max() == 0.0
    assert normalize_patches_per_channel(torch.full((1, 1, 768), 0.3), 3).abs().max() == 0.0


def imagenet_normalised(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 images as the data path gives them to the step: [0, 1] floats, then ImageNet's normalisation."""
    return normalize(to_unit_float(pixels), torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD))


@pytest.mark.parametrize("value", [0, 255, 37])
def test_constant_patches_have_a_target_of_exactly_zero(value):
    model = micro("masking")
    images = imagenet_normalised(torch.full((2, 3, 16, 16), value, dtype=torch.uint8))
    assert torch.equal(model.normalized_target(images), torch.zeros(2, 16, 48))


def test_target_is_normalised_on_unit_range_pixels():
    model = micro("masking", img_size=16, patch_size=16)
    pixels = torch.zeros(1, 3, 16, 16, dtype=torch.uint8)
    pixels[0, 0] = (torch.arange(256) % 2 * 255).to(torch.uint8).view(16, 16)  # red alternates 0, 255
    pixels[0, 1, :8] = 255  # green: half 1, half 0; blue constant 0
    target = model.normalized_target(imagenet_normalised(pixels))[0, 0].view(256, 3)
    # on [0, 1] pixels the deviations are +-0.5 and the unbiased std sqrt(64 / 255): eps 1e-6 on [0, 1] pixels
    expected = 0.5 / (math.sqrt(64 / 255) + 1e-6)
    alternating = (torch.arange(256) % 2 * 2 - 1).float()
    torch.testing.assert_close(target[:, 0], alternating * expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(target[:, 1], (1.0 - 2.0 * (torch.arange(256) >= 128).float()) * expected,
                               rtol=0, atol=1e-5)
    assert torch.equal(target[:, 2], torch.zeros(256))
    # the same images normalised with other statistics give the same target once the model has those statistics
    unit = to_unit_float(pixels)
    model.set_pixel_stats((0.5, 0.4, 0.3), (0.1, 0.2, 0.3))
    other = (unit - torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1)) / torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1)
    torch.testing.assert_close(model.normalized_target(other)[0, 0].view(256, 3), target, rtol=0, atol=1e-5)


def test_pixel_stats_come_from_the_datamodule():
    model = BeyondMasking(backbone=dict(size="micro", img_size=16, patch_size=4, in_chans=1, **PAPER_BACKBONE),
                          objective="masking", **MICRO_DECODER)
    grey_imagenet = (sum(IMAGENET_MEAN) / 3, sum(IMAGENET_STD) / 3)  # before a DataModule is attached
    assert (model.pixel_mean.item(), model.pixel_std.item()) == pytest.approx(grey_imagenet)
    trainer = L.Trainer(accelerator="cpu", logger=False)
    trainer.datamodule = MIMDataModule(source="fashion_mnist", mean=(0.25,), std=(0.5,))
    model.trainer = trainer
    model.setup("fit")
    assert (model.pixel_mean.item(), model.pixel_std.item()) == (0.25, 0.5)
    with pytest.raises(ValueError, match="one value per channel"):
        model.set_pixel_stats((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_patchify_order_and_round_trip():
    images = torch.randn(2, 3, 224, 224)
    patches = patchify(images, 16)
    h, w, i, j, c = 3, 5, 7, 11, 2
    assert patches[1, h * 14 + w, (i * 16 + j) * 3 + c] == images[1, c, 16 * h + i, 16 * w + j]
    assert torch.equal(unpatchify(patches, 16, (14, 14), 3), images)


def test_masking_counts_at_0_75():
    draw = random_masking(4, 196, 0.75)
    assert draw.keep_idx.shape == (4, 49)
    assert draw.mask.sum(dim=1).tolist() == [147.0] * 4
    assert torch.equal(torch.gather(draw.shuffle_idx, 1, draw.restore_idx), torch.arange(196).expand(4, -1))
    tokens = torch.randn(4, 196, 8)
    kept = torch.gather(tokens, 1, draw.keep_idx.unsqueeze(-1).expand(-1, -1, 8))
    assert torch.equal(kept[2, 5], tokens[2, draw.keep_idx[2, 5]])


@pytest.mark.parametrize("objective, masked", [("masking", 6), ("zoom_in_masking", 7)])
def test_masked_count_at_a_3x3_grid(objective, masked):
    """(m): MAE-pytorch's generator masks int(0.75 x 9) = 6; (a)+(m): the zoomed-in folder keeps int(9 x 0.25) = 2."""
    model = micro(objective, img_size=12)
    views = model.validation_views(torch.randn(2, 3, 12, 12))
    noise = torch.rand(2, 9)
    pred, mask = model(model.degrade(views, {}), noise)
    assert mask.sum(1).tolist() == [float(masked)] * 2
    assert torch.equal(mask, (torch.argsort(torch.argsort(noise, 1), 1) >= 9 - masked).float())
    if objective == "masking":  # the step's loss is over those 6 patches
        expected = masked_mse(pred, model.normalized_target(views), mask)
        torch.testing.assert_close(model.compute_losses(views, noise)["mim"], expected)


def test_masked_token_mean_and_full_mean():
    pred = torch.sqrt(torch.tensor([1.0, 2.0, 3.0, 4.0])).view(1, 4, 1).expand(1, 4, 6)
    assert masked_mse(pred, torch.zeros(1, 4, 6), torch.tensor([[0.0, 1.0, 1.0, 0.0]])).item() == pytest.approx(2.5)
    a, b = torch.randn(2, 196, 48), torch.randn(2, 196, 48)
    torch.testing.assert_close(masked_mse(a, b, torch.ones(2, 196)), torch.nn.MSELoss()(a, b))


# ------------------------------------------------------------------------------------------------ zoom-in, (a)
def spec_geometry(objective: str, **kwargs) -> BeyondMasking:
    """ViT-B's geometry (224 px, patch 16, 196 tokens) on a micro-wide encoder."""
    return micro(objective, img_size=224, patch_size=16, **kwargs)


def test_zoom_in_sizes_and_input_crop():
    model = spec_geometry("zoom_in_masking")
    assert (model.zoom_in_margin, model.view_size(), model.mask_ratio) == (32, 288, 0.75)
    view = torch.randn(1, 3, 288, 288)
    assert torch.equal(model.degrade(view, {}), view[:, :, 32:256, 32:256])


@pytest.mark.parametrize("row, decoder_rows", [(0, {1, 2}), (1, {2, 3}), (6, {6}), (7, {7}), (13, {11, 12})])
def test_zoom_in_input_row_reads_these_decoder_rows(row, decoder_rows):
    found = set()
    for decoder_row in range(14):
        image = torch.zeros(1, 1, 224, 224)
        image[..., 16 * decoder_row:16 * decoder_row + 16, :] = 1.0
        centre = deg.centre_crop(deg.area_resize(image, 288), 32)  # the centre loss grid = the input grid
        if centre[..., 16 * row:16 * row + 16, :].sum() > 0:
            found.add(decoder_row)
    assert found == decoder_rows


def test_zoom_in_losses():
    torch.manual_seed(0)
    model = spec_geometry("zoom_in_masking")
    view = torch.randn(2, 3, 288, 288)
    decoder_target = model.normalized_target(deg.area_resize(view, 224))  # N(A_224(I)) on the decoder grid
    mask = random_masking(2, 196, 0.75).mask
    exact = model.aligned_losses(decoder_target, mask, view, {})
    assert exact["edge"].item() == pytest.approx(0.0, abs=1e-10)
    assert exact["centre"].item() > 0.1  # trap 5: the centre target is normalised on the input grid
    shifted = model.aligned_losses(decoder_target + 1.0, mask, view, {})
    assert shifted["edge"].item() == pytest.approx(4.0, rel=1e-6)
    assert model.weighted_total(shifted).item() == pytest.approx(
        0.8 * shifted["centre"].item() + 0.2 * shifted["edge"].item())
    by_one_patch = torch.roll(decoder_target.view(2, 14, 14, -1), 1, dims=2).view(2, 196, -1)
    assert model.aligned_losses(by_one_patch, mask, view, {})["edge"].item() > 0.1


def test_zoom_in_without_masking_weights_every_token():
    model = spec_geometry("zoom_in")
    view = torch.randn(2, 3, 288, 288)
    pred = torch.randn(2, 196, 768)
    losses = model.aligned_losses(pred, torch.zeros(2, 196), view, {})
    field = deg.area_resize(unpatchify(pred, 16, (14, 14), 3), 288)
    expected = torch.nn.MSELoss()(patchify(field[:, :, 32:256, 32:256], 16),
                                  model.normalized_target(view[:, :, 32:256, 32:256]))
    torch.testing.assert_close(losses["centre"], expected)


# ------------------------------------------------------------------------------------------------ zoom-out, (b)
def test_zoom_out_placement_and_loss():
    model = spec_geometry("zoom_out")
    assert (model.zoom_out_size, model.view_size(), model.mask_ratio) == (160, 160, 0.0)
    crop = torch.randn(2, 3, 160, 160)
    params = {"offset": torch.tensor([21, 50])}
    canvas = model.degrade(crop, params)
    assert torch.equal(canvas[:, :, 50:210, 21:181], crop)
    target = model.normalized_target(deg.area_resize(crop, 224))  # T = N(A_224(x160)), the decoder grid
    assert model.aligned_losses(target, torch.zeros(2, 196), crop, params)["mim"].item() == pytest.approx(0, abs=1e-10)
    shifted = model.aligned_losses(target + 0.5, torch.zeros(2, 196), crop, params)["mim"]
    assert shifted.item() == pytest.approx(0.25, rel=1e-5)
    by_one_patch = torch.roll(target.view(2, 14, 14, -1), 1, dims=1).view(2, 196, -1)
    assert model.aligned_losses(by_one_patch, torch.zeros(2, 196), crop, params)["mim"].item() > 0.1


# ------------------------------------------------------------------------------------------------ identity objectives
@pytest.mark.parametrize("objective", ["masking", "distortion", "blur", "decolorize"])
def test_identity_alignment(objective):
    model = micro(objective)
    images = torch.randn(2, 3, 16, 16)
    target = model.normalized_target(images)  # the undegraded colour image
    mask = model(model.degrade(images, model.draw_degradation(2, images.device)))[1]
    assert mask.sum().item() == (2 * 12 if objective == "masking" else 0)
    assert model.aligned_losses(target, mask, images, {})["mim"].item() == pytest.approx(0.0, abs=1e-10)
    by_one_patch = torch.roll(target.view(2, 4, 4, -1), 1, dims=2).view(2, 16, -1)
    assert model.aligned_losses(by_one_patch, mask, images, {})["mim"].item() > 0.1


def test_degradations_receive_the_given_parameters():
    images = torch.randn(2, 3, 16, 16)
    centres, magnitudes = torch.tensor([[0.2, -0.4], [0.9, 0.9]]), torch.tensor([0.15, 0.25])
    warped = micro("distortion").degrade(images, {"centres": centres, "magnitudes": magnitudes})
    assert torch.equal(warped, deg.fisheye(images, centres, magnitudes))
    blur_model = micro("blur")
    kernels = deg.draw_blur_kernels(2, 3)
    assert blur_model.blur_bias.abs().max() <= deg.blur_bias_bound(3, 7)
    assert torch.equal(blur_model.degrade(images, {"kernels": kernels}),
                       deg.blur(images, kernels, blur_model.blur_bias))
    weights = torch.tensor([0.1, 0.5, 0.6])
    grey = micro("decolorize").degrade(images, {"grey_weights": weights})
    assert torch.equal(grey, deg.decolorize(images, weights))


def test_decolorize_needs_a_grey_encoder_and_colour_data():
    with pytest.raises(ValueError, match="backbone.in_chans to 1"):
        BeyondMasking(backbone=dict(size="micro", img_size=16, patch_size=4), objective="decolorize")
    model = micro("decolorize")
    assert model.in_chans == 3 and model.backbone.patch_embed.proj.in_channels == 1
    trainer = L.Trainer(accelerator="cpu", logger=False)
    trainer.datamodule = MIMDataModule(source="fashion_mnist")
    model.trainer = trainer
    with pytest.raises(ValueError, match="needs colour data"):
        model.setup("fit")
    # the k-NN monitor's features: the grey mix at the weights' mean, 0.3335 x (0.3 + 0.6 + 0.9) = 0.6003
    colour = torch.tensor([0.3, 0.6, 0.9]).view(1, 3, 1, 1).expand(2, 3, 16, 16)
    features = model.extract_features(colour)
    for grey, same in ((0.6003, True), (0.61, False)):
        expected = model.backbone.pooled_features(torch.full((2, 1, 16, 16), grey), model.feature_pool)
        assert torch.allclose(features, expected, atol=1e-4) == same


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="unknown objective"):
        micro("inpainting")
    with pytest.raises(ValueError, match="zoom_out_size"):
        micro("zoom_out", zoom_out_size=6)
    with pytest.raises(ValueError, match="mask ratio"):
        micro("masking", mask_ratio=0.0)


# ------------------------------------------------------------------------------------------------ backbone options
def test_sincos_1d_interleaved_table():
    table = sincos_1d_interleaved(196, 768)
    n, j = 37, 301
    angle = n / 10000 ** (2 * (j // 2) / 768)
    assert table[n, j].item() == pytest.approx(math.cos(angle), abs=1e-6)
    assert table[n, j - 1].item() == pytest.approx(math.sin(angle), abs=1e-6)
    encoder = build_backbone(size="micro", img_size=16, patch_size=4, **PAPER_BACKBONE)
    assert torch.equal(encoder.pos_embed[0], sincos_1d_interleaved(16, 128))
    assert not encoder.pos_embed.requires_grad and encoder.num_prefix_tokens == 0


def test_key_bias_stays_zero_and_weights_load_into_timm():
    encoder = build_backbone(size="micro", img_size=16, patch_size=4, **PAPER_BACKBONE)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        encoder.forward_full(torch.randn(2, 3, 16, 16)).pow(2).mean().backward()
        optimizer.step()
    for block in encoder.blocks:
        bias = block.attn.qkv.bias
        assert bias[128:256].abs().max() == 0.0 and bias[:128].abs().max() > 0.0
    with torch.device("meta"):
        timm_vit = timm.create_model("vit_base_patch16_224", num_classes=0, global_pool="", class_token=False)
        ours = build_backbone(size="base", **PAPER_BACKBONE)
    assert timm_vit.load_state_dict(ours.state_dict(), strict=True, assign=True) is not None


def test_clipped_normal_init():
    torch.manual_seed(0)
    model = micro("masking")
    weight = model.backbone.blocks[0].mlp.fc1.weight
    assert weight.abs().max() <= 0.02 and weight.std().item() == pytest.approx(0.0108, abs=5e-4)
    assert model.decoder.mask_token.abs().max() <= 0.02 and model.decoder.embed.bias is None


def test_vit_b_parameter_counts_and_shapes():
    with torch.device("meta"):
        model = BeyondMasking(backbone=dict(size="base", **PAPER_BACKBONE))
        grey = BeyondMasking(backbone=dict(size="base", **PAPER_BACKBONE, in_chans=1), objective="decolorize")

    def count(module: torch.nn.Module) -> int:  # trainable, without the k thirds of qkv.bias (fixed at 0)
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        return trainable - sum(m.qkv.bias.numel() // 3 for m in module.modules() if hasattr(m, "qkv"))

    assert count(model) == 93_325_440
    assert count(model.backbone) == 85_637_376
    assert count(model.decoder) == 7_392_768 + 294_912 + 384
    assert count(grey.backbone) == 85_244_160
    view = torch.empty(2, 3, 288, 288, device="meta")
    inputs = model.degrade(view, {})
    keep = random_masking(2, 196, 0.75, device="meta").keep_idx
    assert model.backbone.forward_kept(inputs, keep).shape == (2, 49, 768)
    assert model(inputs)[0].shape == (2, 196, 768)


def test_weight_decay_groups():
    model = micro("zoom_in_masking")
    groups = model.parameter_groups()
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert "decoder.mask_token" in no_decay and "backbone.pos_embed" not in decay | no_decay
    assert all(n.endswith(".bias") or "norm" in n or n == "decoder.mask_token" for n in no_decay)
    assert decay == {n for n, p in model.named_parameters() if p.ndim >= 2 and n != "decoder.mask_token"
                     and p.requires_grad}


def test_schedules():
    steps_per_epoch, epochs, warmup = 10, 30, 2
    total = epochs * steps_per_epoch
    values = [warmup_cosine(step, total, warmup * steps_per_epoch, 1.2e-3, 1e-5) for step in range(total)]
    assert values[0] == 0.0 and values[warmup * steps_per_epoch] == pytest.approx(1.2e-3)
    assert values[-1] == pytest.approx(1e-5, rel=1e-2)  # "about 1e-5" one step before the end
    assert micro("masking").optim_config.peak_lr(2048) == pytest.approx(1.2e-3)
    # the fine-tuning layer-decay scales of section 6 are checked in test_eval_finetune.py


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_every_objective_trains(objective):
    torch.manual_seed(0)
    model = micro(objective)
    views = model.validation_views(smooth_images(8, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        total = model.weighted_total(model.compute_losses(views))
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        losses.append(total.item())
    assert sum(losses[-3:]) < 0.95 * sum(losses[:3]), losses


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_each_objective_compiles_in_one_graph(objective):
    torch._dynamo.reset()
    model = micro(objective)
    views = model.validation_views(torch.randn(4, 3, 16, 16))
    torch.manual_seed(1)
    eager = model.compute_losses(views)
    compiled = torch.compile(model.compute_losses, backend="aot_eager", fullgraph=True)
    torch.manual_seed(1)
    traced = compiled(views)
    for key in eager:
        torch.testing.assert_close(traced[key], eager[key], rtol=1e-5, atol=1e-6)


# the objectives whose step draws degradation parameters (the default, zoom_in_masking, is in test_host_sync.py)
@pytest.mark.parametrize("objective", ["zoom_out", "distortion", "blur", "decolorize"])
def test_each_objective_reads_nothing_on_the_host_between_logging_steps(objective):
    model = micro(objective, optim=dict(lr=1e-3, warmup_steps=2))
    # a loader worker: torchvision's random crops read their draws on the host, as augmentation should
    data = MIMDataModule(source="synthetic", synthetic_size=32, synthetic_image_size=16, batch_size=8,
                         num_workers=1, persistent_workers=False, knn_bank_size=8, val_subset=8)
    recorder = HostReadsPerStep()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=False, limit_val_batches=0, max_steps=4,
                        log_every_n_steps=4, callbacks=[recorder])
    trainer.fit(model, datamodule=data)
    assert {step: calls for step, calls in recorder.per_step.items() if step != 4} == {1: [], 2: [], 3: []}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_each_objective_has_no_cuda_synchronisation_outside_logging_steps(objective):
    fit_raising_on_cuda_sync(micro(objective, optim=dict(lr=1e-3, warmup_steps=2)))


def test_degradation_grid_rows():
    model = micro("zoom_out")
    rows = model.reconstruct(torch.randn(3, 3, 16, 16))
    assert set(rows) == {"input", "degraded", "degraded_view", "target", "reconstruction"}
    assert {key for keys in model.image_grids.values() for key in keys} == set(rows)
    assert all(value.shape == (3, 3, 16, 16) for value in rows.values())
    assert list(model.image_grids) == ["val/reconstruction", "val/degradation"]
    grey = micro("decolorize").reconstruct(torch.randn(2, 3, 16, 16))
    assert grey["degraded"].shape == (2, 3, 16, 16)


def test_export_loads_strict_into_timm_and_computes_the_same(tmp_path):
    model = micro("zoom_in_masking")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        model.weighted_total(model.compute_losses(torch.randn(2, 3, 20, 20))).backward()
        optimizer.step()
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": model.state_dict(),
                "hyper_parameters": dict(model.hparams) | {"_class_path": "lightning_mim.methods.BeyondMasking"}}, path)
    output = export_encoder(path, tmp_path / "encoder.safetensors")
    encoder = VisionTransformer(**model.backbone_config.timm_kwargs_full())
    encoder.load_state_dict(load_file(str(output)), strict=True)
    images = torch.randn(2, 3, 16, 16)
    model.backbone.eval()
    assert torch.equal(encoder.eval().forward_features(images), model.backbone.forward_full(images))
