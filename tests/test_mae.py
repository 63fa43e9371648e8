import torch

from lightning_mim.methods import MAE


def small_mae(**kwargs):
    return MAE(backbone=dict(size="micro", img_size=32, patch_size=4), decoder_dim=64, decoder_depth=2,
               decoder_heads=4, **kwargs)


def test_shapes_and_mask_ratio():
    model = small_mae()
    images = torch.randn(4, 3, 32, 32)
    pred, mask = model(images)
    assert pred.shape == (4, 64, 48)
    assert torch.all(mask.sum(1) == 48)


def test_loss_uses_only_removed_patches_and_no_leak():
    torch.manual_seed(0)
    model = small_mae().eval()
    images = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 64)
    pred, mask = model(images, noise)
    # changing a removed patch's pixels changes neither the encoder input nor the prediction
    removed = int(torch.nonzero(mask[0])[0])
    other = images.clone()
    row, col = divmod(removed, 8)
    other[0, :, 4 * row:4 * row + 4, 4 * col:4 * col + 4] = torch.randn(3, 4, 4)
    pred_other, _ = model(other, noise)
    assert torch.allclose(pred, pred_other, atol=1e-6)
    # but it does change the loss (it is a target), unlike a visible patch's target
    assert model.compute_losses(other, noise)["mim"] != model.compute_losses(images, noise)["mim"]


def test_gradients_reach_encoder_and_decoder_but_not_frozen_pos():
    model = small_mae()
    model.compute_losses(torch.randn(2, 3, 32, 32))["mim"].backward()
    assert model.backbone.blocks[0].attn.qkv.weight.grad is not None
    assert model.decoder.mask_token.grad is not None
    assert model.backbone.pos_embed.grad is None


def test_loss_decreases_when_overfitting_a_batch():
    torch.manual_seed(0)
    model = small_mae()
    images = torch.randn(8, 3, 32, 32)
    noise = torch.rand(8, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = model.compute_losses(images, noise)["mim"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_reconstruction_keeps_visible_patches():
    model = small_mae(norm_pix_loss=False)
    images = torch.randn(2, 3, 32, 32)
    out = model.reconstruct(images)
    assert set(out) == {"input", "masked", "reconstruction"}
    patches = model.backbone.patchify(out["reconstruction"])
    masked = model.backbone.patchify(out["masked"])
    visible = masked.abs().sum(-1) > 0
    assert torch.allclose(patches[visible], model.backbone.patchify(images)[visible])
