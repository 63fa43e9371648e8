"""BEiT-style baseline: block masks from the loader, the loss on masked patches only, no pixel leak from masked
patches, learnability on synthetic tokens; the paired model / tokenizer views every token method trains on."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_mim.methods import BEiT
from lightning_mim.targets import centre_square_view
from lightning_mim.targets.views import TokenizerViews
from micro_methods import PatchColourTokenizer

MICRO = dict(size="micro", img_size=16, patch_size=4, in_chans=1, pos_embed="learned", init="timm")


def micro_beit(**kwargs) -> BEiT:
    kwargs = {"tokenizer": PatchColourTokenizer(16, 4, 1, 4), "num_masked_patches": 6, "min_masked_per_block": 2,
              **kwargs}
    return BEiT(backbone=MICRO, **kwargs)


def test_loss_counts_masked_patches_only():
    torch.manual_seed(0)
    model = micro_beit(tokenizer=None, vocab_size=4)
    images, ids = torch.randn(2, 1, 16, 16), torch.randint(0, 4, (2, 4, 4))
    mask = torch.zeros(2, 16)
    mask[:, [1, 2, 5, 6]] = 1.0
    mask[1, 15] = 1.0  # another count in sample 1
    loss = model.compute_losses((images, ids, mask))["mim"]
    logits = model(images, mask)
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids.flatten(1), reduction="none")
    torch.testing.assert_close(loss, per_token[mask.bool()].mean())
    visible_changed = ids.clone().view(2, 16)
    visible_changed[:, 0] = (visible_changed[:, 0] + 1) % 4
    assert model.compute_losses((images, visible_changed.view(2, 4, 4), mask))["mim"] == loss
    masked_changed = ids.clone().view(2, 16)
    masked_changed[:, 1] = (masked_changed[:, 1] + 1) % 4
    assert model.compute_losses((images, masked_changed.view(2, 4, 4), mask))["mim"] != loss


def test_masked_pixels_do_not_reach_the_logits():
    model = micro_beit().eval()
    images, mask = torch.randn(1, 1, 16, 16), torch.zeros(1, 16)
    mask[0, :4] = 1.0  # the first patch row
    changed = images.clone()
    changed[..., :4, :] = 9.0
    torch.testing.assert_close(model(changed, mask), model(images, mask))
    changed[..., 4:8, :] = 9.0
    assert not torch.allclose(model(changed, mask), model(images, mask))


def test_transform_gives_views_and_a_block_mask():
    model = BEiT(backbone=dict(size="micro", img_size=224, patch_size=16, in_chans=1),
                 tokenizer=PatchColourTokenizer(224, 16, 1, 4))
    transform = model.train_transform((0.5,), (0.25,))
    torch.manual_seed(0)
    counts = []
    for _ in range(20):
        view, tokenizer_view, mask = transform(Image.fromarray(np.random.randint(0, 255, (240, 300), np.uint8)))
        assert view.shape == tokenizer_view.shape == (1, 224, 224) and mask.shape == (196,)
        counts.append(int(mask.sum()))
    assert max(counts) == 75 and min(counts) >= 60  # BEiT's masking may stop a few patches short


def test_views_share_one_crop():
    image = Image.fromarray(np.random.RandomState(0).randint(0, 255, (40, 60, 3), np.uint8))
    square = TokenizerViews(40, 40, (0.5,) * 3, (0.25,) * 3, colour_jitter=0.0)
    view, tokenizer_view = square(image)
    centre = torch.from_numpy(np.array(image)[:, 10:50]).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(tokenizer_view, centre)  # the centred square, no resize at the same size
    torch.testing.assert_close(view * 0.25 + 0.5, centre)
    torch.manual_seed(0)
    random = TokenizerViews(32, 32, (0.5,) * 3, (0.25,) * 3, tokenizer_chans=1, crop="random_resized",
                            colour_jitter=0.0)
    view, tokenizer_view = random(image)
    grey = (view * 0.25 + 0.5) * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    assert tokenizer_view.shape == (1, 32, 32)
    error = (tokenizer_view - grey.sum(0, keepdim=True)).abs()  # grey before / after the bicubic resize
    assert error.mean() < 2 / 255 and error.max() < 0.05
    big = TokenizerViews(16, 64, (0.5,) * 3, (0.25,) * 3, colour_jitter=0.4)(image)
    assert big[0].shape == (3, 16, 16) and big[1].shape == (3, 64, 64)
    # exactly the view `tokenizer fit` / `tokenizer encode` tokenise, so stored ids equal on-the-fly ids
    assert torch.equal(big[1], centre_square_view(64, "RGB")(image))


def test_validation_masks_repeat_and_reconstruction_rows():
    model = micro_beit()
    images = torch.randn(3, 1, 16, 16)
    model.on_validation_epoch_start()
    first = model.validation_views(images)[2]
    model.on_validation_epoch_start()
    assert torch.equal(model.validation_views(images)[2], first) and first.sum(1).min() >= 2
    model.on_validation_epoch_start()
    rows = model.reconstruct(images)
    pixel_mask = first.view(3, 1, 4, 4).repeat_interleave(4, 2).repeat_interleave(4, 3).bool()
    assert torch.equal(rows["masked"][pixel_mask], torch.zeros(int(pixel_mask.sum())))
    shown = rows["reconstruction"] * model.targets.stats(1)[1][0] + model.targets.stats(1)[0][0]
    values = set(torch.round(shown[pixel_mask], decimals=4).tolist())
    assert values <= {0.0, 1.0}  # black = wrong, white = right
    torch.testing.assert_close(rows["reconstruction"][~pixel_mask], images[~pixel_mask])


def test_vit_b16_head_and_settings():
    model = BEiT(backbone=dict(size="base"), tokenizer=None, vocab_size=8192)
    assert (model.num_masked, model.min_block, model.head.out_features) == (75, 16, 8192)
    assert model.optim_config.base_lr == 1.5e-3 and model.optim_config.cooldown_epochs == 10
    with pytest.raises(ValueError, match="num_masked_patches"):
        micro_beit(num_masked_patches=16)
    with pytest.raises(ValueError, match="has 4 entries"):
        micro_beit(vocab_size=8)


def test_loss_falls_well_below_ln_v_on_patch_colour_tokens():
    torch.manual_seed(0)
    model = micro_beit(tokenizer=PatchColourTokenizer(16, 4, 1, levels=8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(100):  # flat images with noise: the visible patches tell the colour of the masked ones
        pixels = (torch.rand(32, 1, 1, 1) + 0.02 * torch.randn(32, 1, 16, 16)).clamp(0, 1)
        mask = torch.zeros(32, 16)
        mask[:, torch.randperm(16)[:6]] = 1.0
        loss = model.compute_losses(((pixels - 0.5) / 0.25, pixels, mask))["mim"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 0.8 * math.log(8)
    assert sum(losses[-10:]) / 10 < 0.35 * math.log(8), losses[-10:]
