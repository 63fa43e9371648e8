import math

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from lightning_mim.backbone import BackboneConfig, MIMViT, build_backbone, patchify, sincos_2d, unpatchify


def micro(**overrides):
    return build_backbone(dict(size="micro", img_size=32, patch_size=4), **overrides)


def test_sincos_layout_matches_mae():
    table = sincos_2d(768, 14, 14, cls_token=True)
    assert table.shape == (197, 768)
    assert torch.all(table[0] == 0)
    grid = table[1:].reshape(14, 14, 768)
    # first half depends only on the column, second half only on the row
    assert torch.allclose(grid[:, :, :384], grid[:1, :, :384].expand(14, -1, -1))
    assert torch.allclose(grid[:, :, 384:], grid[:, :1, 384:].expand(-1, 14, -1))
    assert grid[0, 3, 0].item() == pytest.approx(math.sin(3), abs=1e-6)
    assert grid[0, 3, 192].item() == pytest.approx(math.cos(3), abs=1e-6)
    assert grid[5, 0, 384].item() == pytest.approx(math.sin(5), abs=1e-6)
    # frequency k of the column half: omega_k = 10000^(-k/192)
    assert grid[0, 2, 7].item() == pytest.approx(math.sin(2 * 10000 ** (-7 / 192)), abs=1e-6)


def test_patchify_element_layout_and_round_trip():
    images = torch.randn(2, 3, 32, 32)
    patches = patchify(images, 4)
    assert patches.shape == (2, 64, 48)
    n, i, j, p, q, c = 1, 2, 5, 3, 1, 2
    assert patches[n, i * 8 + j, (p * 4 + q) * 3 + c] == images[n, c, 4 * i + p, 4 * j + q]
    assert torch.equal(unpatchify(patches, 4, (8, 8), 3), images)


def test_sizes_match_timm_registry():
    config = BackboneConfig(size="tiny", img_size=224, patch_size=16)
    model = MIMViT(config)
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters())


@pytest.mark.parametrize("pos_embed", ["sincos", "learned"])
def test_state_dict_loads_strict_into_timm_with_identical_features(pos_embed):
    model = micro(pos_embed=pos_embed).eval()
    reference = VisionTransformer(**model.config.timm_kwargs_full()).eval()
    reference.load_state_dict(model.state_dict(), strict=True)
    images = torch.randn(3, 3, 32, 32)
    assert torch.allclose(reference.forward_features(images), model.forward_full(images), atol=1e-6)


def test_state_dict_loads_into_timm_create_model():
    model = build_backbone(size="tiny", img_size=64, patch_size=16).eval()
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=64).eval()
    reference.load_state_dict(model.state_dict(), strict=True)
    images = torch.randn(2, 3, 64, 64)
    assert torch.allclose(reference.forward_features(images), model.forward_full(images), atol=1e-5)


def test_sincos_is_frozen_and_cls_row_zero():
    model = micro()
    assert not model.pos_embed.requires_grad
    assert torch.all(model.pos_embed[0, 0] == 0)
    assert micro(pos_embed="learned").pos_embed.requires_grad


def test_mae_init():
    torch.manual_seed(0)
    model = build_backbone(size="small", img_size=32, patch_size=16)
    qkv = model.blocks[0].attn.qkv.weight  # (3D, D) initialised as one matrix
    bound = math.sqrt(6 / (qkv.shape[0] + qkv.shape[1]))
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.9 * bound
    assert torch.all(model.blocks[0].attn.qkv.bias == 0)
    proj = model.patch_embed.proj.weight
    flat_bound = math.sqrt(6 / (proj.shape[0] + proj[0].numel()))
    assert proj.abs().max() <= flat_bound and proj.abs().max() > 0.9 * flat_bound
    assert model.cls_token.std().item() == pytest.approx(0.02, rel=0.3)
    assert torch.all(model.norm.weight == 1) and torch.all(model.norm.bias == 0)


def test_forward_kept_equals_full_forward_on_subset_without_attention_to_others():
    model = micro().eval()
    images = torch.randn(2, 3, 32, 32)
    keep = torch.stack([torch.randperm(64)[:16] for _ in range(2)])
    out = model.forward_kept(images, keep)
    assert out.shape == (2, 17, 128)
    # the same as running the full sequence with attention restricted to cls + kept tokens
    allowed = torch.zeros(2, 65, dtype=torch.bool)
    allowed[:, 0] = True
    allowed.scatter_(1, keep + 1, True)
    attn_mask = allowed[:, None, None, :].expand(2, 1, 65, 65)
    full = model.forward_full(images, attn_mask=attn_mask)
    gathered = torch.gather(full[:, 1:], 1, keep[..., None].expand(-1, -1, 128))
    assert torch.allclose(out[:, 1:], gathered, atol=1e-5)
    assert torch.allclose(out[:, 0], full[:, 0], atol=1e-5)


def test_forward_masked_replaces_tokens_before_position_embedding():
    model = micro().eval()
    images = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 64)
    mask[:, ::2] = 1
    mask_token = torch.randn(1, 1, 128)
    tokens = model.embed_patches(images, mask, mask_token)
    expected = mask_token[0, 0] + model.pos_embed[0, 1:][::2]
    assert torch.allclose(tokens[0, ::2], expected, atol=1e-6)
    assert torch.allclose(tokens[0, 1::2], model.embed_patches(images)[0, 1::2])
    # visible content cannot leak through a masked position
    other = images.clone()
    other[:, :, :4, :4] += 5  # patch 0 is masked
    assert torch.allclose(model.forward_masked(images, mask, mask_token), model.forward_masked(other, mask, mask_token))


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    plain = micro()
    ckpt = micro(grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    images = torch.randn(2, 3, 32, 32)
    for model in (plain, ckpt):
        model.forward_full(images).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=1e-6), name


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(img_size=30, patch_size=4), "not divisible by patch size"),
        (dict(size="gigantic"), "unknown backbone size"),
        (dict(pos_embed="rope"), "unknown pos_embed"),
    ],
)
def test_bad_config_messages(overrides, message):
    with pytest.raises(ValueError, match=message):
        BackboneConfig(**{**dict(size="micro", img_size=32, patch_size=4), **overrides})


def test_wrong_input_shape_message():
    with pytest.raises(ValueError, match="expects images of shape"):
        micro().forward_full(torch.randn(1, 1, 32, 32))


def test_attention_is_fused_sdpa(monkeypatch):
    model = micro().eval()
    assert all(block.attn.fused_attn for block in model.blocks)
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("attn_mask") is not None)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    mask = torch.ones(1, 1, 65, 65, dtype=torch.bool)
    model.forward_full(torch.randn(1, 3, 32, 32), attn_mask=mask)
    assert calls == [True] * len(model.blocks)


def test_drop_path_draws_can_be_passed_in():
    torch.manual_seed(0)
    model = build_backbone(size="micro", img_size=16, patch_size=4, drop_path_rate=0.3).train()
    rates = model.drop_path_rates()
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.3) and len(rates) == 4
    tokens = model.prepend_prefix(model.embed_patches(torch.randn(3, 3, 16, 16)))
    everything = torch.ones(4, 2, 3)
    with torch.no_grad():
        kept = model.forward_tokens(tokens, drop_path_keep=everything)
        reference = model.eval().forward_tokens(tokens)  # no stochastic depth in eval mode
        # dropping sample 1's attention branch of the last block: its output changes, the others' do not
        keep = everything.clone()
        keep[3, 0, 1] = 0.0
        dropped = model.train().forward_tokens(tokens, drop_path_keep=keep)
    # a kept branch is scaled by 1 / (1 - rate) in training, as timm's DropPath does
    assert not torch.allclose(kept, reference)
    block = model.blocks[3]
    manual = model.norm_pre(tokens)
    for index, current in enumerate(model.blocks[:3]):
        scale = 1.0 / (1.0 - rates[index])
        manual = manual + scale * current.ls1(current.attn(current.norm1(manual)))
        manual = manual + scale * current.ls2(current.mlp(current.norm2(manual)))
    scale = 1.0 / (1.0 - rates[3])
    attn = block.ls1(block.attn(block.norm1(manual)))
    manual = manual + scale * attn * torch.tensor([1.0, 0.0, 1.0])[:, None, None]
    manual = manual + scale * block.ls2(block.mlp(block.norm2(manual)))
    torch.testing.assert_close(dropped, model.norm(manual).detach())
    assert torch.equal(dropped[[0, 2]], kept[[0, 2]]) and not torch.allclose(dropped[1], kept[1])
    draws = model.draw_drop_path_keep(20000, generator=torch.Generator().manual_seed(0))
    assert draws.shape == (4, 2, 20000) and torch.all(draws[0] == 1.0)
    assert draws[3].mean().item() == pytest.approx(0.7, abs=0.02)
