"""Whether the tables' runs were trained to a plateau: the pre-training loss fall of the last fifth of the steps, and
at the small presets no fine-tuning cell (nor verdict) from a validation curve still rising; all from hand-made
curves and results (no training)."""
from __future__ import annotations

import json

import pytest

from lightning_mim.reproduce.convergence import LossFall, logged_scalars, loss_fall, plateaued
from lightning_mim.reproduce.papers import PAPERS
from lightning_mim.reproduce.planning import plan_paper
from lightning_mim.reproduce.presets import Setup
from lightning_mim.reproduce.results import RunResult, by_row
from lightning_mim.reproduce.tables import write_tables
from test_reproduce import table_cells as first_table


def test_loss_fall_measures_the_share_of_the_fall_in_the_last_fifth():
    # 100 steps: 1.0 in the first tenth, 0.5 at 70-80 %, 0.45 in the last tenth: (0.5 - 0.45) / (1 - 0.45) = 9.1 %
    points = [(step, 1.0 if step <= 10 else 0.5 if 70 < step <= 80 else 0.45 if step > 90 else 0.6)
              for step in range(0, 101, 5)]
    fall = loss_fall(points)
    assert (fall.start, fall.end) == (pytest.approx(1.0), pytest.approx(0.45))
    assert fall.late_share == pytest.approx(0.05 / 0.55) and not fall.flat
    flat = loss_fall([(step, 1.0 if step <= 10 else 0.46 if 70 < step <= 80 else 0.45 if step > 90 else 0.6)
                      for step in range(0, 101, 5)])
    assert flat.late_share == pytest.approx(0.01 / 0.55) and flat.flat
    rising = loss_fall([(step, 0.1 * step) for step in range(0, 101, 5)])
    assert rising.late_share is None and not rising.flat  # a loss that did not fall is not flat
    assert loss_fall([(0, 1.0), (100, 0.5)]) is None  # empty windows: too few logged steps
    assert loss_fall([]) is None
    assert plateaued(0.99) and not plateaued(1.0) and not plateaued(None)


def test_logged_scalars_reads_every_tag_once_and_a_resumed_runs_latest_value(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path / "run")) as writer:
        for step, loss in ((0, 0.9), (50, 0.7), (100, 0.6)):
            writer.add_scalar("train/loss", loss, step)
            writer.add_scalar("train/throughput_img_s", 100.0 + step, step)
        writer.add_scalar("train/loss", 0.65, 100)  # a resumed run logs step 100 again
    scalars = logged_scalars(tmp_path / "run")
    assert scalars["train/loss"] == [(0, pytest.approx(0.9)), (50, pytest.approx(0.7)), (100, pytest.approx(0.65))]
    assert [value for _, value in scalars["train/throughput_img_s"]] == [100.0, 150.0, 200.0]
    assert logged_scalars(tmp_path / "missing") == {}


def gpu_results(plan, finetune_gains: dict[str, list[float | None]]):
    """Three seeds of MAE and LUT: k-NN MAE 70/72/74 and LUT 75/76/77 (LUT > MAE holds), fine-tuning MAE 88/89/90
    and LUT 91/91.5/92 with the given late gains, each pre-training loss 0.8 -> 0.4 with 2 % of its fall late."""
    top1 = {"mae": {"knn": [70, 72, 74], "finetune": [88, 89, 90]},
            "lut": {"knn": [75, 76, 77], "finetune": [91, 91.5, 92]}}
    made = []
    for run in plan.runs:
        values = {protocol: seeds[run.seed] for protocol, seeds in top1.get(run.key, {}).items()}
        gains = {"finetune": finetune_gains[run.key][run.seed]} if run.key in finetune_gains else {}
        loss = LossFall(0.8, 0.4, 0.02) if run.reference is None else None
        made.append(RunResult(run, values, 100.0, 0.5, gains, loss, plan.setup.preset != "paper"))
    return by_row(made)


def test_small_presets_withhold_a_fine_tuning_cell_whose_curve_still_rises(tmp_path):
    plan = plan_paper(PAPERS["lut"], Setup("gpu"), tmp_path, seeds=3)
    # MAE's third seed gained 1.5 points in its last quarter of epochs: its row's fine-tuning is not published
    rows = gpu_results(plan, {"mae": [0.2, 0.3, 1.5], "lut": [0.1, -0.2, 0.4]})
    table = write_tables(plan, rows, with_paper=True).read_text()
    cells = first_table(table)
    assert cells["mae"]["fine-tune top-1"] == "not converged" and cells["mae"]["fine-tune n"] == "0"
    assert (cells["lut"]["fine-tune top-1"], cells["lut"]["fine-tune n"]) == ("91.50", "3")
    assert cells["mae"]["k-NN top-1"] == "72.00"  # the frozen-feature protocols have no epochs to gate
    saved = json.loads((plan.out / "table.json").read_text())
    verdicts = {record["protocol"]: record["verdict"] for record in saved["verdicts"] if record["claim"] == "LUT > MAE"}
    assert verdicts["knn"] == "holds" and verdicts["finetune"] == "not converged"
    (mae_finetune,) = [record for record in saved["rows"] if (record["row"], record["protocol"], record[
        "paper_backbone"]) == ("mae", "finetune", "ViT-B/16")]
    assert mae_finetune["top1"] == "not converged" and mae_finetune["top1_seeds"] == [88, 89, 90]
    curves = {(record["row"], record["seed"]): record for record in saved["convergence"]}
    assert curves[("mae", 2)]["finetune_late_gain"] == 1.5 and curves[("mae", 2)]["finetune_plateau"] is False
    assert curves[("lut", 1)]["finetune_plateau"] is True and curves[("lut", 1)]["loss_flat"] is True
    assert "## Convergence" in table and "| mae | 2 | 0.8 -> 0.4 | 2.0% (flat) | +1.50 (still rising) |" in table

    # every seed on its plateau: the cell and the verdict are back
    rows = gpu_results(plan, {"mae": [0.2, 0.3, 0.5], "lut": [0.1, -0.2, 0.4]})
    cells = first_table(write_tables(plan, rows, with_paper=True).read_text())
    assert (cells["mae"]["fine-tune top-1"], cells["mae"]["fine-tune std"]) == ("89.00", "1.00")
    saved = json.loads((plan.out / "table.json").read_text())
    verdicts = {record["protocol"]: record["verdict"] for record in saved["verdicts"] if record["claim"] == "LUT > MAE"}
    assert verdicts["finetune"] == "holds"  # +2.5 against 2 SE = 2 sqrt(1/3 + 0.25/3) = 1.29


def test_paper_scale_reports_the_curves_without_gating_the_recipes_cells(tmp_path):
    plan = plan_paper(PAPERS["lut"], Setup("paper", "/data/imagenet"), tmp_path, rows=["mae_vit_b16", "lut_vit_b16"])
    made = [RunResult(run, {"finetune": 83.0}, 100.0, 0.5, {"finetune": 2.0}, None, False) for run in plan.runs
            if run.reference is None]
    table = write_tables(plan, by_row(made), with_paper=True).read_text()
    assert first_table(table)["mae_vit_b16"]["fine-tune top-1"] == "83.00"  # the paper's epochs, whatever the curve
    assert "At paper scale the paper's recipe fixes the epochs" in table and "+2.00 (still rising)" in table


def test_the_random_init_row_does_not_take_the_supervised_rows_curve(tmp_path, monkeypatch):
    # both rows score `random:<the run's config.yaml>`, so their results.csv rows share a name
    import csv

    from lightning_mim.reproduce import plan as plan_module
    from lightning_mim.reproduce.planning import plan_compare
    from lightning_mim.reproduce.results import collect
    from lightning_mim.reproduce.state import State

    monkeypatch.setattr(plan_module, "run_name", str)  # no checkpoint here: a run's name is its path
    plan = plan_compare(Setup("gpu"), tmp_path, ["mae"])
    runs = {run.key: run for run in plan.runs}
    random_name = runs["supervised_mae"].results_name
    assert random_name == runs["mae_random_init"].results_name
    plan.store.mkdir(parents=True, exist_ok=True)
    with (plan.store / "results.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["run", "protocol", "top1", "late_gain"])
        writer.writerows([(random_name, "knn", "60.0", ""), (random_name, "logreg", "70.0", ""),
                          (random_name, "finetune", "80.0", "2.5")])
    state = State(plan.store / "state.json")
    state.start(runs["mae"].pretrain)
    state.finish(runs["mae"].pretrain, "done", 60.0)
    results = {result.run.key: result for result in collect(plan, state)}
    assert results["supervised_mae"].late_gains == {"finetune": 2.5}
    assert results["mae_random_init"].late_gains == {}
    assert results["mae_random_init"].top1 == {"knn": 60.0, "logreg": 70.0}
