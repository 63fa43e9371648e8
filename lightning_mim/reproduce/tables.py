"""What a reproduction writes once its stages are done: this run's numbers (evaluate's `results.csv`, the training
step's `train/throughput_img_s` from TensorBoard, the pre-training's wall-clock seconds from `state.json`) beside the
paper's, as `table.md`, `table.csv` (one line per row, protocol and paper reference) and `table.json`; the
hyper-parameters and final metrics of every run in TensorBoard's HParams tab; and for `compare` a plot of accuracy
against training cost (`compare.png`)."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Any

import yaml

from lightning_mim.eval.evaluate import run_name
from lightning_mim.reproduce.plan import Plan, PlannedRun
from lightning_mim.reproduce.presets import shown
from lightning_mim.reproduce.state import State, fingerprint

PROTOCOL_NAMES = {"knn": "k-NN", "linear": "linear", "finetune": "fine-tune"}
THROUGHPUT_TAG = "train/throughput_img_s"
# Trainer settings shown in the HParams tab beside the model and data hyper-parameters.
TRAINER_HPARAMS = ("max_steps", "max_epochs", "accumulate_grad_batches", "precision", "devices", "num_nodes")


@dataclass
class RunResult:
    run: PlannedRun
    top1: dict[str, float]  # protocol -> this run's top-1 (%)
    img_per_s: float | None  # mean of the training step's logged throughput (all devices)
    hours: float  # wall-clock of the pre-training's attempts

    def top1_of(self, protocol: str) -> float | str:
        """This run's top-1, or why there is none: "not run" by this preset, "missing" from results.csv."""
        return self.top1.get(protocol, "missing") if protocol in self.run.protocols else "not run"

    def metrics(self) -> dict[str, float]:
        values = {f"reproduce/{protocol}_top1": value for protocol, value in self.top1.items()}
        if self.img_per_s is not None:
            values["reproduce/img_per_s"] = self.img_per_s
        return values | {"reproduce/pretrain_hours": self.hours}


def mean_scalar(run_dir: Path, tag: str) -> float | None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    if tag not in events.Tags()["scalars"]:
        return None
    return mean(event.value for event in events.Scalars(tag))


def collect(plan: Plan, state: State) -> list[RunResult]:
    """Each run's latest evaluate row per protocol (a rerun appends newer rows), throughput and hours."""
    with (plan.store / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    results = []
    for run in plan.runs:
        name = run_name(run.checkpoint)
        top1 = {row["protocol"]: float(row["top1"]) for row in rows if row["run"] == name}
        results.append(RunResult(run, {protocol: top1[protocol] for protocol in run.protocols if protocol in top1},
                                 mean_scalar(run.run_dir, THROUGHPUT_TAG), state.seconds(run.pretrain) / 3600))
    return results


def cell(value: float | str, digits: int) -> str:
    """A number with `digits` decimals; a word ("unknown", "not run", ...) as it is."""
    return value if isinstance(value, str) else f"{value:.{digits}f}"


def paper_cell(run: PlannedRun, protocol: str) -> str:
    """The paper's number(s) beside a run: one value for a paper-scale row, each backbone's for a demo row."""
    values = [(row.backbone, cell(row.reported.get(protocol, "unknown"), 1)) for row in run.references]
    if len(values) == 1:
        return values[0][1]
    return "; ".join(f"{backbone} {value}" for backbone, value in values)


def markdown(header: list[str], lines: list[list[str]]) -> str:
    rows = [header, ["---"] * len(header), *lines]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows) + "\n"


COST_HEADER = ["img/s (training step)", "pre-train wall-clock h", "devices"]


def cost_cells(result: RunResult) -> list[str]:
    img_per_s = result.img_per_s if result.img_per_s is not None else "not logged"
    return [cell(img_per_s, 0), f"{result.hours:.3f}", str(result.run.devices)]


def table_lines(plan: Plan, results: list[RunResult], with_paper: bool) -> tuple[list[str], list[list[str]]]:
    header = ["row", "method", "this run"]
    for protocol in plan.protocols:
        header.append(f"{PROTOCOL_NAMES[protocol]} top-1")
        if with_paper:
            header.append(f"{PROTOCOL_NAMES[protocol]} top-1, paper")
    lines = []
    for result in results:
        line = [result.run.key, result.run.method, result.run.backbone]
        for protocol in plan.protocols:
            line.append(cell(result.top1_of(protocol), 2))
            if with_paper:
                line.append(paper_cell(result.run, protocol))
        lines.append(line + cost_cells(result))
    return header + COST_HEADER, lines


def write_tables(plan: Plan, results: list[RunResult], with_paper: bool) -> Path:
    """table.md, table.csv and table.json in the plan's folder; returns the Markdown path."""
    header, lines = table_lines(plan, results, with_paper)
    plan.out.mkdir(parents=True, exist_ok=True)
    title = f"# {plan.title}: PRESET={plan.setup.preset}\n\n" + "".join(f"{note}\n" for note in plan.notes) + "\n"
    table = plan.out / "table.md"
    table.write_text(title + markdown(header, lines))
    records = []
    for result in results:
        common = {"preset": plan.setup.preset, "paper": plan.name, "row": result.run.key,
                  "method": result.run.method, "this_run": result.run.backbone}
        cost = {"img_per_s": result.img_per_s, "pretrain_hours": result.hours, "devices": result.run.devices,
                "checkpoint": shown(result.run.checkpoint)}
        for protocol in plan.protocols:
            references = result.run.references if with_paper else ()
            for row in references or [None]:
                paper = {} if row is None else {
                    "paper_backbone": row.backbone, "paper_top1": row.reported.get(protocol, "unknown"),
                    "paper_source": row.source}
                records.append(common | {"protocol": protocol, "top1": result.top1_of(protocol)} | paper | cost)
    with (plan.out / "table.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    (plan.out / "table.json").write_text(json.dumps({"title": plan.title, "preset": plan.setup.preset,
                                                     "notes": plan.notes, "rows": records}, indent=1) + "\n")
    return table


def log_hparams(plan: Plan, results: list[RunResult], state: State) -> None:
    """Each run's hyper-parameters (its saved config.yaml) and final metrics in its TensorBoard run's HParams tab,
    written once per set of metrics (the fit itself logs no hp_metric: `default_hp_metric false`)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    for result in results:
        run, metrics = result.run, result.metrics()
        key = f"{run.key}/hparams"
        metrics_fingerprint = fingerprint([json.dumps(metrics, sort_keys=True)], run.pretrain.fingerprint)
        if state.done(key, metrics_fingerprint):
            continue
        saved = run.run_dir / "config.yaml"
        config: dict[str, Any] = yaml.safe_load(saved.read_text()) if saved.is_file() else {}
        trainer = config.get("trainer") or {}
        params = {"preset": plan.setup.preset, "paper": plan.name, "model": config.get("model"),
                  "data": config.get("data"), "trainer": {name: trainer.get(name) for name in TRAINER_HPARAMS}}
        logger = TensorBoardLogger(save_dir=str(plan.store), name=run.key, version=run.run_dir.name,
                                   default_hp_metric=False)
        logger.log_hyperparams(params, metrics)
        logger.finalize("success")
        state.record(key, metrics_fingerprint)


def plot_compare(plan: Plan, results: list[RunResult], path: Path) -> None:
    """Top-1 against pre-training wall-clock hours: one point per row (labelled with its key) and protocol."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for protocol, marker in zip(plan.protocols, "os^D"):
        points = [(result.hours, result.top1[protocol], result.run.key) for result in results
                  if protocol in result.top1]
        axes.scatter([x for x, _, _ in points], [y for _, y, _ in points], marker=marker, s=50,
                     label=f"{PROTOCOL_NAMES[protocol]} top-1")
        for x, y, key in points:
            axes.annotate(key, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    devices = plan.runs[0].devices
    axes.set_xlabel(f"pre-training wall-clock hours ({devices} {'GPU' if plan.setup.preset == 'paper' else 'CPU'} "
                    f"process{'es' if devices > 1 else ''})")
    axes.set_ylabel("top-1 (%)")
    axes.set_title(f"compare, PRESET={plan.setup.preset}" +
                   ("" if plan.setup.preset == "paper" else " (not paper numbers)"), fontsize=10)
    axes.margins(x=0.15, y=0.1)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def finish(plan: Plan, state: State, with_paper: bool) -> list[RunResult]:
    results = collect(plan, state)
    table = write_tables(plan, results, with_paper)
    log_hparams(plan, results, state)
    print("\n" + table.read_text(), flush=True)
    print(f"table: {shown(table)} (and table.csv, table.json); TensorBoard: make tensorboard RUN={shown(plan.store)}")
    return results


def finish_paper(plan: Plan, state: State) -> list[RunResult]:
    return finish(plan, state, with_paper=True)


def finish_compare(plan: Plan, state: State) -> list[RunResult]:
    results = finish(plan, state, with_paper=False)
    plot = plan.out / "compare.png"
    plot_compare(plan, results, plot)
    print(f"plot: {shown(plot)}")
    return results
