"""SEEDS=N in `reproduce` / `compare` and what the tables make of the seeds: each row planned once per seed (seed 0
the single-seed run itself), mean / std / n per cell, each paper claim's verdict, and a plot whose labels do not
overlap; all from hand-made results (no training)."""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from matplotlib.legend import Legend
from matplotlib.text import Text
from PIL import Image

from lightning_mim.eval import analyze
from lightning_mim.eval.analyze import Analysis
from lightning_mim.eval.representation import Spectrum
from lightning_mim.reproduce.driver import main as reproduce, plan_compare, plan_paper
from lightning_mim.reproduce.papers import PAPERS
from lightning_mim.reproduce.plan import ANALYSIS_COLUMNS, Plan
from lightning_mim.reproduce.plot import compare_figure, plot_analysis, plot_compare
from lightning_mim.reproduce.presets import DEMO_ROBUSTNESS_IMAGES, Setup, shown
from lightning_mim.reproduce.results import RowResult, RunResult, analysis_values, by_row
from lightning_mim.reproduce.tables import write_tables
from lightning_mim.reproduce.verdicts import claims_of


def option(command: list[str], name: str) -> str | None:
    return command[command.index(name) + 1] if name in command else None


def test_each_seed_is_its_own_run_and_seed_zero_is_the_single_seed_run(tmp_path):
    single = plan_paper(PAPERS["mapet"], Setup("smoke"), tmp_path)
    seeded = plan_paper(PAPERS["mapet"], Setup("smoke"), tmp_path, seeds=3)
    assert [(run.key, run.seed) for run in seeded.runs] == [
        (key, seed) for seed in range(3) for key in ("beit", "mapet")] + [  # every row at seed 0 first
        (key, seed) for seed in range(3) for key in ("beit_random_init", "mapet_random_init")] + [
        ("pixels", 0)]  # then the reference rows (after the runs whose config they read); pixels once (no seed)
    for run, same in zip(seeded.runs[:2], single.runs):  # seed 0: the same stages, keys and folder as SEEDS=1
        assert [(stage.key, stage.fingerprint, stage.command) for stage in run.stages] == [
            (stage.key, stage.fingerprint, stage.command) for stage in same.stages]
        assert run.run_dir == same.run_dir and option(run.pretrain.command, "--seed_everything") is None
    for run in seeded.runs[2:6]:
        fit, evaluate = run.pretrain.command, run.stages[-1].command
        assert (option(fit, "--seed_everything"), option(evaluate, "--seed")) == (str(run.seed), str(run.seed))
        assert [stage.key for stage in run.stages[1:]] == [
            f"{run.key}/seed{run.seed}/pretrain", f"{run.key}/seed{run.seed}/evaluate knn,linear"]
        assert run.stages[0].key == "tokenizer/fmnist_pixels_4_32_512"  # the codebook: one stage for every seed
    pretrained = seeded.runs[:6]
    assert len({run.run_dir for run in pretrained}) == 6
    assert len({stage.fingerprint for run in pretrained for stage in run.stages[1:]}) == 12
    assert len({run.stages[0].fingerprint for run in pretrained}) == 1
    for run in seeded.runs[6:12]:  # each seed's random init: the config its pre-training saved, at that seed
        assert option(run.stages[0].command, "--ckpt") == f"random:{shown(run.run_dir / 'config.yaml')}"
        assert option(run.stages[0].command, "--seed") == (str(run.seed) if run.seed else None)
    compare = plan_compare(Setup("paper", "/data/imagenet"), tmp_path, ["compare_mae"], seeds=2).runs[:2]
    assert [option(run.pretrain.command, "--seed_everything") for run in compare] == [None, "1"]
    with pytest.raises(SystemExit, match="SEEDS must be at least 1, got 0"):
        reproduce(["lut", "--preset", "smoke", "--seeds", "0", "--dry-run", "--out", str(tmp_path)])


def results(plan: Plan, top1: dict[str, dict[str, list[float]]]) -> list[RowResult]:
    """Hand-made results: top1[row][protocol] lists the seeds' values (fewer values: the later seeds lack it)."""
    made = [RunResult(run, {protocol: values[run.seed] for protocol, values in top1.get(run.key, {}).items()
                            if run.seed < len(values)}, 100.0 + run.seed, 0.5 + run.seed) for run in plan.runs]
    return by_row(made)


def cells(table: str) -> dict[str, dict[str, str]]:
    lines = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in table.splitlines()
             if line.startswith("|") and not line.startswith("| ---")]
    header = lines[0]
    return {line[0]: dict(zip(header, line)) for line in lines[1:] if len(line) == len(header)}


def test_tables_give_mean_std_n_and_each_claims_verdict(tmp_path):
    plan = plan_paper(PAPERS["lut"], Setup("demo"), tmp_path, seeds=3)
    # MAE k-NN 70, 72, 74: mean 72, std 2; LUT 75, 76, 77: mean 76, std 1. 2 SE = 2 sqrt(4/3 + 1/3) = 2.582:
    # +4 holds. Logistic regression: MAE 51 +- 1, LUT 52 +- 2: +1 within noise; LUT 41 +- 1, MAE 45 +- 1 on a third
    # protocol would be reversed, but the demo preset does not fine-tune: not run.
    rows = results(plan, {"mae": {"knn": [70, 72, 74], "logreg": [50, 51, 52], "finetune": [44, 45, 46]},
                          "lut": {"knn": [75, 76, 77], "logreg": [50, 52, 54], "finetune": [40, 41, 42]}})
    table = write_tables(plan, rows, with_paper=True).read_text()
    mae = cells(table)["mae"]
    assert [mae[name] for name in ("k-NN top-1", "k-NN std", "k-NN n", "fine-tune top-1, paper")] == [
        "72.00", "2.00", "3", "83.7"]
    assert (mae["img/s (training step)"], mae["pre-train wall-clock h"]) == ("101", "1.500")  # means over seeds
    assert "SEEDS=3: every row pre-trained and evaluated with seeds 0..2" in table
    records = json.loads((plan.out / "table.json").read_text())["verdicts"]
    verdicts = {row["protocol"]: row for row in records if row["claim"] == "LUT > MAE"}
    assert {protocol: record["verdict"] for protocol, record in verdicts.items()} == {
        "knn": "holds", "logreg": "within noise", "finetune": "not run", "robustness-knn": "no result",
        "robustness-logreg": "no result"}
    # did pre-training help: each row against its random init (no results here for the random-init rows)
    assert {(row["claim"], row["better_row"], row["worse_row"], row["verdict"]) for row in records
            if row["claim"] != "LUT > MAE" and row["protocol"] == "knn"} == {
        ("MAE pre-training > its random init", "mae", "mae_random_init", "no result"),
        ("LUT pre-training > its random init", "lut", "lut_random_init", "no result")}
    knn = verdicts["knn"]
    assert (knn["claim"], knn["better_row"], knn["worse_row"], knn["better_n"], knn["worse_n"]) == (
        "LUT > MAE", "lut", "mae", 3, 3)
    assert (knn["difference"], knn["two_se"]) == (pytest.approx(4.0), pytest.approx(2.5819889))
    assert "| LUT > MAE | lut > mae | k-NN | 76.00 ± 1.00 (n = 3) | 72.00 ± 2.00 (n = 3) | +4.00 | 2.58 | holds |" \
        in table
    with (plan.out / "table.csv").open() as handle:
        lut_knn = [row for row in csv.DictReader(handle) if (row["row"], row["protocol"]) == ("lut", "knn")]
    assert [(row["top1"], row["top1_std"], row["n"], row["top1_seeds"]) for row in lut_knn] == [
        ("76.0", "1.0", "3", "75 76 77")] * 3  # one line per paper reference (ViT-S, B, L)

    # one seed on a side: no verdict; a result missing from every seed of a row: no result
    rows = results(plan, {"mae": {"knn": [], "logreg": [51]},
                          "lut": {"knn": [75, 76, 77], "logreg": [50, 52, 54]}})
    table = write_tables(plan, rows, with_paper=True).read_text()
    mae = cells(table)["mae"]
    names = ("logistic regression top-1", "logistic regression std", "logistic regression n", "k-NN top-1", "k-NN n")
    assert [mae[name] for name in names] == ["51.00", "-", "1", "missing", "0"]
    records = json.loads((plan.out / "table.json").read_text())["verdicts"]
    verdicts = {record["protocol"]: record["verdict"] for record in records if record["claim"] == "LUT > MAE"}
    assert verdicts == {"knn": "no result", "logreg": "n = 1, no verdict", "finetune": "not run",
                        "robustness-knn": "no result", "robustness-logreg": "no result"}


def test_claims_per_paper_and_scale(tmp_path):
    def pairs(plan: Plan) -> list[tuple[str, str, str]]:
        return [(claim.label, better, worse) for claim, better, worse in claims_of(plan)]

    order = ["bm_zoom_in_masking", "bm_masking", "bm_zoom_in", "bm_zoom_out", "bm_distortion", "bm_blur",
             "bm_decolorize"]
    letters = ["(a)+(m)", "(m)", "(a)", "(b)", "(c)", "(d)", "(e)"]
    expected = [(f"{letters[i]} > {letters[i + 1]}", order[i], order[i + 1]) for i in range(6)]
    assert pairs(plan_paper(PAPERS["beyond_masking"], Setup("paper", "/data/imagenet"), tmp_path)) == expected
    assert pairs(plan_paper(PAPERS["beyond_masking"], Setup("demo"), tmp_path)) == expected  # same keys at demo
    mapet = "MaPeT > the BEiT-style baseline (same tokenizer)"
    assert pairs(plan_paper(PAPERS["mapet"], Setup("paper", "/data/imagenet"), tmp_path)) == [
        (mapet, "mapet_vit_b16_vqkd", "beit_vit_b16_vqkd"), (mapet, "mapet_vit_b16_kclip", "beit_vit_b16_kclip")]
    assert pairs(plan_paper(PAPERS["mapet"], Setup("demo"), tmp_path)) == [(mapet, "mapet", "beit")]
    assert pairs(plan_paper(PAPERS["symmim"], Setup("demo"), tmp_path)) == [("SymMIM > SimMIM", "symmim", "simmim")]
    compare = pairs(plan_compare(Setup("paper", "/data/imagenet"), tmp_path))
    assert compare[:3] == [("LUT > MAE", "compare_lut", "compare_mae"),
                           ("SymMIM > SimMIM", "compare_symmim", "compare_simmim"),
                           (mapet, "compare_mapet", "compare_beit")] and len(compare) == 3 + 6
    # (d) > (e) at demo scale: de-colourisation has no demo row
    plan = plan_paper(PAPERS["beyond_masking"], Setup("demo"), tmp_path, seeds=2)
    rows = results(plan, {run.key: {"knn": [60.0, 61.0], "logreg": [50.0, 51.0]} for run in plan.runs})
    write_tables(plan, rows, with_paper=True)
    verdicts = json.loads((plan.out / "table.json").read_text())["verdicts"]
    assert {record["verdict"] for record in verdicts if record["worse_row"] == "bm_decolorize"} == {"not run"}
    assert {record["verdict"] for record in verdicts if record["worse_row"] != "bm_decolorize"
            and record["protocol"] in ("knn", "logreg")} == {"within noise"}
    assert {record["verdict"] for record in verdicts if record["protocol"] == "finetune"} == {"not run"}


def test_compare_plot_labels_do_not_overlap(tmp_path):
    plan = plan_compare(Setup("demo"), tmp_path, seeds=3)
    rows = results(plan, {run.key: {protocol: [40.0 + index, 41.0 + index, 42.0 + index]
                                    for protocol in ("knn", "logreg")}
                          for index, run in enumerate(plan.runs)})
    figure = compare_figure(plan, rows)
    figure.canvas.draw()  # lays out the legends
    renderer = figure.canvas.get_renderer()
    found = figure.findobj(lambda artist: isinstance(artist, Text) and artist.get_visible() and artist.get_text())
    texts = list({id(text): text for text in found}.values())  # findobj meets a legend's texts more than once
    labels = {text.get_text() for text in texts}
    assert {f"{row.run.key} (n = 3)" for row in rows if row.run.reference is None} <= labels
    assert {"k-NN top-1", "raw pixels, k-NN", "raw pixels, logistic regression",
            "hollow: the row's encoder at random init"} <= labels
    assert any("PRESET=demo, n = 3 seeds per row" in label for label in labels)
    boxes = [text.get_window_extent(renderer) for text in texts]
    overlapping = [(texts[i].get_text(), texts[j].get_text()) for i in range(len(boxes))
                   for j in range(i + 1, len(boxes)) if boxes[i].overlaps(boxes[j])]
    assert not overlapping
    axes = figure.axes[0]
    assert not axes.texts  # no label placed among the points: the rows are named in the legends outside the axes
    assert not any(legend.get_window_extent(renderer).overlaps(axes.get_window_extent(renderer))
                   for legend in figure.findobj(Legend))
    plot_compare(plan, rows, tmp_path / "compare.png")
    with Image.open(tmp_path / "compare.png") as plot:
        assert plot.size == (1200, 600)


def write_analysis(folder, distances: list[list[float]], singular_values: list[float]) -> None:
    """A hand-made analysis folder as `analyze` writes it: per-layer head distances, one spectrum for both kinds."""
    folder.mkdir(parents=True)
    spectrum = Spectrum(torch.tensor(singular_values), 1e-2)
    made = Analysis("run", {"patch": spectrum, "pooled": spectrum}, [torch.tensor(heads) for heads in distances],
                    [torch.ones(len(heads)) for heads in distances])
    analyze.write_tables([made], folder)


def test_robustness_and_analysis_columns_and_figures(tmp_path):
    plan = plan_compare(Setup("demo"), tmp_path, rows=["mae", "lut"], seeds=2)
    mae, lut = (next(run for run in plan.runs if run.key == key and run.seed == 0) for key in ("mae", "lut"))
    assert mae.protocols == ("knn", "logreg", "robustness-knn", "robustness-logreg", *ANALYSIS_COLUMNS)
    assert [stage.key for stage in mae.stages] == [
        "mae/pretrain", "mae/evaluate knn,logreg", "mae/evaluate robustness", "mae/analyze"]
    robustness = mae.stages[2].command
    assert option(robustness, "--robustness-images") == str(DEMO_ROBUSTNESS_IMAGES)
    assert option(mae.stages[3].command, "--out") == shown(mae.run_dir / "analysis") == shown(mae.analysis_dir)
    assert option(mae.stages[3].command, "--seed") is None  # every run and seed analysed on the same images
    seed1 = next(run for run in plan.runs if run.key == "mae" and run.seed == 1)
    assert option(seed1.stages[2].command, "--images") == option(mae.stages[3].command, "--images") == "512"
    # the CPU demo scores robustness at the first seed only (n = 1): corrupting and 76 passes cost minutes per row
    assert [stage.key for stage in seed1.stages] == ["mae/seed1/pretrain", "mae/seed1/evaluate knn,logreg",
                                                     "mae/seed1/analyze"]
    assert "robustness-knn" not in seed1.protocols
    random_init = next(run for run in plan.runs if run.key == "mae_random_init" and run.seed == 0)
    assert option(random_init.stages[1].command, "--ckpt") == f"random:{shown(mae.run_dir / 'config.yaml')}"
    assert "--adapt-images" in random_init.stages[1].command
    # MAE: layer means 2 and 4 -> 3 px; LUT 5 px. Spectrum (4, 2, 1, 1): p = (.5, .25, .125, .125), H = 1.2130 nats
    write_analysis(mae.analysis_dir, [[1.0, 3.0], [4.0, 4.0]], [4.0, 2.0, 1.0, 1.0])
    write_analysis(lut.analysis_dir, [[5.0, 5.0], [5.0, 5.0]], [1.0, 1.0, 1.0, 1.0])
    values = analysis_values(mae.analysis_dir)
    assert values == pytest.approx({"analysis-rank-patch": math.exp(1.2130076), "analysis-rank-pooled":
                                    math.exp(1.2130076), "analysis-distance": 3.0}, rel=1e-5)
    assert analysis_values(tmp_path / "nowhere") == {}
    rows = results(plan, {"mae": {"knn": [70, 72], "robustness-knn": [50]},
                          "lut": {"knn": [75, 77], "robustness-knn": [60]}})
    for row in rows:  # the analysis columns come from the folders
        for result in row.seeds:
            result.top1 |= analysis_values(result.run.analysis_dir) if result.run.seed == 0 else {}
    table = write_tables(plan, rows, with_paper=False).read_text()
    lut_cells = cells(table)["lut"]
    assert (lut_cells["k-NN mCA"], lut_cells["k-NN mCA std"], lut_cells["attention distance px"],
            lut_cells["effective rank, patch tokens"], lut_cells["attention distance px n"]) == (
        "60.00", "-", "5.00", "4.00", "1")
    verdicts = json.loads((plan.out / "table.json").read_text())["verdicts"]
    lut_mae = {record["protocol"]: record["verdict"] for record in verdicts if record["claim"] == "LUT > MAE"}
    assert (lut_mae["knn"], lut_mae["robustness-knn"]) == ("holds", "n = 1, no verdict")  # +5 > 2 SE = 2.83
    assert not set(lut_mae) & set(ANALYSIS_COLUMNS)
    # only the claims about the table's rows (no SymMIM, MaPeT or Beyond Masking line in compare --rows mae,lut), and
    # pre-training against random init on the protocols the random-init row runs (no robustness there)
    assert {record["claim"] for record in verdicts} == {"LUT > MAE", "MAE pre-training > its random init",
                                                        "LUT pre-training > its random init"}
    assert {record["protocol"] for record in verdicts if "random init" in record["claim"]} == {"knn", "logreg"}
    figures = plot_analysis(plan, rows)
    assert sorted(path.name for path in figures) == ["attention_distance.png", "attention_entropy.png",
                                                     "spectrum.png"]
    read = analyze.read_analysis(lut.analysis_dir, "lut")
    assert read.spectra["patch"].effective_rank == pytest.approx(4.0)
    assert [heads.tolist() for heads in read.distance] == [[5.0, 5.0], [5.0, 5.0]]
