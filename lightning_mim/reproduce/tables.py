"""What a reproduction writes once its stages are done: each row's numbers over its seeds (`results`) beside the
paper's, as `table.md`, `table.csv` (one line per row, protocol and paper reference) and `table.json`, with the
verdict of each of the paper's claims (`verdicts`); the hyper-parameters and final metrics of every run in
TensorBoard's HParams tab; and for `compare` a plot of accuracy against training cost (`plot`)."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import yaml

from lightning_mim.reproduce.convergence import convergence_markdown, convergence_records
from lightning_mim.reproduce.hparams import remove_experiment_summaries, run_hparams, write_session
from lightning_mim.reproduce.plan import Plan, PlannedRun
from lightning_mim.reproduce.plot import plot_analysis, plot_compare
from lightning_mim.reproduce.presets import shown
from lightning_mim.reproduce.results import RowResult, RunResult, by_row, collect, column_title, protocol_name
from lightning_mim.reproduce.state import State, fingerprint
from lightning_mim.reproduce.stats import Summary
from lightning_mim.reproduce.superseded import move_superseded
from lightning_mim.reproduce.verdicts import verdict_records, verdicts_markdown

# Trainer settings shown in the HParams tab beside the model and data hyper-parameters.
TRAINER_HPARAMS = ("max_steps", "max_epochs", "accumulate_grad_batches", "precision", "devices", "num_nodes")


def cell(value: float | str, digits: int) -> str:
    """A number with `digits` decimals; a word ("unknown", "not run", ...) as it is."""
    return value if isinstance(value, str) else f"{value:.{digits}f}"


def paper_cell(run: PlannedRun, protocol: str) -> str:
    """The paper's number(s) beside a run: one value for a paper-scale row, each backbone's for a demo row."""
    values = [(row.backbone, cell(row.reported.get(protocol, "unknown"), 1)) for row in run.references]
    if not values:  # a reference row
        return "-"
    if len(values) == 1:
        return values[0][1]
    return "; ".join(f"{backbone} {value}" for backbone, value in values)


def markdown(header: list[str], lines: list[list[str]]) -> str:
    rows = [header, ["---"] * len(header), *lines]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows) + "\n"


COST_HEADER = ["img/s (training step)", "pre-train wall-clock h", "devices"]


def cost_cells(row: RowResult) -> list[str]:
    if row.run.reference is not None:
        return ["-", "-", "-"]
    img_per_s = row.img_per_s if row.img_per_s is not None else "not logged"
    return [cell(img_per_s, 0), f"{row.hours:.3f}", str(row.run.devices)]


def top1_cells(value: Summary | str) -> list[str]:
    """Mean, sample std ("-" below two seeds) and n of a row's top-1; a word ("not run", "missing") and n = 0."""
    if isinstance(value, str):
        return [value, "-", "0"]
    return [cell(value.mean, 2), "-" if value.std is None else cell(value.std, 2), str(value.n)]


def table_lines(plan: Plan, rows: list[RowResult], with_paper: bool) -> tuple[list[str], list[list[str]]]:
    header = ["row", "method", "this run"]
    for protocol in plan.protocols:
        name = protocol_name(protocol)
        header += [column_title(protocol), f"{name} std", f"{name} n"]
        if with_paper:
            header.append(f"{column_title(protocol)}, paper")
    lines = []
    for row in rows:
        line = [row.run.key, row.run.method, row.run.backbone]
        for protocol in plan.protocols:
            line += top1_cells(row.top1_of(protocol))
            if with_paper:
                line.append(paper_cell(row.run, protocol))
        lines.append(line + cost_cells(row))
    return header + COST_HEADER, lines


def top1_fields(value: Summary | str, row: RowResult, protocol: str) -> dict[str, Any]:
    mean = value if isinstance(value, str) else value.mean
    std, n = (None, 0) if isinstance(value, str) else (value.std, value.n)
    return {"top1": mean, "top1_std": std, "n": n, "top1_seeds": row.values(protocol)}


def table_records(plan: Plan, rows: list[RowResult], with_paper: bool) -> list[dict[str, Any]]:
    """One record per row, protocol and paper reference."""
    records = []
    for row in rows:
        common = {"preset": plan.setup.preset, "paper": plan.name, "row": row.run.key, "method": row.run.method,
                  "this_run": row.run.backbone}
        cost = {"img_per_s": row.img_per_s, "pretrain_hours": row.hours, "devices": row.run.devices,
                "seeds": [result.run.seed for result in row.seeds],
                "checkpoints": [result.run.evaluated for result in row.seeds]}
        for protocol in plan.protocols:
            references = row.run.references if with_paper else ()
            for reference in references or [None]:
                paper = {} if not with_paper else {
                    "paper_backbone": None, "paper_top1": None, "paper_source": None} if reference is None else {
                    "paper_backbone": reference.backbone, "paper_top1": reference.reported.get(protocol, "unknown"),
                    "paper_source": reference.source}
                records.append(common | {"protocol": protocol} | top1_fields(row.top1_of(protocol), row, protocol)
                               | paper | cost)
    return records


def write_tables(plan: Plan, rows: list[RowResult], with_paper: bool) -> Path:
    """table.md, table.csv and table.json in the plan's folder, with the verdicts of the paper's claims in table.md
    and table.json; returns the Markdown path."""
    header, lines = table_lines(plan, rows, with_paper)
    verdicts = verdict_records(plan, rows)
    curves = convergence_records(rows)
    plan.out.mkdir(parents=True, exist_ok=True)
    title = f"# {plan.title}: PRESET={plan.setup.preset}\n\n" + "".join(f"{note}\n" for note in plan.notes) + "\n"
    sections = [section for section in (verdicts_markdown(verdicts), convergence_markdown(curves, plan.setup.preset))
                if section]
    table = plan.out / "table.md"
    table.write_text(title + markdown(header, lines) + "".join(f"\n{section}" for section in sections))
    records = table_records(plan, rows, with_paper)
    with (plan.out / "table.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows({name: " ".join(map(str, value)) if isinstance(value, list) else value
                          for name, value in record.items()} for record in records)
    (plan.out / "table.json").write_text(json.dumps({"title": plan.title, "preset": plan.setup.preset,
                                                     "notes": plan.notes, "rows": records, "verdicts": verdicts,
                                                     "convergence": curves},
                                                    indent=1) + "\n")
    return table


def result_config(result: RunResult) -> dict[str, Any]:
    saved = result.run.run_dir / "config.yaml"
    return (yaml.safe_load(saved.read_text()) or {}) if saved.is_file() else {}


def recipe_name(run: PlannedRun) -> str:
    """The recipe of a run's pre-training, e.g. `lut/vit_micro_p4_demo_fmnist` (its last `--config`)."""
    command = run.pretrain.command
    configs = [word for before, word in zip(command, command[1:]) if before == "--config"]
    return "/".join(Path(configs[-1]).parts[-2:]).removesuffix(".yaml") if configs else ""


def log_hparams(plan: Plan, results: list[RunResult], state: State) -> None:
    """Each run's hyper-parameters (its saved config.yaml, `method` and `recipe` first) and final metrics in its
    TensorBoard run's HParams tab, as a session-start record only, so the tab's columns are the union over the
    folder's runs (`hparams`); written once per set of metrics (the fit itself logs no hp_metric:
    `default_hp_metric false`). No `paper` column: a run may stand in several tables."""
    results = [result for result in results if result.run.reference is None]  # reference rows have no run
    every = {result.run.label: run_hparams(result_config(result), recipe_name(result.run),
                                           {"row": result.run.key, "preset": plan.setup.preset,
                                            "seed": result.run.seed}, TRAINER_HPARAMS) for result in results}
    columns = {name for params in every.values() for name in params}
    for result in results:
        run, metrics = result.run, result.metrics()
        key = f"{run.label}/hparams_session"
        metrics_fingerprint = fingerprint([json.dumps(metrics, sort_keys=True)], run.pretrain.fingerprint)
        if state.done(key, metrics_fingerprint):
            continue
        # a hyper-parameter of other methods only ("-" here) differs between the runs, so the tab shows it first
        params = every[run.label] | {name: "-" for name in columns - set(every[run.label])}
        remove_experiment_summaries(run.run_dir, set(metrics))
        write_session(run.run_dir, params, metrics)
        state.record(key, metrics_fingerprint)


def finish(plan: Plan, state: State, with_paper: bool) -> list[RowResult]:
    results = collect(plan, state)
    rows = by_row(results)
    table = write_tables(plan, rows, with_paper)
    log_hparams(plan, results, state)
    move_superseded(plan, state)
    figures = plot_analysis(plan, rows)
    print("\n" + table.read_text(), flush=True)
    if figures:
        print(f"analysis figures: {shown(figures[0].parent)}/ ({', '.join(path.name for path in figures)})")
    print(f"table: {shown(table)} (and table.csv, table.json); TensorBoard: make tensorboard RUN={shown(plan.store)}")
    return rows


def finish_paper(plan: Plan, state: State) -> list[RowResult]:
    return finish(plan, state, with_paper=True)


def finish_compare(plan: Plan, state: State) -> list[RowResult]:
    rows = finish(plan, state, with_paper=False)
    plot = plan.out / "compare.png"
    plot_compare(plan, rows, plot)
    print(f"plot: {shown(plot)}")
    return rows
