"""A plan's numbers once its stages are done: per run (a row at one seed) evaluate's latest top-1 per protocol from
`results.csv` (with the late gain of each trained protocol's validation curve), the training step's
`train/throughput_img_s` and the pre-training loss curve from TensorBoard, and the pre-training's wall-clock seconds
from `state.json`; per row, those of its seeds together."""
from __future__ import annotations

import csv
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from lightning_mim.reproduce.convergence import (
    GATED_PRESETS, LOSS_TAG, NOT_CONVERGED, LossFall, logged_scalars, loss_fall, plateaued,
)
from lightning_mim.reproduce.plan import Plan, PlannedRun
from lightning_mim.reproduce.state import State
from lightning_mim.reproduce.stats import Summary, summarize
from lightning_mim.reproduce.transfer import transfer_title, transfer_top1

PROTOCOL_NAMES = {"knn": "k-NN", "linear": "linear", "finetune": "fine-tune", "logreg": "logistic regression"}
# The columns of the analyze stage: (analysis.csv quantity, title). A distance is the mean over layers and heads.
ANALYSIS_QUANTITIES = {"analysis-rank-patch": ("effective_rank_patch", "effective rank, patch tokens"),
                       "analysis-rank-pooled": ("effective_rank_pooled", "effective rank, pooled feature"),
                       "analysis-distance": ("attention_distance_px", "attention distance px")}
SHIFT_NAMES = {"imagenet-a": "ImageNet-A", "imagenet-r": "ImageNet-R", "imagenet-sketch": "ImageNet-Sketch"}
THROUGHPUT_TAG = "train/throughput_img_s"
# The protocols trained for epochs (their curves decide a plateau), and the columns scored with their classifier.
TRAINED_PROTOCOLS = {"linear": "linear", "finetune": "finetune", "robustness-finetune": "finetune"}


def protocol_name(protocol: str) -> str:
    """A protocol's name in tables: evaluate's protocols, robustness (the mean corruption accuracy of one
    classifier: "k-NN mCA"), a transfer set's fine-tuning ("iNat 2018 fine-tune") and the analyses."""
    if protocol.startswith("robustness-"):
        return f"{PROTOCOL_NAMES[protocol[len('robustness-'):]]} mCA"
    if protocol.startswith("shift-"):  # shift-<set>-<classifier>
        name, classifier = protocol[len("shift-"):].rsplit("-", 1)
        return f"{SHIFT_NAMES.get(name, name)} {PROTOCOL_NAMES[classifier]}"
    if protocol in ANALYSIS_QUANTITIES:
        return ANALYSIS_QUANTITIES[protocol][1]
    return transfer_title(protocol) or PROTOCOL_NAMES[protocol]


def is_accuracy(protocol: str) -> bool:
    """A top-1 column (%), as opposed to an analysis one."""
    return protocol not in ANALYSIS_QUANTITIES


def column_title(protocol: str) -> str:
    """"k-NN top-1", "k-NN mCA" (a top-1 under corruption), "attention distance px"."""
    name = protocol_name(protocol)
    return f"{name} top-1" if is_accuracy(protocol) and not protocol.startswith("robustness-") else name


def analysis_values(folder: Path | None) -> dict[str, float]:
    """The analyze columns of one encoder from its `analysis.csv` (none when it has not been analysed)."""
    path = None if folder is None else folder / "analysis.csv"
    if path is None or not path.is_file():
        return {}
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    values = {}
    for column, (quantity, _) in ANALYSIS_QUANTITIES.items():
        numbers = [float(row["value"]) for row in rows if row["quantity"] == quantity and row["head"] in ("", "mean")]
        if numbers:
            values[column] = statistics.fmean(numbers)
    return values


@dataclass
class RunResult:
    """One row at one seed."""

    run: PlannedRun
    top1: dict[str, float]  # protocol -> this run's top-1 (%), or an analysis column's value
    img_per_s: float | None  # mean of the training step's logged throughput (all devices)
    hours: float | None  # wall-clock of the pre-training's attempts (None: a reference row)
    # each trained protocol's late gain (`eval.curve.late_gain`; None: too few validated epochs or not recorded)
    late_gains: dict[str, float | None] = field(default_factory=dict)
    loss: LossFall | None = None  # the pre-training loss curve (None: a reference row, or too few logged steps)
    gated: bool = False  # a small preset: a trained protocol's top-1 counts only once its curve has plateaued

    def converged(self, protocol: str) -> bool:
        """Whether this run's top-1 of `protocol` may be published: always, but for a trained protocol at a gated
        preset whose curve has not plateaued."""
        trained = TRAINED_PROTOCOLS.get(protocol)
        return not (self.gated and trained is not None and protocol in self.top1
                    and not plateaued(self.late_gains.get(trained)))

    def metrics(self) -> dict[str, float]:
        values = {f"reproduce/{protocol}_top1" if is_accuracy(protocol) else f"reproduce/{protocol}": value
                  for protocol, value in self.top1.items()}
        if self.img_per_s is not None:
            values["reproduce/img_per_s"] = self.img_per_s
        return values if self.hours is None else values | {"reproduce/pretrain_hours": self.hours}


@dataclass
class RowResult:
    """One row of a table: its runs at every seed, in seed order."""

    seeds: list[RunResult]

    @property
    def run(self) -> PlannedRun:
        """The row's seed-0 run (what every seed shares: key, method, backbone, references, protocols)."""
        return self.seeds[0].run

    def values(self, protocol: str) -> list[float]:
        return [result.top1[protocol] for result in self.seeds if protocol in result.top1]

    def converged(self, protocol: str) -> bool:
        return all(result.converged(protocol) for result in self.seeds)

    def summary(self, protocol: str) -> Summary:
        """Mean, std and n over the seeds; none at all when a seed's curve has not plateaued (`converged`)."""
        return summarize(self.values(protocol) if self.converged(protocol) else [])

    def top1_of(self, protocol: str) -> Summary | str:
        """The row's top-1 over its seeds, or why there is none: "not run" by this preset, "not converged" (a
        seed's curve still rising at a small preset), "missing" from results.csv."""
        if protocol not in self.run.protocols:
            return "not run"
        if not self.converged(protocol):
            return NOT_CONVERGED
        summary = self.summary(protocol)
        return summary if summary.n else "missing"

    @property
    def img_per_s(self) -> float | None:
        logged = [result.img_per_s for result in self.seeds if result.img_per_s is not None]
        return statistics.fmean(logged) if logged else None

    @property
    def hours(self) -> float | None:
        logged = [result.hours for result in self.seeds if result.hours is not None]
        return statistics.fmean(logged) if logged else None


def collect(plan: Plan, state: State) -> list[RunResult]:
    """Each run's latest evaluate row per protocol (a rerun appends newer rows), its trained protocols' late gains,
    throughput, loss curve and hours."""
    with (plan.store / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    results = []
    for run in plan.runs:
        name = run.results_name
        latest = {row["protocol"]: row for row in rows if row["run"] == name}
        top1 = {protocol: float(row["top1"]) for protocol, row in latest.items()}
        top1 |= transfer_top1(plan.store, name) | analysis_values(run.analysis_dir)
        # the random-init and supervised rows share a `random:` name: each takes the curves of its own protocols
        gains = {protocol: float(row["late_gain"]) if row.get("late_gain") else None for protocol, row in latest.items()
                 if protocol in ("linear", "finetune") and protocol in run.protocols}
        pretrained = run.reference is None
        scalars = logged_scalars(run.run_dir) if pretrained else {}
        throughput = [value for _, value in scalars.get(THROUGHPUT_TAG, [])]
        results.append(RunResult(run, {protocol: top1[protocol] for protocol in run.protocols if protocol in top1},
                                 statistics.fmean(throughput) if throughput else None,
                                 state.seconds(run.pretrain) / 3600 if pretrained else None, gains,
                                 loss_fall(scalars.get(LOSS_TAG, [])) if pretrained else None,
                                 plan.setup.preset in GATED_PRESETS))
    return results


def by_row(results: list[RunResult]) -> list[RowResult]:
    """The runs of each row together, rows in their plan order, seeds in seed order."""
    grouped: dict[str, list[RunResult]] = {}
    for result in results:
        grouped.setdefault(result.run.key, []).append(result)
    return [RowResult(sorted(seeds, key=lambda result: result.run.seed)) for seeds in grouped.values()]
