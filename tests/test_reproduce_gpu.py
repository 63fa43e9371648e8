"""PRESET=gpu: the demo recipes on one GPU in bf16 at the gpu budgets, three seeds by default, k-NN + logreg + the
small-scale fine-tuning for every row, and the supervised-from-scratch row's evaluation (dry: no GPU needed)."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import yaml

from lightning_mim.cli import main as cli_main
from lightning_mim.reproduce.papers import PAPERS
from lightning_mim.reproduce.plan import ANALYSIS_COLUMNS
from lightning_mim.reproduce.planning import plan_compare, plan_paper
from lightning_mim.reproduce.presets import (
    GPU_FINETUNE_EPOCHS, GPU_ROBUSTNESS_IMAGES, GPU_STEPS, REPO, SMALL_FINETUNE, ReproduceError, Setup, supervised_evaluation,
)

CORE_ROWS = {"mae", "lut", "simmim", "symmim", "beit", "mapet", "bm_zoom_in_masking", "bm_masking"}


def value_after(words: list[str], flag: str) -> str:
    return words[words.index(flag) + 1]


def resolved_trainer(fit_words: list[str]) -> dict:
    """The trainer section `lightning-mim fit <words> --print_config` resolves (parsing only: no GPU needed)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit) as done:
        cli_main([*fit_words, "--print_config"])
    assert done.value.code in (0, None)
    return yaml.safe_load(printed.getvalue())["trainer"]


def test_gpu_compare_pretrains_every_row_on_one_gpu_in_bf16_at_the_gpu_budget(tmp_path: Path) -> None:
    plan = plan_compare(Setup("gpu"), tmp_path)
    assert CORE_ROWS <= {run.key for run in plan.runs}
    for run in (run for run in plan.runs if run.reference is None):
        words = run.pretrain.command[run.pretrain.command.index("fit"):]
        assert value_after(words, "--trainer.max_steps") == str(GPU_STEPS) == "3000"
        assert value_after(words, "--model.backbone.img_size") == "32"
        assert any(word.endswith("configs/trainer/gpu.yaml") for word in words)
        assert run.devices == 1
    mae = next(run for run in plan.runs if run.key == "mae")
    trainer = resolved_trainer(mae.pretrain.command[mae.pretrain.command.index("fit"):])
    assert (trainer["accelerator"], trainer["devices"], trainer["precision"], trainer["max_steps"]) == (
        "gpu", 1, "bf16-mixed", GPU_STEPS)
    assert mae.description == "Fashion-MNIST on one GPU (bf16), 3000 steps"


def test_gpu_rows_are_evaluated_by_knn_logreg_and_the_small_fine_tuning_on_the_gpu(tmp_path: Path) -> None:
    plan = plan_compare(Setup("gpu"), tmp_path)
    for run in (run for run in plan.runs if run.reference is None):
        # robustness scores the classifiers of its own call: k-NN and logreg alone, the fine-tuned model after it
        assert run.protocols == ("knn", "logreg", "robustness-knn", "robustness-logreg", "finetune",
                                 "robustness-finetune", *ANALYSIS_COLUMNS)
        evaluations = [stage for stage in run.stages if "/evaluate " in stage.key]
        assert [stage.key.rsplit(" ", 1)[1] for stage in evaluations] == [
            "knn,logreg", "robustness", "finetune,robustness"]
        for stage in evaluations:
            words = stage.command[stage.command.index("evaluate"):]
            assert (value_after(words, "--accelerator"), value_after(words, "--devices")) == ("gpu", "1")
        for stage in evaluations[1:]:
            assert value_after(stage.command, "--robustness-images") == str(GPU_ROBUSTNESS_IMAGES)
        analyze = run.stages[-1].command
        assert run.stages[-1].key.endswith("/analyze") and value_after(analyze, "--accelerator") == "gpu"
        finetune = evaluations[-1].command
        assert value_after(finetune, "--finetune-epochs") == str(GPU_FINETUNE_EPOCHS) == "30"
        assert Path(value_after(finetune, "--finetune-config")).resolve() == REPO / SMALL_FINETUNE
    recipe = yaml.safe_load((REPO / SMALL_FINETUNE).read_text())
    assert recipe["trainer"]["check_val_every_n_epoch"] == 1  # the curve: every epoch validated


def test_gpu_steps_seeds_and_bad_input(tmp_path: Path) -> None:
    assert (Setup("gpu").default_seeds, Setup("demo").default_seeds, Setup("paper", data="/x").default_seeds) == (
        3, 1, 1)
    assert Setup("gpu", steps=500).demo_steps == 500 and Setup("demo").demo_steps == 300
    with pytest.raises(ReproduceError, match="STEPS sets the demo budget"):
        Setup("paper", data="/data/imagenet", steps=10)
    with pytest.raises(ReproduceError, match="SLURM=1 applies to PRESET=paper only"):
        Setup("gpu", slurm=True)
    with pytest.raises(ReproduceError, match="neither the Fashion-MNIST idx files nor train/ and val/"):
        Setup("gpu", data=str(tmp_path))
    seeded = plan_paper(PAPERS["lut"], Setup("gpu"), tmp_path, seeds=Setup("gpu").default_seeds)
    assert sorted({run.seed for run in seeded.runs}) == [0, 1, 2]


def test_gpu_data_takes_an_image_folder_for_pretraining_and_evaluation(tmp_path: Path) -> None:
    for split in ("train", "val"):
        (tmp_path / "images" / split / "a").mkdir(parents=True)
    data = str(tmp_path / "images")
    run = plan_compare(Setup("gpu", data=data), tmp_path / "out", rows=["mae"]).runs[0]
    fit = run.pretrain.command
    assert (value_after(fit, "--data.source"), value_after(fit, "--data.data_dir")) == ("imagefolder", data)
    for stage in run.stages[1:]:
        assert (value_after(stage.command, "--data-source"), value_after(stage.command, "--data-dir")) == (
            "imagefolder", data)


def test_supervised_row_is_fine_tuned_like_the_rows_on_the_gpu_only(tmp_path: Path) -> None:
    for setup in (Setup("smoke"), Setup("demo"), Setup("paper", data="/data/imagenet")):
        assert supervised_evaluation(setup) is None
    spec = supervised_evaluation(Setup("gpu"))
    row_finetune = plan_compare(Setup("gpu"), tmp_path, rows=["mae"]).runs[0].stages[-2].command
    assert spec.protocols == value_after(row_finetune, "--protocols") == "finetune,robustness" and spec.devices == 1
    # the same recipe, epochs, data and device as the pre-trained rows, plus --adapt-images for the 32-px encoder
    assert list(spec.args[:-1]) == row_finetune[row_finetune.index("--protocols") + 2:]
    assert spec.args[-1] == "--adapt-images"


def test_gpu_dry_run_through_the_driver_runs_three_seeds_and_the_supervised_reference(tmp_path: Path) -> None:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        cli_main(["compare", "--preset", "gpu", "--rows", "mae", "--dry-run", "--out", str(tmp_path)])
    lines = printed.getvalue().splitlines()
    stages = [line.split("  log:")[0].removeprefix("[dry run] ") for line in lines if line.startswith("[dry run]")]
    evaluations = ("evaluate knn,logreg", "evaluate robustness", "evaluate finetune,robustness", "analyze")
    assert stages == [
        *(f"mae{seed}/{stage}" for seed in ("", "/seed1", "/seed2") for stage in ("pretrain", *evaluations)),
        *(f"supervised_mae{seed}/evaluate finetune,robustness" for seed in ("", "/seed1", "/seed2")),
        *(f"mae_random_init{seed}/{stage}" for seed in ("", "/seed1", "/seed2")
          for stage in ("evaluate knn,logreg", "analyze")),
        "pixels/evaluate knn,logreg"]  # once: pixels have no pre-training seed
    supervised = next(lines[index + 1].split() for index, line in enumerate(lines)
                      if line.startswith("[dry run] supervised_mae/seed1/"))
    assert value_after(supervised, "--ckpt").startswith("random:") and value_after(supervised, "--ckpt").endswith(
        "/config.yaml")
    assert value_after(supervised, "--protocols") == "finetune,robustness" and value_after(supervised, "--seed") == "1"
    assert "--adapt-images" in supervised and value_after(supervised, "--accelerator") == "gpu"
    assert any(line.startswith("# PRESET=gpu:") and "curve reached its plateau (Convergence)" in line for line in lines)
