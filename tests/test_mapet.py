"""MaPeT: the two-stream attention rule (spec 7.1, the hand example and brute force), no leak of a patch's own or
later content into its prediction, the joint-sequence forward against a direct two-stream implementation (shared
weights, shared stochastic-depth draws), the loss and target layout (spec 7.2), learnability on synthetic tokens."""
import math

import pytest
import torch
import torch.nn.functional as F

from lightning_mim.losses import token_accuracy, token_cross_entropy
from lightning_mim.masking import permutation_ranks, two_stream_layout
from lightning_mim.methods import MaPeT
from lightning_mim.schedules import warmup_cosine
from micro_methods import PatchColourTokenizer

MICRO = dict(size="micro", img_size=16, patch_size=4, in_chans=1, pos_embed="learned", init="timm")


def micro_mapet(**kwargs) -> MaPeT:
    backbone = {**MICRO, **kwargs.pop("backbone", {})}
    return MaPeT(backbone=backbone, tokenizer=kwargs.pop("tokenizer", PatchColourTokenizer(16, 4, 1, 4)), **kwargs)


# ------------------------------------------------------------------------------------------- attention rule

HAND_CONTENT = ["101010111", "111111000", "101010111", "101110101", "101010111", "101111100",
                "101010111", "101010111", "101010111"]  # rows 0..5 then M1, M3, M5
HAND_QUERY = ["101111100", "101010111", "101110101"]  # g1, g3, g5


def test_hand_example_n6_l3():
    layout = two_stream_layout(torch.tensor([[0, 5, 1, 3, 2, 4]]), num_context=3)
    assert layout.predicted_idx.tolist() == [[1, 3, 5]]
    assert ["".join(str(int(v)) for v in row) for row in layout.content_mask[0]] == HAND_CONTENT
    assert ["".join(str(int(v)) for v in row) for row in layout.query_mask[0]] == HAND_QUERY
    joint = layout.joint_attention_mask()
    assert joint.shape == (1, 1, 12, 12) and not joint[..., 9:].any()  # query tokens are never keys
    assert torch.equal(joint[0, 0, :9, :9], layout.content_mask[0])
    assert torch.equal(joint[0, 0, 9:, :9], layout.query_mask[0])


def brute_force(ranks: torch.Tensor, num_context: int) -> tuple[list, list]:
    """The rule of spec 1.4 cell by cell, from the horizons in its table."""
    ranks = ranks.tolist()
    predicted = [t for t, r in enumerate(ranks) if r >= num_context]
    columns = [(ranks[j], False) for j in range(len(ranks))] + [(ranks[p], True) for p in predicted]

    def row(horizon: int) -> list[bool]:
        return [rank > horizon if is_mask else rank <= horizon for rank, is_mask in columns]

    content = [row(num_context - 1 if r < num_context else r) for r in ranks]
    content += [row(num_context - 1) for _ in predicted]
    return content, [row(ranks[p] - 1) for p in predicted]


@pytest.mark.parametrize("num_context", [1, 3, 50, 196])
def test_rule_properties_on_random_permutations(num_context):
    torch.manual_seed(num_context)
    ranks = permutation_ranks(3, 196, 1)
    layout = two_stream_layout(ranks, num_context)
    num_predicted = 197 - num_context
    assert layout.content_mask.shape == (3, 197 + num_predicted, 197 + num_predicted)
    assert layout.query_mask.shape == (3, num_predicted, 197 + num_predicted)
    for b in range(3):
        content, query = brute_force(ranks[b], num_context)
        assert layout.content_mask[b].tolist() == content and layout.query_mask[b].tolist() == query
        predicted = layout.predicted_idx[b]
        assert predicted.tolist() == sorted(t for t in range(197) if ranks[b, t] >= num_context)
        assert 0 not in predicted.tolist()  # cls is never predicted
        own = torch.arange(num_predicted)
        assert layout.query_mask[b, own, 197 + own].all() and not layout.query_mask[b, own, predicted].any()
        assert layout.content_mask[b].diagonal().all()
        assert layout.content_mask[b].any(-1).all() and layout.query_mask[b].any(-1).all()
        context = (ranks[b] < num_context).nonzero().flatten()
        for rows in (layout.content_mask[b, context], layout.content_mask[b, 197:]):
            assert not rows[:, predicted].any() and rows[:, 197:].all()
        first, last = ranks[b, predicted].argmin(), ranks[b, predicted].argmax()
        assert layout.query_mask[b, first, :197].nonzero().flatten().tolist() == context.tolist()
        seen = layout.query_mask[b, last, :197]
        assert int(seen.sum()) == 196 and not seen[predicted[last]]
    assert num_predicted != 147 or layout.predicted_idx.shape == (3, 147)


def test_ranks_put_cls_first_and_follow_the_noise():
    noise = torch.tensor([[0.3, 0.1, 0.9, 0.5]])
    assert permutation_ranks(1, 4, 1, noise=noise).tolist() == [[0, 2, 1, 4, 3]]
    assert permutation_ranks(1, 4, 0, noise=noise).tolist() == [[1, 0, 3, 2]]
    with pytest.raises(ValueError, match="noise has shape"):
        permutation_ranks(2, 4, 1, noise=noise)
    with pytest.raises(ValueError, match="num_context must lie"):
        two_stream_layout(torch.zeros(1, 5, dtype=torch.long), 5)


def valid_ranks() -> torch.Tensor:
    """Two rows of (cls + 16 patches): cls at rank 0, the patches in reversed and in raster order."""
    return torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(16, 0, -1)]), torch.arange(17)])


NOT_A_PERMUTATION = r"ranks row {} is not a permutation of 0\.\.16: "


@pytest.mark.parametrize("row, column, value, message", [
    (1, 5, 7, NOT_A_PERMUTATION.format(1) + r"duplicated \[7\]; missing \[5\]"),
    (0, 3, 17, NOT_A_PERMUTATION.format(0) + r"out of range \[17\]; missing \[14\]"),
    (1, 2, -1, NOT_A_PERMUTATION.format(1) + r"out of range \[-1\]; missing \[2\]"),
    (1, None, None, r"ranks row 1 gives the prefix \(cls\) token\(s\) ranks \[16\]: the cls token must come first"),
])
def test_malformed_ranks_are_refused_with_what_is_wrong(row, column, value, message):
    model = micro_mapet()
    ranks = valid_ranks()
    if column is None:  # a permutation, but the cls token is not first
        ranks[row] = torch.roll(ranks[row], 1)
    else:
        ranks[row, column] = value
    with pytest.raises(ValueError, match=message) as error:
        model(torch.randn(2, 1, 16, 16), ranks)
    assert "a valid draw is one permutation of 0..16 per row" in str(error.value)


def test_ranks_of_the_wrong_shape_or_type_are_refused_and_a_valid_draw_is_accepted():
    model = micro_mapet()
    images = torch.randn(2, 1, 16, 16)
    with pytest.raises(ValueError, match=r"integer tensor of shape \(2, 17\).*got torch.int64 of shape \(2, 16\)"):
        model(images, valid_ranks()[:, 1:])
    with pytest.raises(ValueError, match=r"integer tensor .*got torch.float32"):
        model(images, valid_ranks().float())
    logits, predicted = model(images, valid_ranks())
    assert logits.shape == (2, 12, 4)  # V = 4 grey levels
    # row 0 predicts the 12 patches ranked 5..16, which reversed order gives to patches 0..11; row 1 patches 4..15
    assert predicted.tolist() == [list(range(12)), list(range(4, 16))]


# ------------------------------------------------------------------------------------------------ no leak

def test_a_prediction_sees_exactly_the_patches_ranked_before_it():
    torch.manual_seed(0)
    model = micro_mapet().eval()
    image = torch.randn(1, 1, 16, 16, requires_grad=True)
    ranks = model.draw_ranks(1, image.device)
    logits, predicted = model(image, ranks)
    patch_ranks = ranks[0, 1:]
    for k in (0, 5, logits.shape[1] - 1):
        grad, = torch.autograd.grad(logits[0, k] @ torch.randn(logits.shape[-1]), image, retain_graph=True)
        per_patch = model.backbone.patchify(grad).abs().sum(-1)[0]
        sees = per_patch > 0
        expected = patch_ranks < patch_ranks[predicted[0, k]]
        assert torch.equal(sees, expected), k
        # overwriting every patch ranked at or after it leaves its logits unchanged
        later = (~expected).float().view(1, 1, 4, 4).repeat_interleave(4, 2).repeat_interleave(4, 3)
        changed = image.detach() * (1 - later) + 5.0 * later
        torch.testing.assert_close(model(changed, ranks)[0][0, k], logits[0, k].detach())


# ------------------------------------------------------------------------------ joint sequence = two streams

def two_stream_reference(model: MaPeT, images, ranks, keep):
    """Spec 1.5 written out: H and G as separate streams, queries of G from the shared W_q, keys / values from H,
    each branch's stochastic-depth draw shared by both streams."""
    backbone = model.backbone
    layout = two_stream_layout(ranks, model.num_context)
    real = backbone.prepend_prefix(backbone.embed_patches(images))
    mask_tokens = model.mask_token + backbone.pos_embed[0, layout.predicted_idx]
    content, query = torch.cat([real, mask_tokens], 1), mask_tokens
    for block, block_keep in zip(backbone.blocks, keep):
        attn, width = block.attn, content.shape[-1]
        scale = (block_keep / (1 - getattr(block.drop_path1, "drop_prob", 0.0)))[:, :, None, None]

        def heads(x):
            return x.view(x.shape[0], x.shape[1], attn.num_heads, -1).transpose(1, 2)

        q, k, v = attn.qkv(block.norm1(content)).split(width, dim=-1)
        q_query = F.linear(block.norm1(query), attn.qkv.weight[:width], attn.qkv.bias[:width])
        for_content = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), layout.content_mask[:, None])
        for_query = F.scaled_dot_product_attention(heads(q_query), heads(k), heads(v), layout.query_mask[:, None])
        content = content + scale[0] * block.ls1(attn.proj(for_content.transpose(1, 2).flatten(2)))
        query = query + scale[0] * block.ls1(attn.proj(for_query.transpose(1, 2).flatten(2)))
        content = content + scale[1] * block.ls2(block.mlp(block.norm2(content)))
        query = query + scale[1] * block.ls2(block.mlp(block.norm2(query)))
    return model.head(backbone.norm(query))


def test_joint_sequence_equals_two_streams_with_shared_drop_path():
    torch.manual_seed(1)
    model = micro_mapet(backbone=dict(drop_path_rate=0.5, timm_kwargs={"init_values": 0.1}))
    images = torch.randn(3, 1, 16, 16)
    ranks = model.draw_ranks(3, images.device)
    keep = model.backbone.draw_drop_path_keep(3)
    keep[1:3, 0] = torch.tensor([1.0, 0.0, 1.0])  # depth >= 3: block 0 has rate 0, the last block cannot show it
    logits, _ = model(images, ranks, keep)
    torch.testing.assert_close(logits, two_stream_reference(model, images, ranks, keep), atol=1e-5, rtol=1e-5)
    flipped = keep.clone()
    flipped[1, 0] = 1 - flipped[1, 0]
    assert not torch.allclose(model(images, ranks, flipped)[0], logits)


def test_every_draw_can_be_passed_in():
    model = micro_mapet(backbone=dict(drop_path_rate=0.2)).train()
    views = (torch.randn(2, 1, 16, 16), torch.rand(2, 1, 16, 16))
    ranks, keep = model.draw_ranks(2, "cpu"), model.backbone.draw_drop_path_keep(2)
    first = model.compute_losses(views, ranks, keep)["mim"]
    torch.manual_seed(123)
    assert model.compute_losses(views, ranks, keep)["mim"] == first


# --------------------------------------------------------------------------------------- loss and targets

def test_cross_entropy_by_hand_and_layout():
    assert token_cross_entropy(torch.zeros(2, 3, 8192), torch.zeros(2, 3)).item() == pytest.approx(math.log(8192))
    logits = torch.tensor([[[2.0, 0, 0, 0], [0, 0, 0, 0]]])
    expected = ((math.log(math.e ** 2 + 3) - 2) + math.log(4)) / 2
    assert token_cross_entropy(logits, torch.tensor([[0, 3]])).item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.863524, abs=1e-6)
    logits, targets = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    torch.testing.assert_close(token_cross_entropy(logits, targets), F.cross_entropy(logits.transpose(1, 2), targets))
    assert token_accuracy(torch.eye(4)[None], torch.tensor([[0, 1, 0, 0]])).item() == 0.5


def test_targets_are_the_predicted_patches_in_raster_order():
    model = micro_mapet(tokenizer=None, vocab_size=16)
    ids = torch.arange(16).repeat(2, 1).view(2, 4, 4)  # y[b, j] = j
    seen = {}
    model.head.register_forward_hook(lambda module, inputs, output: seen.update(logits=output))
    ranks = model.draw_ranks(2, "cpu")
    model.compute_losses((torch.randn(2, 1, 16, 16), ids), ranks)
    _, predicted = model(torch.randn(2, 1, 16, 16), ranks)
    expected = [sorted(j for j in range(16) if ranks[b, 1 + j] >= model.num_context) for b in range(2)]
    assert predicted.tolist() == expected and seen["logits"].shape == (2, 12, 16)


def test_vit_b16_shapes_and_counts():
    model = MaPeT(backbone=dict(size="base", pos_embed="learned", init="timm"), tokenizer=None, vocab_size=8192)
    assert (model.num_context, model.num_predicted) == (50, 147)
    layout = two_stream_layout(model.draw_ranks(1, "cpu"), model.num_context)
    assert layout.joint_attention_mask().shape == (1, 1, 491, 491)
    with torch.no_grad():
        logits, predicted = model(torch.randn(1, 3, 224, 224))
    assert logits.shape == (1, 147, 8192) and predicted.shape == (1, 147)
    assert model.head.weight.numel() + model.head.bias.numel() + model.mask_token.numel() == 768 * 8192 + 8192 + 768


def test_bad_settings_fail_clearly():
    with pytest.raises(ValueError, match="predict_ratio"):
        micro_mapet(predict_ratio=1.0)
    with pytest.raises(ValueError, match="vocab_size"):
        micro_mapet(tokenizer=None)
    model = micro_mapet(tokenizer=None, vocab_size=16)
    with pytest.raises(ValueError, match="patch grid"):
        model.compute_losses((torch.randn(1, 1, 16, 16), torch.zeros(1, 5, 5, dtype=torch.long)))


# ------------------------------------------------------------------------------------- optimiser and learning

def test_optimiser_defaults_and_cooldown():
    model = micro_mapet()
    config = model.optim_config
    assert (config.base_lr, config.lr_scaling, config.betas, config.min_lr) == (1.5e-3, "none", (0.9, 0.999), 1e-5)
    assert (config.warmup_epochs, config.cooldown_epochs, config.peak_lr(2048)) == (10, 10, 1.5e-3)
    decayed = {id(p) for group in model.parameter_groups() if group["weight_decay"] > 0 for p in group["params"]}
    assert id(model.mask_token) in decayed  # the official code decays it
    assert id(model.backbone.pos_embed) not in decayed and id(model.backbone.cls_token) not in decayed
    # 310 epochs of 1 step: warm-up 10, cosine to min_lr at step 300, then 10 steps at min_lr
    values = [warmup_cosine(step, 300, 10, 1.5e-3, 1e-5) for step in (5, 10, 155, 300, 305)]
    assert values == pytest.approx([7.5e-4, 1.5e-3, (1.5e-3 + 1e-5) / 2, 1e-5, 1e-5])


def test_loss_falls_well_below_ln_v_on_patch_colour_tokens():
    torch.manual_seed(0)
    tokenizer = PatchColourTokenizer(16, 4, 1, levels=8)
    model = micro_mapet(tokenizer=tokenizer, optim=dict(lr=2e-3, warmup_steps=10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    losses = []
    for _ in range(100):  # flat images with noise: the context tells the colour of every predicted patch
        pixels = (torch.rand(32, 1, 1, 1) + 0.02 * torch.randn(32, 1, 16, 16)).clamp(0, 1)
        loss = model.compute_losses(((pixels - 0.5) / 0.25, pixels))["mim"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 0.8 * math.log(8)
    assert sum(losses[-10:]) / 10 < 0.35 * math.log(8), losses[-10:]
