"""`lightning-mim reproduce` / `compare` (lightning_mim.reproduce). The smoke preset runs the LUT paper end to end
(its MAE pre-training found interrupted after 2 of its 6 steps), writes the table with the paper's numbers beside
this run's, and re-running skips every stage; changed configurations rerun only their stages; a failed stage stops
the paper with its log; `make reproduce-lut` at paper scale prints torchrun and sbatch commands at the paper's
effective batch and lr; `compare` runs every method at one image size and plots accuracy against cost."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from lightning_mim.cli import main as cli_main
from lightning_mim.cli import run_cli
from lightning_mim.reliability import safe_load
from lightning_mim.reproduce import driver
from lightning_mim.reproduce.driver import main as reproduce, main_compare as compare, plan_compare, plan_paper
from lightning_mim.reproduce.papers import PAPERS
from lightning_mim.reproduce.presets import Setup
from lightning_mim.reproduce.tables import paper_cell

ROOT = Path(__file__).resolve().parents[1]
SMOKE_STEPS = 6


def table_cells(table: str) -> dict[str, dict[str, str]]:
    """The first Markdown table of a text as {first cell: {column: cell}}."""
    lines = table.splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith("|"))
    end = next((index for index in range(start, len(lines)) if not lines[index].startswith("|")), len(lines))
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines[start:end]
            if not line.startswith("| ---")]
    return {row[0]: dict(zip(rows[0], row)) for row in rows[1:]}


def quiet(function, *args):
    """Run a driver entry point, returning (its result, what it printed)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        result = function(*args)
    return result, printed.getvalue()


@pytest.fixture(scope="module")
def smoke_lut(tmp_path_factory):
    """The LUT paper at smoke scale, after an interrupted MAE pre-training: a run of MAE's exact stage command
    stopped at step 2 left checkpoints/last.ckpt before the driver recorded anything."""
    out = tmp_path_factory.mktemp("reproduce")
    mae = plan_paper(PAPERS["lut"], Setup("smoke"), out).runs[0]
    fit_words = mae.pretrain.command[mae.pretrain.command.index("fit"):]
    quiet(run_cli, [*fit_words, "--trainer.max_steps", "2"])
    interrupted_step = safe_load(mae.checkpoint)["global_step"]
    (plan,), printed = quiet(reproduce, ["lut", "--preset", "smoke", "--out", str(out)])
    return plan, printed, interrupted_step


def test_smoke_preset_runs_the_paper_and_writes_its_table(smoke_lut):
    plan, printed, _ = smoke_lut
    assert [run.key for run in plan.runs] == ["mae", "lut", "mae_random_init", "lut_random_init", "pixels"]
    with (plan.store / "results.csv").open() as handle:
        evaluated = {(row["run"].split("/")[0], row["protocol"]): row["top1"] for row in csv.DictReader(handle)}
    # the reference rows: each row's encoder at its seeded initialisation (its run's saved config) and the raw
    # pixels, through the preset's frozen-feature protocol (smoke: k-NN)
    assert set(evaluated) == {(row, protocol) for row in ("mae", "lut") for protocol in ("knn", "linear")} | {
        ("random:mae", "knn"), ("random:lut", "knn"), ("pixels", "knn")}

    table = (plan.out / "table.md").read_text()
    assert "PRESET=smoke" in table and "NOT paper numbers" in table
    cells = table_cells(table)
    records = json.loads((plan.out / "table.json").read_text())["rows"]
    for row in ("mae", "lut"):
        assert float(cells[row]["k-NN top-1"]) == float(evaluated[(row, "knn")])
        # a one-epoch linear probe has no curve to show a plateau: withheld from the table, kept in table.json
        assert cells[row]["linear top-1"] == "not converged"
        for linear in (record for record in records if (record["row"], record["protocol"]) == (row, "linear")):
            assert linear["top1"] == "not converged" and linear["top1_seeds"] == [float(evaluated[(row, "linear")])]
        assert cells[row]["fine-tune top-1"] == "not run"  # smoke runs no fine-tuning; the paper's numbers stay
        assert float(cells[row]["img/s (training step)"]) > 0
    curves = {record["row"]: record for record in json.loads((plan.out / "table.json").read_text())["convergence"]}
    assert set(curves) == {"mae", "lut"} and curves["mae"]["linear_late_gain"] is None
    assert curves["mae"]["linear_plateau"] is False and curves["mae"]["loss_start"] > 0
    assert "## Convergence" in table and "unknown (under 4 validated epochs)" in table
    for row, name in (("mae_random_init", "random:mae"), ("lut_random_init", "random:lut"), ("pixels", "pixels")):
        assert float(cells[row]["k-NN top-1"]) == float(evaluated[(name, "knn")])
        assert cells[row]["linear top-1"] == "not run" and cells[row]["img/s (training step)"] == "-"
    assert cells["mae"]["k-NN top-1, paper"] == "unknown"
    assert cells["lut"]["linear top-1, paper"] == "ViT-S/16 unknown; ViT-B/16 unknown; ViT-L/16 unknown"
    # the paper's reported numbers, from lut.md section 4: MAE as LUT lists it, LUT's three backbones
    assert cells["mae"]["fine-tune top-1, paper"] == "83.7"
    assert cells["lut"]["fine-tune top-1, paper"] == "ViT-S/16 82.0; ViT-B/16 84.2; ViT-L/16 86.0"
    assert {(record["row"], record["protocol"], record["paper_backbone"], record["paper_top1"])
            for record in records if record["protocol"] == "finetune" and record["paper_backbone"]} == {
        ("mae", "finetune", "ViT-B/16", 83.7), ("lut", "finetune", "ViT-S/16", 82.0),
        ("lut", "finetune", "ViT-B/16", 84.2), ("lut", "finetune", "ViT-L/16", 86.0)}
    with (plan.out / "table.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == len(records) == 3 * (1 + 3) + 3 * 3
    claims = {record["claim"] for record in json.loads((plan.out / "table.json").read_text())["verdicts"]}
    assert {"MAE pre-training > its random init", "LUT pre-training > its random init"} <= claims

    # TensorBoard: one run per row under <out>/<preset>/<row>/<fingerprint>, with the final metrics in the HParams tab
    for run in plan.runs[:2]:
        summaries = {value.tag for events in run.run_dir.glob("events.out.tfevents.*")
                     for event in EventFileLoader(str(events)).Load() for value in event.summary.value}
        assert {"train/loss", "train/throughput_img_s", "reproduce/knn_top1", "reproduce/linear_top1",
                "_hparams_/session_start_info"} <= summaries
        assert "_hparams_/experiment" not in summaries  # it would hide the other runs' hyper-parameters
        assert run.run_dir.parent == plan.store / run.key and plan.out == plan.store / "lut"


def test_interrupted_pretraining_resumes_from_its_last_checkpoint(smoke_lut):
    plan, _, interrupted_step = smoke_lut
    mae = plan.runs[0]
    assert interrupted_step == 2
    assert f"resuming from {mae.checkpoint}" in mae.pretrain.log.read_text().replace(os.getcwd() + "/", "")
    assert safe_load(mae.checkpoint)["global_step"] == SMOKE_STEPS


def test_rerun_skips_every_stage(smoke_lut, monkeypatch):
    plan, _, _ = smoke_lut
    state_before = (plan.store / "state.json").read_text()
    table_before = (plan.out / "table.md").read_text()
    monkeypatch.setattr(driver, "execute", lambda stage, env: pytest.fail(f"{stage.key} ran again"))
    _, printed = quiet(reproduce, ["lut", "--preset", "smoke", "--out", str(plan.out.parents[1])])
    stages = [stage.key for run in plan.runs for stage in run.stages]
    assert re.findall(r"^\[done\] (\S+(?: \S+)?) \(", printed, re.MULTILINE) == stages
    assert (plan.store / "state.json").read_text() == state_before  # nor are the HParams logged twice
    assert (plan.out / "table.md").read_text() == table_before


def dry_run(out: Path, *words: str) -> tuple[list[str], list[str]]:
    """(stages a dry run would run, stages it skips)."""
    _, printed = quiet(reproduce, ["lut", "--preset", "smoke", "--out", str(out), "--dry-run", *words])
    return (re.findall(r"^\[dry run\] (\S+(?: \S+)?)  log", printed, re.MULTILINE),
            re.findall(r"^\[done\] (\S+(?: \S+)?) \(", printed, re.MULTILINE))


def test_changed_configuration_reruns_only_what_it_changes(smoke_lut):
    plan, _, _ = smoke_lut
    out = plan.out.parents[1]
    state_before = (plan.store / "state.json").read_text()
    references = ["mae_random_init/evaluate knn", "lut_random_init/evaluate knn", "pixels/evaluate knn"]
    assert dry_run(out, "--eval-args", "--k 10") == (
        ["mae/evaluate knn,linear", "lut/evaluate knn,linear", *references], ["mae/pretrain", "lut/pretrain"])
    # a new pre-training: its evaluation and its random-init reference (the new run's config) run again, the
    # pixels do not
    assert dry_run(out, "--fit-args", "--trainer.max_steps 7", "--rows", "lut") == (
        ["lut/pretrain", "lut/evaluate knn,linear", "lut_random_init/evaluate knn"], ["pixels/evaluate knn"])
    changed = plan_paper(PAPERS["lut"], Setup("smoke", fit_args=("--trainer.max_steps", "7")), out).runs[1]
    assert changed.run_dir != plan.runs[1].run_dir  # a new run folder: the finished run stays as it is
    assert (plan.store / "state.json").read_text() == state_before  # dry runs write nothing


def test_failed_stage_stops_the_paper_with_its_log_and_keeps_finished_stages(smoke_lut):
    plan, _, _ = smoke_lut
    out = plan.out.parents[1]
    with pytest.raises(SystemExit) as failure:
        quiet(reproduce, ["lut", "--preset", "smoke", "--out", str(out), "--fit-args", "--model.mask_ratio 1.5"])
    message = str(failure.value)
    failed, not_started = plan_paper(PAPERS["lut"], Setup("smoke", fit_args=("--model.mask_ratio", "1.5")),
                                     out).runs[:2]
    assert message.startswith("lightning-mim reproduce: stage mae/pretrain failed (exit 1); its log: ")
    log = Path(message.split("its log: ")[1].split(". ")[0])
    assert log.resolve() == failed.pretrain.log.resolve() and "mask_ratio" in log.read_text()
    state = json.loads((plan.store / "state.json").read_text())
    assert state["mae/pretrain"][failed.pretrain.fingerprint]["status"] == "failed"
    assert not not_started.run_dir.exists() and "lut/pretrain" not in message  # the paper stopped at MAE
    for run in plan.runs:  # the finished stages are as they were
        assert run.reference is not None or run.checkpoint.is_file()
        assert all(state[stage.key][stage.fingerprint]["status"] == "done" for stage in run.stages)


def make(*words: str, **variables: str) -> subprocess.CompletedProcess:
    """`make` of this checkout with the running interpreter's virtualenv, never reinstalling it."""
    venv = Path(sys.executable).parents[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), **variables}
    return subprocess.run(["make", "-s", "-C", str(ROOT), f"VENV={venv}", "-o", f"{venv}/.installed", *words],
                          capture_output=True, text=True, env=env, timeout=300)


def fit_layout(words: list[str]) -> tuple[int, int, float]:
    """(per-device batch, accumulation, lr) from a printed fit command."""
    value = {name: words[words.index(name) + 1] for name in
             ("--data.batch_size", "--trainer.accumulate_grad_batches", "--model.optim.lr")}
    return (int(value["--data.batch_size"]), int(value["--trainer.accumulate_grad_batches"]),
            float(value["--model.optim.lr"]))


def test_paper_dry_run_prints_torchrun_and_sbatch_at_the_papers_batch_and_lr():
    result = make("reproduce-lut", DRY_RUN="1", PRESET="paper", DATA="/data/imagenet", GPUS="8", NODES="4")
    assert result.returncode == 0, result.stderr
    lines = [shlex.split(line) for line in result.stdout.splitlines() if line.startswith("    ") and "#" not in line]
    torchrun = [words for words in lines if any(word.endswith("torchrun_pretrain.sh") for word in words)]
    sbatch = [words for words in lines if words[:1] == ["sbatch"] and "--parsable" in words]
    assert len(torchrun) == len(sbatch) == len(PAPERS["lut"].rows) == 4
    for words in torchrun:
        env = dict(word.split("=", 1) for word in words[:words.index(next(w for w in words if "=" not in w))])
        batch, accumulation, lr = fit_layout(words)
        assert int(env["GPUS_PER_NODE"]) * int(env["NNODES"]) * batch * accumulation == 4096
        assert lr == pytest.approx(2.4e-3)  # LUT: 1.5e-4 x sqrt(4096) / 4; MAE: 1.5e-4 x 4096 / 256
        assert "--config" in words and any("imagenet_folder.yaml" in word for word in words)
    for words in sbatch:
        nodes, tasks = int(words[words.index("--nodes") + 1]), int(words[words.index("--ntasks-per-node") + 1])
        batch, accumulation, lr = fit_layout(words)
        assert (nodes * tasks * batch * accumulation, lr) == (4096, pytest.approx(2.4e-3))
    lut_b16 = next(words for words in torchrun if "lut/vit_b16_1600ep_in1k.yaml" in " ".join(words))
    assert fit_layout(lut_b16)[:2] == (128, 1)  # the recipe's 128 per GPU, 32 GPUs: no accumulation


def test_beyond_masking_dry_run_has_one_row_per_objective_at_batch_2048():
    result = make("reproduce-beyond-masking", DRY_RUN="1", PRESET="paper", DATA="/data/imagenet", GPUS="8", NODES="2")
    assert result.returncode == 0, result.stderr
    lines = [shlex.split(line) for line in result.stdout.splitlines() if line.startswith("    ") and "#" not in line]
    torchrun = [words for words in lines if any(word.endswith("torchrun_pretrain.sh") for word in words)]
    recipes = sorted(word for words in torchrun for word in words if "configs/beyond_masking/" in word)
    assert [Path(recipe).stem for recipe in recipes] == [f"vit_b16_300ep_in1k_{objective}" for objective in (
        "blur", "decolorize", "distortion", "masking", "zoom_in", "zoom_in_masking", "zoom_out")]
    for words in torchrun:
        env = dict(word.split("=", 1) for word in words[:words.index(next(w for w in words if "=" not in w))])
        batch, accumulation, lr = fit_layout(words)
        assert (int(env["GPUS_PER_NODE"]) * int(env["NNODES"]) * batch * accumulation, batch) == (2048, 128)
        assert lr == pytest.approx(1.2e-3)  # 1.5e-4 x 2048 / 256
    plan = plan_paper(PAPERS["beyond_masking"], Setup("demo"), Path("runs"))
    demo = {run.key: run for run in plan.runs if run.reference is None}  # one demo row per objective but
    # de-colourisation (grey data)
    assert list(demo) == [f"bm_{objective}" for objective in (
        "zoom_in_masking", "masking", "zoom_in", "zoom_out", "distortion", "blur")]
    assert [paper_cell(run, "finetune") for run in demo.values()] == ["83.2", "82.9", "82.7", "82.5", "82.1", "81.8"]
    assert any(note.startswith("bm_decolorize: no demo row: Fashion-MNIST is grey") for note in plan.notes)

    def option(run, name: str) -> str:
        return run.pretrain.command[run.pretrain.command.index(name) + 1]

    # the 28-px demo recipes at the demo's 32 px: zoom-in's view 288 / 224 of the crop, zoom-out's image 160 / 224
    assert [option(demo[key], "--model.backbone.img_size") for key in demo] == ["32"] * 6
    assert (option(demo["bm_zoom_in"], "--model.zoom_in_margin"), option(demo["bm_zoom_out"], "--model.zoom_out_size"),
            option(demo["bm_zoom_in_masking"], "--model.zoom_in_margin")) == ("5", "23", "5")
    assert all(option(run, "--trainer.max_steps") == "300" for run in demo.values())


def test_webdataset_data_and_bad_input(tmp_path):
    shards = tmp_path / "in1k-wds"
    shards.mkdir()
    for name in ("train-000000.tar", "train-000001.tar", "train-000002.tar", "val-000000.tar"):
        (shards / name).touch()
    (plan,), printed = quiet(reproduce, ["lut", "--data", str(shards), "--rows", "lut_vit_b16", "--dry-run",
                                         "--out", str(tmp_path / "runs")])
    assert plan.setup.preset == "paper"  # the default when DATA is given
    commands = [shlex.split(line) for line in printed.splitlines() if line.startswith("    ") and "#" not in line]
    train, val = f"{shards}/train-{{000000..000002}}.tar", f"{shards}/val-000000.tar"
    fit = next(words for words in commands if any(word.endswith("torchrun_pretrain.sh") for word in words))
    assert fit[fit.index("--data.train_shards") + 1] == train and fit[fit.index("--data.val_shards") + 1] == val
    assert any(word.endswith("configs/data/imagenet_wds.yaml") for word in fit)
    evaluate = [words for words in commands if "evaluate" in words]  # k-NN + logreg, fine-tuning, random init
    assert len(evaluate) == 3 and all(words[words.index("--train-shards") + 1] == train for words in evaluate)
    assert evaluate[2][evaluate[2].index("--ckpt") + 1].startswith("random:")
    assert not (tmp_path / "runs").exists()

    def error(*words: str) -> str:
        with pytest.raises(SystemExit) as failure:
            quiet(reproduce, ["lut", "--dry-run", "--out", str(tmp_path / "runs"), *words])
        return str(failure.value)

    assert "PRESET=paper needs DATA=" in error("--preset", "paper")
    assert "does not split over 24 GPUs" in error("--data", "/data/imagenet", "--gpus", "8", "--nodes", "3")
    assert "unknown ROWS nope: choose from mae,lut" in error("--rows", "nope")
    assert "SLURM=1 applies to PRESET=paper only" in error("--slurm")


COMPARED = ["mae", "simmim", "lut", "symmim", "beit", "mapet", "bm_zoom_in_masking", "bm_masking", "bm_zoom_in",
            "bm_zoom_out", "bm_distortion", "bm_blur"]


def test_compare_runs_every_method_at_one_image_size_and_plots_cost_against_accuracy(tmp_path):
    _, printed = quiet(cli_main, ["compare", "--preset", "smoke", "--out", str(tmp_path), "--dry-run"])
    assert re.findall(r"^\[dry run\] (\w+)/pretrain", printed, re.MULTILINE) == COMPARED
    plan, _ = quiet(compare, ["--preset", "smoke", "--out", str(tmp_path), "--dry-run"])
    assert [run.method for run in plan.runs if run.reference is None] == [
        "MAE", "SimMIM", "LUT", "SymMIM", "BEiT", "MaPeT", *["BeyondMasking"] * 6]
    assert [run.key for run in plan.runs if run.reference] == [f"{key}_random_init" for key in COMPARED] + ["pixels"]
    methods = [run for run in plan.runs if run.reference is None]
    # after each method's recipe, the same arguments (budget, data, evaluation-free training settings) for all
    after_recipe = {tuple(command[len(command) - command[::-1].index("--config") + 1:
                                  command.index("--model.backbone.img_size")])
                    for command in (run.pretrain.command for run in methods)}
    assert len(after_recipe) == 1 and "--trainer.max_steps" in next(iter(after_recipe))
    assert len({tuple(run.stages[-1].command[run.stages[-1].command.index("--protocols"):])
                for run in methods}) == 1
    assert all(run.pretrain.command[run.pretrain.command.index("--model.backbone.img_size") + 1] == "32"
               for run in methods)
    # a run that a paper's table and compare both hold is one run: same stages, same folder
    demo_compare = {run.key: run for run in plan_compare(Setup("demo"), tmp_path).runs}
    for paper in PAPERS.values():
        for run in plan_paper(paper, Setup("demo"), tmp_path).runs:
            assert [(stage.key, stage.fingerprint) for stage in run.stages] == [
                (stage.key, stage.fingerprint) for stage in demo_compare[run.key].stages]
            assert run.run_dir == demo_compare[run.key].run_dir
    paper_scale = [run for run in plan_compare(Setup("paper", "/data/imagenet"), tmp_path).runs if not run.reference]
    recipes = [[Path(words[index + 1]) for index, word in enumerate(words) if word == "--config"][-1]
               for words in (run.pretrain.command for run in paper_scale)]
    assert [f"{recipe.parent.name}/{recipe.stem}" for recipe in recipes] == [
        "mae/vit_b16_1600ep_in1k", "simmim/vit_b16_800ep_in1k", "lut/vit_b16_1600ep_in1k", "symmim/vit_b16_800ep_in1k",
        "beit/vit_b16_300ep_in1k_vqkd", "mapet/vit_b16_300ep_in1k_vqkd",
        *(f"beyond_masking/vit_b16_300ep_in1k_{key[3:]}" for key in COMPARED[6:])]

    plan, _ = quiet(compare, ["--preset", "smoke", "--out", str(tmp_path), "--rows", "mae"])
    saved = (plan.runs[0].run_dir / "config.yaml").read_text()
    assert "img_size: 32" in saved  # MAE's demo recipe is 28 px; compare runs it at 32
    table = (plan.out / "table.md").read_text()
    assert "32 x 32 px" in table and "NOT paper numbers" in table
    mae = table_cells(table)["mae"]
    assert list(mae)[3:] == ["k-NN top-1", "k-NN std", "k-NN n", "linear top-1", "linear std", "linear n",
                             "img/s (training step)", "pre-train wall-clock h", "devices"]
    assert (mae["k-NN std"], mae["k-NN n"]) == ("-", "1")  # one seed: no spread
    assert 0 <= float(mae["k-NN top-1"]) <= 100 and float(mae["pre-train wall-clock h"]) > 0
    with Image.open(plan.out / "compare.png") as plot:
        assert plot.format == "PNG" and plot.size == (1200, 600)


def test_jobs_run_rows_at_once_and_a_shared_stage_once(tmp_path, monkeypatch):
    """Two token rows at once: the codebook both read is fitted once, before either pre-training; each process gets
    its share of the CPU threads; state.json keeps every row's records."""
    executed: list[tuple[str, str | None]] = []
    lock = threading.Lock()

    def fake_execute(stage, env):
        with lock:
            executed.append((stage.key, env.get("OMP_NUM_THREADS")))
        time.sleep(0.05)
        return 0

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(driver, "execute", fake_execute)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    plan = plan_compare(Setup("smoke"), tmp_path, ["beit", "mapet"])
    quiet(driver.run_plan, plan, False, 2)
    keys = [key for key, _ in executed]
    assert keys.count("tokenizer/fmnist_pixels_4_32_512") == 1 and keys[0] == "tokenizer/fmnist_pixels_4_32_512"
    assert sorted(keys[1:]) == sorted(stage.key for run in plan.runs for stage in run.stages
                                      if not stage.key.startswith("tokenizer/"))
    assert {threads for _, threads in executed} == {"4"}
    state = driver.State(plan.store / "state.json")
    assert all(state.done(stage.key, stage.fingerprint) for run in plan.runs for stage in run.stages)
    with pytest.raises(SystemExit, match="JOBS must be at least 1"):
        quiet(compare, ["--preset", "smoke", "--out", str(tmp_path), "--jobs", "0"])
    with pytest.raises(SystemExit, match="STEPS sets the demo budget"):
        quiet(compare, ["--preset", "smoke", "--out", str(tmp_path), "--steps", "50"])
    demo = plan_compare(Setup("demo", steps=50), tmp_path, ["mae"]).runs[0].pretrain.command
    assert demo[demo.index("--trainer.max_steps") + 1] == "50"


def test_mapet_dry_run_runs_every_row_at_batch_2048_and_fits_the_demo_codebook_first():
    result = make("reproduce-mapet", DRY_RUN="1", PRESET="paper", DATA="/data/imagenet", GPUS="8", NODES="1")
    assert result.returncode == 0, result.stderr
    lines = [shlex.split(line) for line in result.stdout.splitlines() if line.startswith("    ") and "#" not in line]
    torchrun = [words for words in lines if any(word.endswith("torchrun_pretrain.sh") for word in words)]
    recipes = [Path(word).parent.name + "/" + Path(word).stem for words in torchrun for word in words
               if "configs/mapet/" in word or "configs/beit/" in word]
    assert recipes == [f"{method}/vit_{size}16_300ep_in1k_{tokenizer}" for tokenizer in ("vqkd", "kclip")
                       for method, size in (("beit", "b"), ("mapet", "t"), ("mapet", "s"), ("mapet", "b"))]
    for words in torchrun:
        batch, accumulation, lr = fit_layout(words)
        assert (8 * batch * accumulation, batch, lr) == (2048, 256, pytest.approx(1.5e-3))  # absolute lr, no scaling
    demo = [run for run in plan_paper(PAPERS["mapet"], Setup("demo"), Path("runs")).runs if run.reference is None]
    assert [run.key for run in demo] == ["beit", "mapet"]
    for run in demo:  # the shared codebook is fitted before the pre-training that reads it
        fit, pretrain = run.stages[0], run.pretrain
        assert fit.key == "tokenizer/fmnist_pixels_4_32_512"
        assert fit.command[fit.command.index("--input-size") + 1] == "32"
        assert pretrain.command[pretrain.command.index("--model.tokenizer.input_size") + 1] == "32"
        assert fit.command[fit.command.index("tokenizer") + 1] == "fit"
        codebook = fit.command[fit.command.index("fit") + 1]
        assert pretrain.command[pretrain.command.index("--model.tokenizer.path") + 1] == codebook
    assert demo[0].stages[0].fingerprint == demo[1].stages[0].fingerprint
    beit = demo[0].pretrain.command  # 75 of 196 patches in blocks of >= 16 -> 24 of 64 in blocks of >= 5
    assert [beit[beit.index(name) + 1] for name in ("--model.num_masked_patches", "--model.min_masked_per_block")] == [
        "24", "5"]
    assert paper_cell(demo[1], "finetune").split("; ") == [
        f"ViT-{size}/16 {name} unknown" for name in ("VQ-KD", "k-CLIP") for size in "TSB"]
