"""SymMIM: the unit tests of the spec (methods/symmim.md, section 8) with its hand-computed values, the DDP key
gathering with labels offset by rank (two gloo processes), and Lightning runs of the momentum encoder's EMA."""
import os

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_mim.data import MIMDataModule
from lightning_mim.losses import info_nce
from lightning_mim.masking import checkerboard_mask, checkerboard_masking
from lightning_mim.methods import SymMIM
from lightning_mim.methods.base import cosine_momentum
from lightning_mim.methods.symmim import gather_keys


def micro_symmim(img_size: int = 32, **kwargs) -> SymMIM:
    kwargs.setdefault("optim", dict(lr=1e-3, warmup_steps=1))
    return SymMIM(backbone=dict(size="micro", img_size=img_size, patch_size=4), mask_patch_size=8,
                  head_hidden_dim=64, head_out_dim=16, **kwargs)


def checker(n: int, k: int, phase: int = 0) -> torch.Tensor:
    return checkerboard_mask((n, n), k, phase)


# ------------------------------------------------------------------------------------------------------- masks

def test_counts():
    assert checker(14, 1).sum() == 98 and checker(14, 2).sum() == 96  # 96 / 196 = 48.98 % at 224 / 32 px
    assert checker(16, 1).sum() == checker(16, 2).sum() == 128
    assert checker(14, 7).sum() == 98


@pytest.mark.parametrize("n,k", [(14, 1), (14, 2), (16, 2), (12, 2), (14, 7)])
def test_central_symmetry(n, k):
    grid = checker(n, k).view(n, n)
    assert torch.equal(grid, grid.rot90(2))


def test_axis_mirrors():
    m1 = checker(14, 1).view(14, 14)
    assert torch.equal(m1, 1 - m1.flip(-1)) and torch.equal(m1, 1 - m1.flip(-2))
    m2 = checker(16, 2).view(16, 16)
    assert torch.equal(m2, 1 - m2.flip(-1))
    m2_224 = checker(14, 2).view(14, 14)
    assert torch.equal(m2_224, m2_224.flip(-1))  # n / k = 7 is odd: mirror-invariant (spec A3)


def test_phase_complement():
    for k in (1, 2):
        zero, one = checker(14, k, 0), checker(14, k, 1)
        assert torch.equal(one, 1 - zero)
        assert torch.all(zero + one == 1)


def test_structure_and_overlap():
    m2 = checker(14, 2).view(7, 2, 7, 2)
    assert torch.equal(m2.amax((1, 3)), m2.amin((1, 3)))  # every 2 x 2 block is constant
    blocks = m2[:, 0, :, 0]
    assert torch.all(blocks[1:] != blocks[:-1]) and torch.all(blocks[:, 1:] != blocks[:, :-1])
    m1 = checker(14, 1).view(14, 14)
    assert not torch.any(m1[1:] * m1[:-1]) and not torch.any(m1[:, 1:] * m1[:, :-1])  # no masked 4-neighbours
    assert (checker(14, 1) * checker(14, 2)).sum() == 48


def test_determinism_and_random_phase():
    model = micro_symmim()
    first, second = model.masks(3, torch.device("cpu")), model.masks(3, torch.device("cpu"))
    for a, b in zip(first, second):
        assert torch.equal(a, b) and torch.equal(a, a[:1].expand_as(a))
    online, momentum = first
    assert torch.equal(online[0], checker(8, 1)) and torch.equal(momentum[0], checker(8, 2))
    assert online[0].sum() == momentum[0].sum() == 32  # the demo grid: 8 x 8 patches, both exactly half
    randomised = micro_symmim(mask_phase="random")
    phases = (torch.tensor([0, 1, 1]), torch.tensor([1, 0, 1]))
    online, momentum = randomised.masks(3, torch.device("cpu"), phases)
    assert torch.equal(online, torch.stack([checker(8, 1), 1 - checker(8, 1), 1 - checker(8, 1)]))
    assert torch.equal(momentum, torch.stack([1 - checker(8, 2), checker(8, 2), 1 - checker(8, 2)]))
    drawn = randomised.masks(64, torch.device("cpu"))[0]
    flipped = (drawn != checker(8, 1)).all(1)
    assert torch.all(flipped | (drawn == checker(8, 1)).all(1)) and 0 < flipped.sum() < 64
    swapped = micro_symmim(swap_scales=True).masks(1, torch.device("cpu"))
    assert torch.equal(swapped[0][0], checker(8, 2)) and torch.equal(swapped[1][0], checker(8, 1))
    with pytest.raises(ValueError, match="phase has shape"):
        checkerboard_masking(3, (8, 8), 1, torch.tensor([0, 1]))


def test_masking_hides_pixels():
    model = micro_symmim().eval()
    images = torch.randn(2, 3, 32, 32)
    online = checker(8, 1).expand(2, -1)
    pixel_mask = online.view(2, 8, 8).repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1)
    with torch.no_grad():
        reference = model.encode_masked(images, online)
        assert torch.equal(reference, model.encode_masked(images + 3 * pixel_mask * torch.randn_like(images), online))
        changed = images.clone()
        changed[:, :, 0:4, 4:8] += 1.0  # patch (0, 1): odd i + j is masked in M1; patch (0, 0) is visible
        assert torch.equal(reference, model.encode_masked(changed, online))
        changed[:, :, 0:4, 0:4] += 1.0
        assert not torch.allclose(reference, model.encode_masked(changed, online))


# ------------------------------------------------------------------------------------------------------- losses

def test_info_nce_by_hand():
    eye2, eye4 = torch.eye(2), torch.eye(4)
    assert info_nce(eye2, eye2, 0.2).item() == pytest.approx(0.0067153, abs=1e-7)
    assert info_nce(eye4, eye4, 0.2).item() == pytest.approx(0.0200123, abs=1e-7)
    e1, e2 = eye2
    assert info_nce(torch.stack([e1, e2]), torch.stack([e1, e1]), 0.2).item() == pytest.approx(0.6931472, abs=1e-7)
    assert info_nce(eye2, eye2, 0.2, scale_2tau=True).item() == pytest.approx(0.0026861, abs=1e-7)
    assert info_nce(eye4, eye4, 0.2, scale_2tau=True).item() == pytest.approx(0.0080049, abs=1e-7)
    assert info_nce(torch.stack([e1, e2]), torch.stack([e1, e1]), 0.2, scale_2tau=True).item() == pytest.approx(
        0.2772589, abs=1e-7)
    query, keys = torch.randn(3, 5), torch.randn(7, 5)
    reference = info_nce(query, keys, 0.2, 2).item()
    assert info_nce(7 * query, 0.1 * keys, 0.2, 2).item() == pytest.approx(reference, rel=1e-6)
    cosines = (query / query.norm(dim=1, keepdim=True)) @ (keys / keys.norm(dim=1, keepdim=True)).T
    direct = -torch.log_softmax(cosines / 0.2, dim=1)[torch.arange(3), torch.arange(3) + 2]
    assert info_nce(query, keys, 0.2, 2).item() == pytest.approx(direct.mean().item(), rel=1e-6)


def _gather_worker(rank: int, world: int, port: int, queries: torch.Tensor, keys: torch.Tensor, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    local = slice(rank * 2, rank * 2 + 2)
    gathered, offset = gather_keys(keys[local])
    out[rank] = (offset, torch.equal(gathered, keys), info_nce(queries[local], gathered, 0.2, offset).item())
    dist.destroy_process_group()


def test_keys_gathered_over_two_gloo_ranks_with_labels_offset_by_rank():
    queries, keys = torch.randn(4, 8), torch.randn(4, 8)
    out = mp.Manager().dict()
    port = 29400 + os.getpid() % 500
    mp.spawn(_gather_worker, args=(2, port, queries, keys, out), nprocs=2)
    assert [out[0][0], out[1][0]] == [0, 2] and out[0][1] and out[1][1]
    # each rank's loss is its half of the full-batch InfoNCE; their mean is the full one
    full = info_nce(queries, keys, 0.2).item()
    assert (out[0][2] + out[1][2]) / 2 == pytest.approx(full, rel=1e-6)
    assert out[0][2] == pytest.approx(info_nce(queries[:2], keys, 0.2, 0).item(), rel=1e-6)


def test_shapes_and_gradients():
    model = micro_symmim()
    images = torch.randn(4, 3, 32, 32)
    losses = model.compute_losses(images)
    assert set(losses) == {"mim", "con"}
    tokens = model.encode_masked(images, model.masks(4, images.device)[0])
    assert tokens.shape == (4, 65, 128) and model.predict_pixels(tokens).shape == (4, 64, 48)
    query = model.predictor(model.projector(model.embedding_tokens(tokens)))
    key = model.momentum_key(images, model.masks(4, images.device)[1])
    assert query.shape == key.shape == (4, 16) and not key.requires_grad
    (losses["mim"] + losses["con"]).backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    for name in ("backbone", "head", "projector", "predictor"):
        grads = [p.grad for p in getattr(model, name).parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), name
        assert any(g.abs().sum() > 0 for g in grads), name
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0


def test_loss_weights_and_options():
    model = micro_symmim()
    assert model.loss_weights == {"mim": 1.0, "con": 1.0}
    images = torch.randn(4, 3, 32, 32)
    for options in (dict(con_level="patch"), dict(con_token="mean"), dict(symmetric=True),
                    dict(recon_loss="norm_pix_mse"), dict(scale_2tau=True)):
        losses = micro_symmim(**options).compute_losses(images)
        assert all(torch.isfinite(value) for value in losses.values()), options
    with pytest.raises(ValueError, match="unknown con_level"):
        micro_symmim(con_level="pixel")
    with pytest.raises(ValueError, match="temperature must be positive"):
        micro_symmim(temperature=0.0)


# ------------------------------------------------------------------------------------------------------- EMA

def test_ema_scope_values_and_schedule():
    model = micro_symmim()
    online = model._teacher_source().state_dict()
    assert all(torch.equal(value, online[name]) for name, value in model.teacher.state_dict().items())
    names = {name for name, _ in model.teacher.named_parameters()}
    assert "mask_token" in names and any(n.startswith("backbone.") for n in names)
    assert any(n.startswith("projector.") for n in names)
    assert not any(n.startswith(("predictor", "head")) for n in names)
    assert model.teacher.training  # MoCo v3: batch statistics in the momentum branch
    for p in model.teacher.parameters():
        p.data.zero_()
    for p in model._teacher_source().parameters():
        p.data.fill_(1.0)
    running_mean = model.teacher.projector[1].running_mean.clone()
    model.update_teacher(0.99)
    assert all(torch.allclose(p, torch.full_like(p, 0.01)) for p in model.teacher.parameters())
    model.update_teacher(0.99)
    model.update_teacher(0.99)
    assert all(torch.allclose(p, torch.full_like(p, 0.029701)) for p in model.teacher.parameters())
    assert torch.equal(model.teacher.projector[1].running_mean, running_mean)  # parameters only
    model.update_teacher(0.5, skipped=torch.tensor(1.0))
    assert all(torch.allclose(p, torch.full_like(p, 0.029701)) for p in model.teacher.parameters())
    assert cosine_momentum(0, 100, 0.99) == 0.99 and cosine_momentum(50, 100, 0.99) == pytest.approx(0.995)
    assert cosine_momentum(100, 100, 0.99) == 1.0


def test_lightning_run_updates_the_teacher_after_each_step_with_the_schedule():
    model = micro_symmim(img_size=16, optim=dict(lr=1e-3, warmup_steps=1))
    data = MIMDataModule(source="synthetic", synthetic_size=32, synthetic_image_size=16, batch_size=8,
                         num_workers=0, persistent_workers=False, knn_bank_size=8, val_subset=8)
    seen = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(trainer.callback_metrics["train/teacher_momentum"].item())

    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, max_steps=4,
                        log_every_n_steps=1, callbacks=[Record()])
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    trainer.fit(model, datamodule=data)
    assert seen == pytest.approx([cosine_momentum(step, 4, 0.99) for step in range(4)])
    assert not torch.equal(before["backbone.blocks.0.attn.qkv.weight"],
                           model.teacher.state_dict()["backbone.blocks.0.attn.qkv.weight"])
    assert model.teacher.training


def test_mask_token_not_decayed_as_the_spec_lists():
    model = micro_symmim()
    decayed = {id(p) for group in model.parameter_groups() if group["weight_decay"] > 0 for p in group["params"]}
    assert id(model.mask_token) not in decayed and id(model.backbone.blocks[0].attn.qkv.weight) in decayed
    assert model.optim_config.no_weight_decay == ("mask_token", "backbone.cls_token", "backbone.pos_embed")


def test_vit_b16_shapes():
    model = SymMIM(backbone=dict(size="base", img_size=224, patch_size=16, pos_embed="learned", init="timm"))
    images = torch.randn(2, 3, 224, 224)
    online, momentum = model.masks(2, images.device)
    assert online.sum(1).tolist() == [98.0, 98.0] and momentum.sum(1).tolist() == [96.0, 96.0]
    with torch.no_grad():
        tokens = model.encode_masked(images, online)
        query = model.predictor(model.projector(model.embedding_tokens(tokens)))
        key = model.momentum_key(images, momentum)
    assert tokens.shape == (2, 197, 768) and model.predict_pixels(tokens).shape == (2, 196, 768)
    assert query.shape == key.shape == (2, 256)
