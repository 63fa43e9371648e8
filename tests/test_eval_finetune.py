"""Fine-tuning (lightning_mim.eval.finetune): layer decay, head init, augmentation, a short training run."""
from __future__ import annotations

import dataclasses
import re

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

from lightning_mim.backbone import BackboneConfig
from lightning_mim.data import MIMDataModule
from lightning_mim.eval.evaluate import CONFIG_DIR
from lightning_mim.eval.finetune import FineTune, layer_decay_param_groups
from lightning_mim.eval.linear import LinearProbe

MICRO = BackboneConfig(size="micro", img_size=16, patch_size=4, in_chans=3)


def mae_layer_id(name: str, depth: int) -> int:
    """MAE / LUT util/lr_decay.py: stem 0, block k -> k + 1, everything else depth + 1."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if match := re.match(r"blocks\.(\d+)\.", name):
        return int(match.group(1)) + 1
    return depth + 1


def test_layer_decay_scales_for_vit_b() -> None:
    with torch.device("meta"):
        model = VisionTransformer(num_classes=1000, global_pool="avg", drop_path_rate=0.1)
    groups = layer_decay_param_groups(model, weight_decay=0.05, layer_decay=0.75)
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    covered = 0
    for group in groups:
        for parameter in group["params"]:
            name = names[id(parameter)]
            assert group["lr_scale"] == pytest.approx(0.75 ** (13 - mae_layer_id(name, 12)), rel=1e-6), name
            no_decay = parameter.ndim <= 1 or name in ("cls_token", "pos_embed")
            assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
            covered += 1
    assert covered == len(names)
    scale = {names[id(p)]: group["lr_scale"] for group in groups for p in group["params"]}
    # the values beyond_masking.md section 6 lists for ViT-B at layer decay 0.75
    assert scale["patch_embed.proj.weight"] == pytest.approx(0.023757, abs=1e-6)
    assert scale["blocks.0.attn.qkv.weight"] == pytest.approx(0.0317, abs=1e-4)
    assert scale["blocks.11.mlp.fc2.bias"] == pytest.approx(0.75)
    assert scale["head.weight"] == scale["fc_norm.weight"] == 1.0


def test_head_init_and_pooling() -> None:
    torch.manual_seed(0)
    model = FineTune({"size": "micro", "img_size": 16, "patch_size": 4}, num_classes=1000)
    head = model.model.head
    assert head.weight.std().item() == pytest.approx(2e-5, rel=0.05)
    assert torch.count_nonzero(head.bias) == 0
    assert isinstance(model.model.norm, torch.nn.Identity) and isinstance(model.model.fc_norm, torch.nn.LayerNorm)
    token = FineTune(MICRO, num_classes=10, global_pool="token")
    assert isinstance(token.model.norm, torch.nn.LayerNorm)


def test_finetune_loss_decreases_without_mixup() -> None:
    torch.manual_seed(0)
    model = FineTune(MICRO, num_classes=4, drop_path_rate=0.0, mixup=0.0, cutmix=0.0, smoothing=0.1)
    assert isinstance(model.criterion, torch.nn.CrossEntropyLoss) and model.mixup_fn is None
    images, labels = torch.randn(16, 3, 16, 16), torch.arange(16) % 4
    optimizer = torch.optim.AdamW(model.model.parameters(), lr=1e-3)
    model.train()
    losses = []
    for _ in range(10):
        loss = model.training_loss(images, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8


def test_finetune_fits_with_mixup_layer_decay_and_ema() -> None:
    L.seed_everything(0, verbose=False)
    data = MIMDataModule(source="synthetic", synthetic_size=64, synthetic_image_size=16, synthetic_classes=6,
                         batch_size=16, num_workers=0, persistent_workers=False, pin_memory=False)
    data.setup("fit")
    model = FineTune(MICRO, num_classes=data.num_classes, layer_decay=0.5, ema_decay=0.9,
                     optim={"lr": 1e-3, "warmup_steps": 2})
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", log_every_n_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=data)
    assert {"val/top1", "val/top5", "val_ema/top1", "train/loss", "train/lr"} <= set(trainer.callback_metrics)
    for group in trainer.optimizers[0].param_groups:
        assert group["initial_lr"] == pytest.approx(1e-3 * group["lr_scale"])
    assert min(group["lr_scale"] for group in trainer.optimizers[0].param_groups) == pytest.approx(0.5 ** 5)
    ema_head, head = model.model_ema.module.head.weight, model.model.head.weight
    assert model.ema_updated_at_step == trainer.global_step == 4 and not torch.equal(ema_head, head)


def test_train_transforms_for_rgb_and_grey() -> None:
    rgb = FineTune(MICRO, num_classes=4).train_transform((0.5,) * 3, (0.5,) * 3)
    assert rgb(Image.new("RGB", (24, 24), (90, 20, 200))).shape == (3, 16, 16)
    grey_config = BackboneConfig(size="micro", img_size=28, patch_size=4, in_chans=1)
    grey = FineTune(grey_config, num_classes=4, re_prob=0.0).train_transform((0.3,), (0.4,))
    as_rgb = FineTune(dataclasses.replace(grey_config, in_chans=3), num_classes=4, re_prob=0.0).train_transform(
        (0.3,) * 3, (0.4,) * 3)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8), mode="L")
    for seed in range(5):
        L.seed_everything(seed, verbose=False)
        out = grey(image)
        L.seed_everything(seed, verbose=False)
        reference = as_rgb(image.convert("RGB"))
        assert out.shape == (1, 28, 28)
        # RandAugment and the bicubic crop keep the three channels of a grey image equal
        assert torch.equal(reference[0], reference[1]) and torch.equal(reference[0], reference[2])
        assert torch.equal(out, reference[:1])


# recipe -> (effective batch, peak lr at that batch, layer decay); None: a linear probe
RECIPES = {
    "finetune_mae_vit_b16_in1k.yaml": (1024, 2e-3, 0.65),
    "finetune_lut_vit_b16_in1k.yaml": (1024, 4e-3, 0.75),
    "finetune_transfer_mae_vit_b16.yaml": (1024, 2e-3, 0.65),
    "finetune_transfer_lut_vit_b16.yaml": (1024, 4e-3, 0.75),
    "finetune_mapet_vit_t16_in1k.yaml": (512, 2.5e-4, 1.0),
    "finetune_mapet_vit_s16_in1k.yaml": (512, 5e-3, 0.65),
    "finetune_mapet_vit_b16_in1k.yaml": (512, 5e-4, 0.65),
    "finetune_beyond_masking_vit_b16_in1k.yaml": (1024, 4e-3, 0.75),
    "finetune_symmim_vit_b16_in1k.yaml": (1024, 2e-3, 0.65),
    "finetune_symmim_vit_l16_in1k.yaml": (1024, 4e-3, 0.75),
    "finetune_simmim_vit_b16_in1k.yaml": (2048, 5e-3, 0.65),
    "finetune_demo_fmnist.yaml": (256, 1e-3, 0.75),
    "linear_mae_vit_b16_in1k.yaml": (16384, 6.4, None),
    "linear_demo_fmnist.yaml": (256, 6.4, None),
}


def test_every_eval_recipe_is_checked() -> None:
    assert {path.name for path in (CONFIG_DIR / "eval").glob("*.yaml")} == set(RECIPES)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_eval_recipes(name: str) -> None:
    batch, peak, decay = RECIPES[name]
    recipe = yaml.safe_load((CONFIG_DIR / "eval" / name).read_text())
    module_class = LinearProbe if name.startswith("linear") else FineTune
    module = module_class(MICRO, num_classes=10, **recipe["model"])
    assert module.optim_config.peak_lr(batch) == pytest.approx(peak)
    assert recipe.get("effective_batch", batch) == batch  # a pinned batch is the one its lr rule is checked at
    if decay is not None:
        assert module.layer_decay == decay


def test_posterize_at_magnitude_ten_gives_black_instead_of_a_pillow_error() -> None:
    from PIL import Image
    from timm.data.auto_augment import RandAugment

    from lightning_mim.eval.finetune import posterize_zero_bits_black

    model = FineTune(backbone=dict(size="micro", img_size=32, patch_size=4), num_classes=10,
                     auto_augment="rand-m10-mstd0-inc1")
    steps = model.train_transform((0.5,) * 3, (0.5,) * 3).transforms
    augment = next(step for step in steps if isinstance(step, RandAugment))
    op = next(op for op in augment.ops if op.name == "PosterizeIncreasing")
    assert op.aug_fn is posterize_zero_bits_black
    op.prob, op.magnitude_std = 1.0, 0.0
    image = Image.new("RGB", (8, 8), (200, 100, 50))
    assert op(image).getextrema() == ((0, 0), (0, 0), (0, 0))


def test_padded_crop_views_are_shifted_flipped_copies_of_the_resized_image() -> None:
    config = BackboneConfig(size="micro", img_size=32, patch_size=4, in_chans=1)
    views = FineTune(config, num_classes=10, auto_augment=None, re_prob=0.0, crop="padded",
                     crop_padding=4).train_transform((0.0,), (1.0,))
    image = Image.fromarray(np.random.default_rng(0).integers(1, 256, (28, 28), dtype=np.uint8), mode="L")
    resized = torch.from_numpy(np.asarray(image.resize((32, 32), Image.BICUBIC), dtype=np.float32) / 255.0)
    padded = torch.nn.functional.pad(resized, (4, 4, 4, 4))  # black border: 0 after Normalize((0,), (1,))
    seen = set()
    for seed in range(12):
        L.seed_everything(seed, verbose=False)
        view = views(image)
        assert view.shape == (1, 32, 32)
        crops = {(top, left, flip): padded[top:top + 32, left:left + 32] for top in range(9) for left in range(9)
                 for flip in (False, True)}
        matches = [key for key, crop in crops.items()
                   if torch.allclose(crop.flip(-1) if key[2] else crop, view[0], atol=1e-6)]
        assert len(matches) == 1, matches
        seen.add(matches[0])
    assert len(seen) > 6  # the offsets and flips are drawn, not fixed


def test_padded_crop_refuses_randaugment() -> None:
    with pytest.raises(ValueError, match="crop 'padded' takes no RandAugment"):
        FineTune(MICRO, num_classes=10, crop="padded")
