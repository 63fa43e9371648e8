"""SimMIM: block-random masking, mask tokens before the position embedding, the linear pixel head, L1 on masked
pixels, its optimiser defaults and the multistep schedule; recipes print."""

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_mim.backbone.init import depth_rescale_factors

from lightning_mim.losses import masked_l1
from lightning_mim.masking import simmim_masking
from lightning_mim.methods import SimMIM
from lightning_mim.methods.base import OptimConfig
from lightning_mim.schedules import warmup_multistep


# the official ViT-B encoder's switches (configs/simmim/vit_b16_800ep_in1k.yaml) at micro size
PAPER_MICRO = dict(size="micro", img_size=32, patch_size=4, pos_embed="none", rel_pos_bias="shared", qkv_bias="qv",
                   init="simmim", timm_kwargs={"init_values": 0.1})


def micro_simmim(img_size: int = 32, **kwargs) -> SimMIM:
    return SimMIM(backbone=dict(size="micro", img_size=img_size, patch_size=4), mask_patch_size=8, **kwargs)


# ------------------------------------------------------------------------------------------------------- masking

def test_paper_grid_masks_30_of_49_blocks_of_2x2_patches():
    noise = torch.rand(3, 49, generator=torch.Generator().manual_seed(0))
    mask = simmim_masking(3, (14, 14), 2, 0.6, noise=noise)
    assert mask.shape == (3, 196)
    assert mask.sum(1).tolist() == [120.0] * 3  # ceil(49 x 0.6) = 30 cells of 4 patches: 61.2 %
    blocks = mask.view(3, 7, 2, 7, 2)
    assert torch.equal(blocks.amax((2, 4)), blocks.amin((2, 4)))  # every 2 x 2 block is all masked or all visible
    # the masked cells are the 30 with the smallest noise (a uniform random subset of the cells)
    expected = torch.zeros(3, 49).scatter_(1, noise.argsort(1)[:, :30], 1.0)
    assert torch.equal(blocks[:, :, 0, :, 0].reshape(3, 49), expected)


def test_masking_at_another_grid_and_bad_cells():
    mask = simmim_masking(2, (8, 4), 4, 0.5)  # 2 x 1 cells of 4 x 4 patches
    assert mask.sum(1).tolist() == [16.0, 16.0]
    with pytest.raises(ValueError, match="does not tile the 7 x 7 patch grid"):
        simmim_masking(1, (7, 7), 2, 0.6)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        SimMIM(backbone=dict(size="micro", img_size=32, patch_size=4), mask_patch_size=6)


# ------------------------------------------------------------------------------------------------------- encoder

def test_masked_pixels_do_not_reach_the_encoder_and_visible_ones_do():
    model = micro_simmim().eval()
    images = torch.randn(2, 3, 32, 32)
    mask = simmim_masking(2, (8, 8), 2, 0.6, generator=torch.Generator().manual_seed(1))
    pixel_mask = mask.view(2, 8, 8).repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1)
    with torch.no_grad():
        reference = model.encode_masked(images, mask)
        perturbed = model.encode_masked(images + 5.0 * pixel_mask * torch.randn_like(images), mask)
        visible = model.encode_masked(images + 5.0 * (1 - pixel_mask) * torch.randn_like(images), mask)
    assert torch.equal(reference, perturbed)
    assert not torch.allclose(reference, visible)


def test_mask_token_replaces_patches_before_the_position_embedding():
    model = micro_simmim()
    images = torch.randn(2, 3, 32, 32)
    mask = simmim_masking(2, (8, 8), 2, 0.6)
    embedded = model.backbone.embed_patches(images, mask, model.mask_token)
    position = model.backbone.pos_embed[:, 1:]
    expected = torch.where(mask.bool().unsqueeze(-1), model.mask_token.expand(2, 64, -1),
                           model.backbone.patch_embed(images)) + position
    torch.testing.assert_close(embedded, expected)
    assert model.mask_token.abs().max() <= 0.02  # trunc-normal(0.02) in [-0.02, 0.02], as the official init


def test_linear_head_predicts_every_patch_and_loss_is_masked_l1():
    model = micro_simmim()
    images = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    pred, mask = model(images, noise)
    assert pred.shape == (2, 64, 4 * 4 * 3)
    assert torch.equal(mask, simmim_masking(2, (8, 8), 2, 0.6, noise=noise))
    # the official form: per-pixel L1 on the image, mask upsampled to pixels, / (masked pixels) / channels
    reconstruction = model.backbone.unpatchify(pred)
    pixel_mask = mask.view(2, 8, 8).repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1)
    official = (F.l1_loss(reconstruction, images, reduction="none") * pixel_mask).sum() / pixel_mask.sum() / 3
    torch.testing.assert_close(model.compute_losses(images, noise)["mim"], official)


def test_every_draw_can_be_passed_in():
    model = SimMIM(backbone=dict(size="micro", img_size=32, patch_size=4, drop_path_rate=0.1), mask_patch_size=8)
    images, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    keep = model.backbone.draw_drop_path_keep(2, generator=torch.Generator().manual_seed(0))
    first = model.compute_losses(images, noise, keep)["mim"]
    torch.manual_seed(123)  # the global generator must not matter once every draw is given
    assert torch.equal(model.compute_losses(images, noise, keep)["mim"], first)
    other = keep.clone()
    other[-1] = 1.0 - other[-1]
    assert not torch.equal(model.compute_losses(images, noise, other)["mim"], first)


def test_masked_l1_by_hand():
    target = torch.zeros(1, 4, 1)
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    assert masked_l1(torch.ones(1, 4, 1), target, mask).item() == 1.0
    assert masked_l1(torch.tensor([[[0.0], [0.0], [5.0], [5.0]]]), target, mask).item() == 0.0
    shifted = target + torch.tensor([[[0.3], [0.3], [9.0], [-9.0]]])
    assert masked_l1(shifted, target, mask).item() == pytest.approx(0.3)
    # averaged over pixels x channels of masked patches: one masked patch of 2 values with errors 1 and 3
    assert masked_l1(torch.tensor([[[1.0, 3.0], [7.0, 7.0]]]), torch.zeros(1, 2, 2), torch.tensor([[1.0, 0.0]])) == 2.0


def test_reconstruction_grid_pastes_predictions_into_masked_patches():
    model = micro_simmim()
    images = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    grid = model.reconstruct(images)
    assert set(grid) == {"input", "masked", "reconstruction"}
    torch.manual_seed(0)
    pred, mask = model(images)  # the same draw
    pixel_mask = mask.view(2, 8, 8).repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).bool()
    pixel_mask = pixel_mask.expand_as(images)
    assert torch.equal(grid["masked"][pixel_mask], torch.zeros(int(pixel_mask.sum())))
    assert torch.equal(grid["reconstruction"][~pixel_mask], images[~pixel_mask])
    torch.testing.assert_close(grid["reconstruction"][pixel_mask], model.backbone.unpatchify(pred)[pixel_mask])


# --------------------------------------------------------------------------------------------- optimiser / lr

def decay_split(model) -> tuple[set[str], set[str]]:
    """(decayed, not decayed) parameter names of the model's optimiser groups."""
    decayed = {id(p) for group in model.parameter_groups() if group["weight_decay"] > 0 for p in group["params"]}
    names = {name for name, _ in model.named_parameters()}
    yes = {name for name, p in model.named_parameters() if id(p) in decayed}
    return yes, names - yes


def test_optimiser_defaults_and_decay_groups():
    model = micro_simmim()
    config = model.optim_config
    assert (config.base_lr, config.lr_reference_batch, config.betas, config.warmup_epochs) == (
        1e-4, 512, (0.9, 0.999), 10)
    assert config.peak_lr(2048) == pytest.approx(4e-4)  # 1e-4 x 2048 / 512
    decayed, not_decayed = decay_split(model)
    assert "backbone.cls_token" in not_decayed and "mask_token" in decayed  # official ViT: only cls / pos exempt
    assert {"backbone.blocks.0.attn.qkv.weight", "head.weight"} <= decayed
    learned = SimMIM(backbone=dict(size="micro", img_size=32, patch_size=4, pos_embed="learned"), mask_patch_size=8)
    decayed = {id(p) for group in learned.parameter_groups() if group["weight_decay"] > 0 for p in group["params"]}
    assert id(learned.backbone.pos_embed) not in decayed


def test_paper_encoder_decays_mask_token_and_shared_table_only_beyond_the_weights():
    """microsoft/SimMIM's ViT pre-training groups: 1-D parameters, ".bias" names, cls_token and pos_embed exempt."""
    model = SimMIM(backbone=PAPER_MICRO, mask_patch_size=8)
    decayed, not_decayed = decay_split(model)
    assert {"mask_token", "backbone.rel_pos_bias.relative_position_bias_table"} <= decayed
    assert {"backbone.cls_token", "backbone.blocks.0.attn.qkv.bias", "backbone.blocks.0.ls1.gamma",
            "backbone.norm.weight", "head.bias"} <= not_decayed
    assert all(name.endswith("weight") for name in decayed - {"mask_token",
                                                               "backbone.rel_pos_bias.relative_position_bias_table"})
    assert model.backbone.pos_embed is None


def test_simmim_init_statistics_and_depth_rescale():
    """Clipped trunc-normal: N(0, 1) truncated at +-1 has std sqrt(1 - 2 phi(1) / (2 Phi(1) - 1)) = 0.539560..."""
    phi = math.exp(-0.5) / math.sqrt(2 * math.pi)
    big_phi = 0.5 * (1 + math.erf(1 / math.sqrt(2)))
    clipped_std = 0.02 * math.sqrt(1 - 2 * phi / (2 * big_phi - 1))
    assert clipped_std == pytest.approx(0.02 * 0.53956, rel=1e-5)
    assert depth_rescale_factors(3) == pytest.approx([math.sqrt(2), 2.0, math.sqrt(6)])
    torch.manual_seed(0)
    backbone = SimMIM(backbone=PAPER_MICRO, mask_patch_size=8).backbone
    unscaled = torch.cat([weight.flatten() for block in backbone.blocks
                          for weight in (block.attn.qkv.weight, block.mlp.fc1.weight)])  # 459k draws
    assert unscaled.std().item() == pytest.approx(clipped_std, rel=0.005)
    assert unscaled.abs().max().item() <= 0.02
    for index, block in enumerate(backbone.blocks):
        bound = 0.02 / math.sqrt(2 * (index + 1))
        for weight in (block.attn.proj.weight, block.mlp.fc2.weight):
            assert bound * 0.99 < weight.abs().max().item() <= bound * (1 + 1e-6)
        assert torch.count_nonzero(block.attn.qkv.bias) == 0 and torch.all(block.ls1.gamma == 0.1)
    for weight in (backbone.patch_embed.proj.weight, backbone.cls_token):
        assert weight.abs().max().item() <= 0.02 and weight.std().item() == pytest.approx(clipped_std, rel=0.2)
    assert torch.count_nonzero(backbone.rel_pos_bias.relative_position_bias_table) == 0


def test_multistep_schedule_by_hand():
    # warm-up 10 steps to 4e-4, x 0.1 at step 70 (epoch 700 of 800 at 0.1 step / epoch)
    values = [warmup_multistep(step, 10, 4e-4, (70,), 0.1) for step in (0, 5, 10, 69, 70, 79)]
    assert values == pytest.approx([0.0, 2e-4, 4e-4, 4e-4, 4e-5, 4e-5])
    assert warmup_multistep(100, 0, 1.0, (10, 50), 0.5) == 0.25
    with pytest.raises(ValueError, match="needs positive decay_epochs"):
        OptimConfig(schedule="multistep")
    with pytest.raises(ValueError, match="unknown schedule"):
        OptimConfig(schedule="step")
