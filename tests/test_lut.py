"""LUT: the unit tests of the spec (methods/lut.md, 5.2) that apply, and Lightning runs of the teacher and its EMA."""
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image, ImageFilter
from torchvision.transforms import v2

from lightning_mim.cli import run_cli
from lightning_mim.data import MIMDataModule
from lightning_mim.heads import ProjectionMLP
from lightning_mim.losses import byol_loss
from lightning_mim.masking import gather_tokens, paired_disjoint_masking, random_masking
from lightning_mim.methods import LUT
from lightning_mim.methods.base import cosine_momentum
from lightning_mim.methods.lut import LUTViews, RandomGaussianBlur, broader_context_loss

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "lut").glob("*.yaml"))


def micro_lut(img_size: int = 16, **kwargs) -> LUT:
    kwargs.setdefault("optim", dict(lr=1e-3, warmup_steps=1))
    return LUT(backbone=dict(size="micro", img_size=img_size, patch_size=4), decoder_dim=32, decoder_depth=1,
               decoder_heads=2, head_hidden_dim=64, **kwargs)


def synthetic_data(size: int = 40, batch_size: int = 8) -> MIMDataModule:
    return MIMDataModule(source="synthetic", synthetic_size=size, synthetic_image_size=16, batch_size=batch_size,
                         num_workers=0, persistent_workers=False, knn_bank_size=8, val_subset=8)


def trainer(**kwargs) -> L.Trainer:
    options = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0)
    return L.Trainer(**{**options, **kwargs})


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


# ------------------------------------------------------------------------------------------------------- masking

def test_paired_masks_are_disjoint_with_49_kept_each():
    noise = torch.rand(3, 196, generator=torch.Generator().manual_seed(0))
    draw = paired_disjoint_masking(3, 196, 0.75, noise=noise)
    assert draw.keep_idx1.shape == draw.keep_idx2.shape == (3, 49)
    assert torch.all((1 - draw.mask1) * (1 - draw.mask2) == 0)
    assert torch.all(draw.mask1.sum(1) == 147) and torch.all(draw.mask2.sum(1) == 147)
    for mask, keep in ((draw.mask1, draw.keep_idx1), (draw.mask2, draw.keep_idx2)):
        assert torch.equal(torch.nonzero(mask == 0)[:, 1].view(3, 49), keep.sort(1).values)
    # the official split: argsort of the noise, first 49 for view 1, next 49 for view 2
    shuffle = torch.argsort(noise, dim=1)
    assert torch.equal(draw.keep_idx1, shuffle[:, :49]) and torch.equal(draw.keep_idx2, shuffle[:, 49:98])
    assert torch.equal(draw.mask1, random_masking(3, 196, 0.75, noise=noise).mask)
    assert torch.equal(torch.gather(draw.shuffle_idx, 1, draw.restore_idx), torch.arange(196).expand(3, -1))
    marker = torch.arange(196.0).view(1, 196, 1).expand(3, -1, 2)
    unshuffled = gather_tokens(gather_tokens(marker, draw.shuffle_idx), draw.restore_idx)
    assert torch.equal(unshuffled, marker)
    assert torch.equal(paired_disjoint_masking(3, 196, 0.75, noise=noise).mask2, draw.mask2)


def test_paired_masking_rejects_ratio_below_half():
    with pytest.raises(ValueError, match="mask_ratio >= 0.5"):
        paired_disjoint_masking(2, 196, 0.4)
    with pytest.raises(ValueError, match="mask_ratio >= 0.5"):
        micro_lut(mask_ratio=0.4)
    draw = paired_disjoint_masking(2, 196, 0.5)
    assert torch.all((1 - draw.mask1) * (1 - draw.mask2) == 0) and draw.keep_idx2.shape == (2, 98)


# ----------------------------------------------------------------------------------------------------------- L_BC

def test_bc_loss_hand_computed_cross_view():
    p1, p2 = torch.tensor([[1.0, 0.0]], requires_grad=True), torch.tensor([[0.0, 1.0]], requires_grad=True)
    z1, z2 = torch.tensor([[1.0, 0.0]], requires_grad=True), torch.tensor([[0.0, 1.0]], requires_grad=True)
    loss = broader_context_loss(p1, p2, z1, z2)
    assert loss.item() == pytest.approx(2.0)
    assert 0.5 * (byol_loss(p1, z1) + byol_loss(p2, z2)).item() == pytest.approx(0.0)  # same-view pairing
    assert broader_context_loss(5 * p1, 5 * p2, z1, z2).item() == pytest.approx(2.0)
    loss.backward()
    assert z1.grad is None and z2.grad is None


def test_bc_gradient_is_orthogonal_to_the_prediction():
    p = torch.randn(6, 16, requires_grad=True)
    byol_loss(p, torch.randn(6, 16)).backward()
    assert torch.allclose((p.grad * p).sum(-1), torch.zeros(6), atol=1e-6)


# ---------------------------------------------------------------------------------------------------------- heads

def test_heads_structure_and_parameter_count_at_vit_b():
    head = ProjectionMLP(768, 4096, 768)
    assert [type(m) for m in head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert head[0].bias is None and head[3].bias is None
    assert sum(p.numel() for p in head.parameters()) == 6_299_648


def test_head_batchnorm_sees_each_view_separately():
    torch.manual_seed(0)
    model = micro_lut().train()
    views, noise = (torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)), torch.rand(4, 16)
    out = model.forward_student(*views, noise)
    draw = paired_disjoint_masking(4, 16, 0.75, noise=noise)
    with torch.no_grad():
        pooled = [model.backbone.forward_kept(v, k)[:, 1:].mean(1) for v, k in zip(views, draw[:2])]
        hidden = [model.projector[0](s) for s in pooled]
    sequential = 0.1 * (0.9 * hidden[0].mean(0) + hidden[1].mean(0))
    assert torch.allclose(model.projector[1].running_mean, sequential, atol=1e-6)
    assert not torch.allclose(model.projector[1].running_mean, 0.1 * torch.cat(hidden).mean(0), atol=1e-4)
    assert int(model.predictor[1].num_batches_tracked) == 2 and out.prediction1.shape == (4, 128)


# ----------------------------------------------------------------------------------------------------- the teacher

def test_teacher_is_a_frozen_eval_copy_of_encoder_and_projector():
    model = micro_lut()
    assert set(model.teacher) == {"backbone", "projector"}
    assert all(not p.requires_grad for p in model.teacher.parameters())
    teacher_state = model.teacher.state_dict()
    for key, value in model.state_dict().items():
        if key.startswith(("backbone.", "projector.")):
            assert torch.equal(teacher_state[key], value), key
    model.train()
    assert model.backbone.training and not any(m.training for m in model.teacher.modules())
    model.teacher.projector.train()
    with pytest.raises(RuntimeError, match="eval mode"):
        model.training_step(((torch.randn(2, 3, 16, 16),) * 2, None), 0)


def test_teacher_output_is_per_sample_and_gets_no_grad():
    torch.manual_seed(0)
    model = micro_lut().train()
    views = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)]
    z1, z2 = model.forward_teacher(*views)
    changed = [v.clone() for v in views]
    changed[0][1:] = torch.randn(3, 3, 16, 16)
    changed[1][1:] = torch.randn(3, 3, 16, 16)
    y1, y2 = model.forward_teacher(*changed)
    assert torch.allclose(z1[0], y1[0], atol=1e-6) and torch.allclose(z2[0], y2[0], atol=1e-6)
    losses = model.compute_losses(views)
    model.weighted_total(losses).backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert model.predictor[0].weight.grad is not None and model.projector[3].weight.grad is not None
    model.zero_grad()
    model.compute_losses(views)["bc"].backward()  # L_BC alone reaches the encoder via the visible tokens
    assert model.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_sync_batchnorm_conversion_keeps_the_teacher_frozen_in_eval():
    model = nn.SyncBatchNorm.convert_sync_batchnorm(micro_lut())
    assert isinstance(model.teacher.projector[1], nn.SyncBatchNorm) and not model.teacher.projector[1].training
    assert isinstance(model.projector[1], nn.SyncBatchNorm)
    assert all(not p.requires_grad for p in model.teacher.parameters())


class TeacherProbe(L.Callback):
    """Records the teacher's mode in every training batch and after validation; replays the EMA by hand."""

    def __init__(self, model: LUT, base: float) -> None:
        self.base, self.expected = base, {k: v.double() for k, v in state(model.teacher).items()}
        self.modes, self.momenta, self.last_step = [], [], 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.modes.append(("train", trainer.current_epoch, pl_module.teacher.training, pl_module.backbone.training))

    def on_validation_end(self, trainer, pl_module):
        self.modes.append(("val", trainer.current_epoch, pl_module.teacher.training, None))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.last_step:
            return
        self.last_step = trainer.global_step
        index = trainer.current_epoch * trainer.num_training_batches + batch_idx
        m = cosine_momentum(index, trainer.max_epochs * trainer.num_training_batches, self.base)
        self.momenta.append((index, m))
        student = {**pl_module.backbone.state_dict(prefix="backbone."),
                   **pl_module.projector.state_dict(prefix="projector.")}
        for key, value in student.items():
            self.expected[key] = m * self.expected[key] + (1 - m) * value.double()
            if not value.is_floating_point():
                self.expected[key] = self.expected[key].trunc()


def test_lightning_run_teacher_stays_eval_and_follows_hand_rolled_ema():
    torch.manual_seed(0)
    model = micro_lut(momentum_base=0.5)  # a low momentum so that every update shows
    probe = TeacherProbe(model, 0.5)
    run = trainer(max_epochs=2, accumulate_grad_batches=2, callbacks=[probe])
    run.fit(model, datamodule=synthetic_data(size=40))  # 5 batches per epoch: Lightning steps after 2, 4 and 5
    assert [i for i, _ in probe.momenta] == [1, 3, 4, 6, 8, 9] and run.global_step == 6
    assert model.momentum_horizon() == 10
    assert {epoch for kind, epoch, _, _ in probe.modes if kind == "train"} == {0, 1}
    assert any(kind == "val" for kind, *_ in probe.modes)
    assert all(teacher is False for _, _, teacher, _ in probe.modes)
    assert all(student for kind, _, _, student in probe.modes if kind == "train")
    assert not model.teacher.training
    final = model.teacher.state_dict()
    for key, value in probe.expected.items():
        assert torch.allclose(final[key].double(), value, atol=1e-5), key
    assert int(final["projector.1.num_batches_tracked"]) > 0  # BN buffers are EMA'd from the student


class LeaveDecoderInEval(L.Callback):
    """A user's own choice: a module the method trains left in eval mode."""

    def on_fit_start(self, trainer, pl_module):
        pl_module.decoder.eval()


@pytest.mark.parametrize("callbacks,warned", [([], False), ([LeaveDecoderInEval()], True)],
                         ids=["teacher_only", "own_module_too"])
def test_eval_mode_warning_is_silenced_for_the_teacher_alone(callbacks, warned):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=1, limit_val_batches=0, callbacks=callbacks).fit(micro_lut(), datamodule=synthetic_data(16))
    eval_mode = [str(warning.message) for warning in caught if "module(s) in eval mode" in str(warning.message)]
    assert bool(eval_mode) == warned, eval_mode


def test_momentum_schedule_values():
    model = micro_lut()

    def momentum(step: int) -> float:
        return cosine_momentum(step, 1000, model.momentum_base, model.momentum_final)

    assert momentum(0) == pytest.approx(0.996) and momentum(500) == pytest.approx(0.998)
    assert 0.99999 < momentum(999) < 1.0


def test_checkpoint_holds_the_updated_teacher(tmp_path):
    torch.manual_seed(0)
    model = micro_lut(momentum_base=0.5)
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    run = trainer(max_steps=3, callbacks=[saver], enable_checkpointing=True)
    run.fit(model, datamodule=synthetic_data(size=32))
    assert model.momentum_horizon() == 3
    (path,) = tmp_path.glob("*.ckpt")
    saved = torch.load(path, weights_only=True)["state_dict"]
    for key, value in model.teacher.state_dict(prefix="teacher.").items():
        assert torch.equal(saved[key], value), key  # saved after, not before, the step's EMA update
    restored = LUT.load_from_checkpoint(path, weights_only=True)
    assert not restored.teacher.training
    assert torch.equal(restored.teacher.projector[1].running_mean, model.teacher.projector[1].running_mean)
    assert not torch.equal(restored.teacher.projector[0].weight, micro_lut().teacher.projector[0].weight)


# -------------------------------------------------------------------------------------------- optimiser and shapes

def test_weight_decay_groups():
    model = micro_lut()
    no_decay, decay = model.parameter_groups()
    names = {id(p): n for n, p in model.named_parameters()}
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert {"backbone.cls_token", "decoder.mask_token", "projector.0.weight", "predictor.3.weight"} <= decay_names
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert {"projector.1.weight", "projector.1.bias", "backbone.norm.weight", "decoder.embed.bias"} <= no_decay_names
    assert not any(n.startswith("teacher.") or "pos_embed" in n for n in decay_names | no_decay_names)
    assert micro_lut(optim=None).optim_config.peak_lr(4096) == pytest.approx(2.4e-3)  # base_lr * sqrt(4096) / 4
    assert LUT.default_loss_weights == {"mim": 1.0, "bc": 0.25}


def test_shapes_and_parameter_count_at_vit_b16_224():
    with torch.device("meta"):  # shapes only: a real ViT-B forward takes seconds on the CPU
        model = LUT()
        views = torch.empty(4, 3, 224, 224), torch.empty(4, 3, 224, 224)
        out = model.forward_student(*views)
        targets = model.forward_teacher(*views)
        teacher_latent = model.teacher.backbone.forward_full(views[0])
    assert out.pred.shape == (4, 196, 768) and out.mask.shape == (4, 196)
    assert out.latent1.shape == out.latent2.shape == (4, 50, 768)
    assert torch.cat([out.prediction1, out.prediction2]).shape == (8, 768)
    assert torch.cat(targets).shape == (8, 768) and teacher_latent.shape == (4, 197, 768)
    # the official total counts the decoder's frozen sin-cos table as a parameter; here it is a buffer
    student = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("teacher."))
    assert student + model.decoder.pos_embed.numel() == 124_507_136


# ------------------------------------------------------------------------------------------------ views and demo

def test_two_views_for_rgb_and_grey_images():
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    grey = Image.fromarray(np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8))
    for image, size, stats in ((rgb, 32, (0.5,) * 3), (grey, 28, (0.5,))):
        views = LUTViews(size, stats, stats)
        for _ in range(12):
            view1, view2 = views(image)
            assert view1.shape == view2.shape == (len(stats), size, size) and view1.dtype == torch.float32
    constant = Image.new("RGB", (48, 40), (200, 60, 10))
    view1, _ = LUTViews(32, (0.0,) * 3, (1.0,) * 3)(constant)  # view 1 has no colour augmentation
    assert torch.allclose(view1, torch.tensor([200, 60, 10]).view(3, 1, 1) / 255, atol=1 / 255)
    jitter, choice = LUTViews(32, (0.5,) * 3, (0.5,) * 3).view2.transforms[1:3]
    assert jitter.p == 0.8 and jitter.transforms[0].saturation == (0.8, 1.2) and jitter.transforms[0].hue == (-0.1, 0.1)
    assert choice.p == [1 / 3] * 3 and choice.transforms[1].threshold == 128 and choice.transforms[1].p == 1.0
    assert np.array_equal(np.asarray(choice.transforms[1](Image.new("L", (1, 2), 128))), [[127], [127]])
    blurred = RandomGaussianBlur()(rgb, radius=1.5)
    assert np.array_equal(np.asarray(blurred), np.asarray(rgb.filter(ImageFilter.GaussianBlur(1.5))))


def test_views_resized_once_equal_views_resized_each():
    """The paper's pipeline resizes inside each view; the resize draws nothing at random, so doing it once for both
    views gives the same outputs for the same random draws."""
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (60, 90, 3), dtype=np.uint8))
    views = LUTViews(32, (0.5,) * 3, (0.25,) * 3)
    resize = v2.Resize(32, interpolation=v2.InterpolationMode.BICUBIC)
    per_view = (v2.Compose([resize, views.view1]), v2.Compose([resize, views.view2]))
    for seed in range(8):
        torch.manual_seed(seed)
        shared = views(image)
        torch.manual_seed(seed)
        separate = (per_view[0](image), per_view[1](image))
        assert all(torch.equal(a, b) for a, b in zip(shared, separate))


def test_validation_reconstruction_and_features():
    model = micro_lut().eval()
    images = torch.randn(2, 3, 16, 16)
    first, second = model.validation_views(images)
    assert first is images and second is images
    assert set(model.compute_losses(model.validation_views(images))) == {"mim", "bc"}
    assert set(model.reconstruct(images)) == {"input", "masked", "reconstruction"}
    assert model.extract_features(images).shape == (2, 128)
    assert "head" not in dict(model.named_children())
    again = type(model)(**model.hparams)
    assert again.optim_config == model.optim_config and again.loss_weights == model.loss_weights


def test_loss_decreases_when_overfitting_a_batch():
    torch.manual_seed(0)
    model = micro_lut(img_size=32).train()
    views = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    noise = torch.rand(8, 64)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    totals = []
    for _ in range(30):
        loss = model.weighted_total(model.compute_losses(views, noise))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.update_teacher(0.99)
        totals.append(loss.item())
    assert totals[-1] < 0.6 * totals[0]


@pytest.mark.parametrize("recipe", CONFIGS, ids=lambda p: p.stem)
def test_recipes_parse_with_the_paper_values(recipe, capsys):
    with pytest.raises(SystemExit):
        run_cli(["fit", "--config", str(recipe), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    args = printed["model"]["init_args"]
    assert printed["model"]["class_path"] == "lightning_mim.methods.LUT"
    assert args["loss_weights"] == {"mim": 1.0, "bc": 0.25} and args["mask_ratio"] == 0.75 and args["norm_pix_loss"]
    assert (args["momentum_base"], args["momentum_final"]) == (0.996, 1.0)
    assert printed["trainer"]["gradient_clip_val"] is None
    assert printed["data"]["augment_on"] == "device" and printed["data"]["decode_on"] == "loader"
    if "demo" not in recipe.stem:
        assert args["optim"]["lr_scaling"] == "sqrt" and args["optim"]["lr_reference_batch"] == 16
        assert printed["data"]["batch_size"] * 8 * printed["trainer"]["accumulate_grad_batches"] == 4096
        assert printed["trainer"]["sync_batchnorm"] is True and args["head_hidden_dim"] == 4096


def test_cli_fit_logs_the_shared_tags(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cli = run_cli([
        "fit", "--model", "LUT", "--model.backbone.size", "micro", "--model.backbone.img_size", "16",
        "--model.backbone.patch_size", "4", "--model.decoder_dim", "32", "--model.decoder_depth", "1",
        "--model.decoder_heads", "2", "--model.head_hidden_dim", "64", "--model.optim.lr", "2e-3",
        "--model.optim.warmup_steps", "2", "--data.source", "synthetic", "--data.synthetic_image_size", "16",
        "--data.synthetic_size", "128", "--data.batch_size", "16", "--data.num_workers", "0",
        "--data.knn_bank_size", "64", "--data.val_subset", "32", "--trainer.accelerator", "cpu",
        "--trainer.devices", "1", "--trainer.max_epochs", "2", "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger.class_path", "lightning.pytorch.loggers.TensorBoardLogger",
        "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert cli.trainer.global_step == 16 and not cli.model.teacher.training
    events = EventAccumulator(cli.trainer.logger.log_dir, size_guidance={"scalars": 0, "images": 0}).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train_pixel/loss_mim", "train_feature/loss_bc", "train/lr", "train/teacher_momentum",
            "val/loss", "val_feature/loss_bc", "val/knn_top1"} <= tags
    assert "val/reconstruction" in events.Tags()["images"]
    momenta = [event.value for event in events.Scalars("train/teacher_momentum")]
    assert momenta[0] == pytest.approx(0.996) and all(b >= a for a, b in zip(momenta, momenta[1:]))
