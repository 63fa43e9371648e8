"""Transfer: fine-tuning on any ImageFolder (head sized from its training classes, a val/ with other classes refused,
one working folder per set), the transfer recipes (the ImageNet recipes' values, stated as fallbacks), and the
paper-scale transfer stages of `reproduce` (dry-run commands, batch pinning, reused pre-trainings, table columns)."""
from __future__ import annotations

import csv
import shlex
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import yaml
from PIL import Image
from test_eval_evaluate import RECIPE
from test_reproduce import make
from test_reproduce_verdicts import cells

from lightning_mim.cli import main as cli_main
from lightning_mim.data import MIMDataModule
from lightning_mim.eval.evaluate import CONFIG_DIR, main as evaluate
from lightning_mim.reproduce import plan as plan_module
from lightning_mim.reproduce.driver import main as reproduce, plan_paper
from lightning_mim.reproduce.papers import PAPERS
from lightning_mim.reproduce.presets import ReproduceError, Setup
from lightning_mim.reproduce.results import by_row, collect
from lightning_mim.reproduce.state import State
from lightning_mim.reproduce.tables import write_tables
from lightning_mim.reproduce.transfer import TRANSFER_RECIPES, add_transfer, parse_transfer_data


def image_folder(root: Path, classes: dict[str, tuple[str, ...]], per_class: int = 4) -> Path:
    """root/<split>/<class>/<i>.png: random 32-px RGB images, `classes` maps each split to its class folders."""
    rng = np.random.default_rng(0)
    for split, names in classes.items():
        for name in names:
            (root / split / name).mkdir(parents=True)
            for index in range(per_class * (2 if split == "train" else 1)):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{index}.png")
    return root


class HeadSize(L.Callback):
    """Records the fine-tuned classifier's output size and its Mixup target size when training starts."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seen.append((pl_module.model.head.out_features, pl_module.mixup_fn.num_classes))


def test_finetune_on_any_imagefolder_sizes_the_head_from_its_training_classes(tmp_path):
    recipe = tmp_path / "mae_micro.yaml"
    recipe.write_text(RECIPE)  # a 16-px colour micro encoder
    three = image_folder(tmp_path / "three", {split: ("ant", "bee", "cat") for split in ("train", "val")})
    two = image_folder(tmp_path / "two", {split: ("dog", "eel") for split in ("train", "val")})
    heads = HeadSize()
    with_mixup = tmp_path / "finetune_mixup.yaml"  # the demo recipe with MAE's Mixup / CutMix, whose targets it sizes
    settings = yaml.safe_load((CONFIG_DIR / "eval" / "finetune_demo_fmnist.yaml").read_text())
    settings["model"] |= {"mixup": 0.8, "cutmix": 1.0}
    with_mixup.write_text(yaml.safe_dump(settings))
    common = ["--ckpt", f"random:{recipe}", "--data-source", "imagefolder", "--batch-size", "8", "--epochs", "1",
              "--num-workers", "0", "--accelerator", "cpu", "--results", str(tmp_path / "results"),
              "--finetune-config", str(with_mixup)]
    rows = evaluate([*common, "--protocols", "knn,finetune", "--data-dir", str(three)], callbacks=[heads])
    assert heads.seen == [(3, 3)]
    assert [(row["protocol"], row["val_images"], row["top5"]) for row in rows] == [
        ("knn", 12, ""), ("finetune", 12, "100.00")]  # 3 classes: no k-NN top-5, fine-tune top-k over all 3
    # the same encoder and recipe on another set: its own working folder (not the first set's result), its own head
    rows = evaluate([*common, "--protocols", "finetune", "--data-dir", str(two)], callbacks=[heads])
    assert heads.seen == [(3, 3), (2, 2)] and rows[0]["val_images"] == 8
    assert len(list((tmp_path / "results" / "eval" / "random_mae_micro").iterdir())) == 2


def test_a_val_folder_with_other_classes_is_refused_in_one_line(tmp_path, capsys):
    data = image_folder(tmp_path, {"train": ("ant", "bee", "cat"), "val": ("ant", "bee", "dog")}, per_class=1)
    with pytest.raises(ValueError, match=r"3 in train/, 3 in val/; only in train/: cat; only in val/: dog\): give "
                                         r"both splits the same class folders"):
        MIMDataModule(source="imagefolder", data_dir=str(data), num_workers=0).setup("fit")
    # a class without val images: its empty val/ folder keeps the labels of the classes after it
    (data / "val" / "dog").rename(data / "val" / "cat")
    for image in (data / "val" / "bee").iterdir():
        image.unlink()
    datamodule = MIMDataModule(source="imagefolder", data_dir=str(data), num_workers=0)
    datamodule.setup("fit")
    val = datamodule._source.val
    assert datamodule.num_classes == 3 and [val[index][1] for index in range(len(val))] == [0, 2]
    (data / "val" / "cat").rename(data / "val" / "dog")
    recipe = tmp_path / "mae_micro.yaml"
    recipe.write_text(RECIPE)
    with pytest.raises(SystemExit):
        cli_main(["evaluate", "--ckpt", f"random:{recipe}", "--protocols", "finetune", "--data-source",
                  "imagefolder", "--data-dir", str(data), "--accelerator", "cpu", "--results", str(tmp_path / "r")])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lightning-mim: error: ")]
    assert len(errors) == 1 and "only in train/: cat; only in val/: dog" in errors[0]


@pytest.mark.parametrize("method", sorted(TRANSFER_RECIPES))
def test_transfer_recipes_are_the_imagenet_recipes_stated_as_fallbacks(method):
    transfer_path = CONFIG_DIR.parent / TRANSFER_RECIPES[method]
    transfer = yaml.safe_load(transfer_path.read_text())
    imagenet = yaml.safe_load((CONFIG_DIR / "eval" / f"finetune_{method.lower()}_vit_b16_in1k.yaml").read_text())
    assert transfer == imagenet  # the spec has no transfer protocol: every value is the stated fallback
    header = transfer_path.read_text()
    assert "unknown in ../shared/methods/*.md" in header and "fallback" in header


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


TRANSFER = "inat2018=/data/inat2018,cub200=/data/cub200"


def test_transfer_stages_follow_each_mae_and_lut_pretraining_at_the_recipes_batch(tmp_path):
    setup = Setup("paper", "/data/imagenet", gpus=4, slurm=True)
    plain = plan_paper(PAPERS["lut"], setup, tmp_path)
    plan = plan_paper(PAPERS["lut"], setup, tmp_path)
    add_transfer(plan, parse_transfer_data(TRANSFER))
    assert all(len(run.stages) == len(before.stages) for run, before in zip(plan.runs, plain.runs)
               if run.reference)  # the reference rows are not fine-tuned
    for run, before in ((run, before) for run, before in zip(plan.runs, plain.runs) if not run.reference):
        # the same pre-training and ImageNet evaluations (same fingerprints: a finished pre-training is reused)
        assert [(stage.key, stage.fingerprint) for stage in run.stages[:len(before.stages)]] == [
            (stage.key, stage.fingerprint) for stage in before.stages]
        added = run.stages[len(before.stages):]
        assert [stage.key for stage in added] == [f"{run.key}/transfer inat2018", f"{run.key}/transfer cub200"]
        assert run.protocols[-2:] == ("transfer_inat2018", "transfer_cub200")
        for stage, (name, folder) in zip(added, (("inat2018", "/data/inat2018"), ("cub200", "/data/cub200"))):
            sbatch = stage.command
            assert sbatch[:2] == ["sbatch", "--parsable"] and option(sbatch, "--ntasks-per-node") == "4"
            command = shlex.split(option(sbatch, "--wrap"))
            recipe = yaml.safe_load((CONFIG_DIR.parent / option(command, "--finetune-config")).read_text())
            assert option(command, "--finetune-config").endswith(TRANSFER_RECIPES[run.method])
            assert (option(command, "--data-dir"), option(command, "--ckpt")) == (folder, str(run.checkpoint))
            assert Path(option(command, "--results")) == tmp_path / "paper" / "transfer" / name
            batch, accumulation = (int(option(command, name)) for name in ("--batch-size", "--accumulate-grad-batches"))
            assert batch * 4 * accumulation == recipe["effective_batch"] == 1024
            assert stage.after == run.pretrain.key
    with pytest.raises(ReproduceError, match="use it with PRESET=paper"):
        add_transfer(plan_paper(PAPERS["lut"], Setup("demo"), tmp_path), parse_transfer_data(TRANSFER))
    for bad in ("inat2018", "iNat=/x", "a=/x,a=/y"):
        with pytest.raises(ReproduceError, match="TRANSFER_DATA"):
            parse_transfer_data(bad)


def test_dry_run_prints_the_transfer_commands_and_make_passes_transfer_data(capsys):
    reproduce(["lut", "--preset", "paper", "--data", "/data/imagenet", "--gpus", "8", "--rows", "mae_vit_b16",
               "--transfer-data", TRANSFER, "--dry-run"])
    lines = [shlex.split(line) for line in capsys.readouterr().out.splitlines()
             if line.startswith("    ") and "--results" in line and "transfer" in line]
    assert [(option(words, "--data-dir"), option(words, "--batch-size"), option(words, "--accumulate-grad-batches"))
            for words in lines] == [("/data/inat2018", "128", "1"), ("/data/cub200", "128", "1")]
    assert all(option(words, "--finetune-config") == "configs/eval/finetune_transfer_mae_vit_b16.yaml"
               for words in lines)
    printed = make("-n", "reproduce-lut", TRANSFER_DATA=TRANSFER)  # -n: the command, not run
    assert printed.returncode == 0 and f"--transfer-data '{TRANSFER}'" in printed.stdout


def test_transfer_columns_beside_maes_reported_numbers(tmp_path, monkeypatch):
    # no checkpoints nor TensorBoard runs here: a run's name is its checkpoint path
    monkeypatch.setattr(plan_module, "run_name", str)
    plan = plan_paper(PAPERS["lut"], Setup("paper", "/data/imagenet"), tmp_path, rows=["mae_vit_b16", "lut_vit_b16"])
    add_transfer(plan, parse_transfer_data(TRANSFER))
    mae, lut = (str(run.checkpoint) for run in plan.runs if not run.reference)
    for folder, lines in ((plan.store, [(mae, "finetune", "83.1"), (lut, "finetune", "83.9")]),
                          (plan.store / "transfer" / "inat2018", [(mae, "finetune", "60.0"), (mae, "finetune", "74.0"),
                                                                  (lut, "finetune", "76.5")]),
                          (plan.store / "transfer" / "cub200", [(lut, "finetune", "85.0")])):
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / "results.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["run", "protocol", "top1"])
            writer.writerows(lines)
    state = State(plan.store / "state.json")
    for run in (run for run in plan.runs if not run.reference):
        state.start(run.pretrain)
        state.finish(run.pretrain, "done", 3600.0)
    rows = by_row(collect(plan, state))
    table = cells(write_tables(plan, rows, with_paper=True).read_text())
    names = ("fine-tune top-1", "iNat 2018 fine-tune top-1", "iNat 2018 fine-tune top-1, paper",
             "cub200 fine-tune top-1", "cub200 fine-tune top-1, paper")
    assert [table["mae_vit_b16"][name] for name in names] == ["83.10", "74.00", "75.4", "missing", "unknown"]
    assert [table["lut_vit_b16"][name] for name in names] == ["83.90", "76.50", "unknown", "85.00", "unknown"]


SHIFT = "imagenet-a=/data/imagenet-a,imagenet-r=/data/imagenet-r"


def test_shift_data_scores_the_fine_tuned_rows_beside_maes_reported_numbers(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(plan_module, "run_name", str)
    setup = Setup("paper", "/data/imagenet", shift=parse_transfer_data(SHIFT, "SHIFT_DATA"))
    plan = plan_paper(PAPERS["lut"], setup, tmp_path, rows=["mae_vit_b16"])
    plain = plan_paper(PAPERS["lut"], Setup("paper", "/data/imagenet"), tmp_path, rows=["mae_vit_b16"])
    mae, before = plan.runs[0], plain.runs[0]
    finetune = next(stage for stage in mae.stages if "/evaluate finetune" in stage.key)
    assert finetune.key == "mae_vit_b16/evaluate finetune,robustness"
    words = finetune.command
    assert option(words, "--corruptions") == "none"
    assert [words[index + 1] for index, word in enumerate(words) if word == "--shift-dir"] == [
        "imagenet-a=/data/imagenet-a", "imagenet-r=/data/imagenet-r"]
    # the same fine-tuning arguments, so evaluate finds the finished fine-tuning and only scores the shift sets
    plain_words = next(stage for stage in before.stages if stage.key.endswith("/evaluate finetune")).command
    assert words[:len(plain_words)] == [word if word != "finetune" else "finetune,robustness"
                                        for word in plain_words]
    assert {"shift-imagenet-a-finetune", "shift-imagenet-r-finetune"} <= set(mae.protocols)
    plan.store.mkdir(parents=True)
    with (plan.store / "results.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["run", "protocol", "top1"])
        writer.writerows([(str(mae.checkpoint), "finetune", "83.2"),
                          (str(mae.checkpoint), "shift-imagenet-a-finetune", "33.0")])
    state = State(plan.store / "state.json")
    state.start(mae.pretrain)
    state.finish(mae.pretrain, "done", 3600.0)
    table = cells(write_tables(plan, by_row(collect(plan, state)), with_paper=True).read_text())["mae_vit_b16"]
    assert [table[name] for name in ("ImageNet-A fine-tune top-1", "ImageNet-A fine-tune top-1, paper",
                                     "ImageNet-R fine-tune top-1", "ImageNet-R fine-tune top-1, paper")] == [
        "33.00", "35.9", "missing", "48.3"]
    with pytest.raises(ReproduceError, match="SHIFT_DATA scores the paper-scale fine-tuned rows"):
        Setup("demo", shift=(("imagenet-a", "/x"),))
    with pytest.raises(SystemExit, match="SHIFT_DATA item 'imagenet-a' is not name=folder"):
        reproduce(["lut", "--preset", "paper", "--data", "/data/imagenet", "--shift-data", "imagenet-a", "--dry-run"])
    printed = make("-n", "reproduce-lut", SHIFT_DATA=SHIFT)
    assert printed.returncode == 0 and f"--shift-data '{SHIFT}'" in printed.stdout
