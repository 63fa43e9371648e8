"""Paper-scale evaluation as the papers ran it: every printed evaluate command scores the whole val split, and the
fine-tuning / linear-probe batch is the recipe's effective batch (with the lr of the recipe's rule at that batch)
whatever GPUS is; a device count that cannot reach it is refused."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from lightning_mim.eval.batch import BatchSplitError, split_batch, trained_batch
from lightning_mim.eval.finetune import FineTune
from lightning_mim.eval.linear import LinearProbe
from lightning_mim.reproduce.driver import plan_compare, plan_paper
from lightning_mim.reproduce.papers import PAPERS
from lightning_mim.reproduce.presets import ReproduceError, Setup, recipe_batch_args

ROOT = Path(__file__).resolve().parents[1]
MICRO = {"size": "micro", "img_size": 16, "patch_size": 4}


def evaluate_commands(setup: Setup) -> list[list[str]]:
    plans = [plan_paper(paper, setup, Path("runs")) for paper in PAPERS.values()] + [plan_compare(setup, Path("runs"))]
    return [stage.command for plan in plans for run in plan.runs for stage in run.stages if "evaluate" in stage.key]


def value(words: list[str], flag: str) -> str:
    return words[words.index(flag) + 1]


def test_paper_scale_evaluations_score_the_whole_val_split():
    commands = evaluate_commands(Setup("paper", data="/data/imagenet", gpus=8, nodes=4))
    assert len(commands) > 20
    for words in commands:
        assert "--val-subset" not in words
        data = yaml.safe_load((ROOT / value(words, "--data-config")).read_text())["data"]
        assert "val_subset" not in data, value(words, "--data-config")
        for flag in ("--linear-config", "--finetune-config"):
            if flag in words:
                recipe = yaml.safe_load((ROOT / value(words, flag)).read_text())
                assert "val_subset" not in (recipe.get("data") or {})
                assert recipe["trainer"]["check_val_every_n_epoch"] == 1  # every epoch scored: top1_best
    for name in ("imagenet_folder.yaml", "imagenet_wds.yaml"):
        assert "val_subset" not in yaml.safe_load((ROOT / "configs" / "data" / name).read_text())["data"]


def peak_lr(recipe_path: str, per_device: int, devices: int, accumulation: int) -> float:
    """The peak lr the module computes in configure_optimizers for this layout (`effective_batch_size`)."""
    recipe = yaml.safe_load((ROOT / recipe_path).read_text())
    module_class = LinearProbe if "linear_" in recipe_path else FineTune
    module = module_class(MICRO, num_classes=10, **recipe["model"])
    trainer = SimpleNamespace(datamodule=SimpleNamespace(batch_size=per_device), world_size=devices,
                              accumulate_grad_batches=accumulation)
    effective = type(module).effective_batch_size(SimpleNamespace(trainer=trainer))
    return module.optim_config.peak_lr(effective)


# recipe -> (effective batch, peak lr the paper states at it)
PINNED = {"configs/eval/finetune_lut_vit_b16_in1k.yaml": (1024, 4e-3),
          "configs/eval/finetune_mae_vit_b16_in1k.yaml": (1024, 2e-3),
          "configs/eval/finetune_symmim_vit_b16_in1k.yaml": (1024, 2e-3),
          "configs/eval/linear_mae_vit_b16_in1k.yaml": (16384, 6.4)}


@pytest.mark.parametrize("gpus", [1, 4, 8])
def test_fine_tuning_batch_and_lr_are_the_recipes_whatever_gpus(gpus):
    layouts = {}
    for words in evaluate_commands(Setup("paper", data="/data/imagenet", gpus=gpus, nodes=2)):
        recipe = next((value(words, flag) for flag in ("--finetune-config", "--linear-config") if flag in words), None)
        if recipe in PINNED:
            layouts[recipe] = (int(value(words, "--batch-size")), int(value(words, "--devices")),
                               int(value(words, "--accumulate-grad-batches")))
    assert set(layouts) == set(PINNED)
    for recipe, (per_device, devices, accumulation) in layouts.items():
        effective, lr = PINNED[recipe]
        assert devices == gpus and per_device * devices * accumulation == effective, recipe
        assert peak_lr(recipe, per_device, devices, accumulation) == pytest.approx(lr), recipe
        # evaluate derives the same layout from the recipe alone, and accepts the printed one
        settings = yaml.safe_load((ROOT / recipe).read_text())
        assert trained_batch(settings, str(gpus), 1, None, None) == (per_device, accumulation)
        assert trained_batch(settings, str(gpus), 1, per_device, accumulation) == (per_device, accumulation)
    lut = layouts["configs/eval/finetune_lut_vit_b16_in1k.yaml"]
    assert lut == {1: (32, 1, 32), 4: (32, 4, 8), 8: (32, 8, 4)}[gpus]  # the recipe's 32 per GPU


def test_a_device_count_that_cannot_reach_the_batch_is_refused():
    with pytest.raises(ReproduceError, match=r"finetune_lut_vit_b16_in1k.yaml: the effective batch 1024 does not "
                                             r"split over 3 devices: use a device count"):
        recipe_batch_args("configs/eval/finetune_lut_vit_b16_in1k.yaml", 3)
    assert split_batch(1024, 128, 16) == (64, 1) and split_batch(1024, 48, 2) == (32, 16)
    with pytest.raises(BatchSplitError):
        split_batch(1000, 128, 16)
    settings = yaml.safe_load((ROOT / "configs/eval/finetune_mae_vit_b16_in1k.yaml").read_text())
    with pytest.raises(ValueError, match="leave --accumulate-grad-batches out"):
        trained_batch(settings, "8", 1, 128, 2)
    with pytest.raises(ValueError, match="give their number"):
        trained_batch(settings, "auto", 1, None, None)
