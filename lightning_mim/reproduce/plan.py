"""What `reproduce` and `compare` run: a Plan (a paper's table, or the comparison) of PlannedRuns (a row at one
seed: its pre-training and evaluations), each a list of Stages (one subprocess each)."""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from lightning_mim.eval.encoders import random_run_name, run_name
from lightning_mim.eval.evaluate import PROTOCOLS
from lightning_mim.reproduce.papers import Row
from lightning_mim.reproduce.presets import ReproduceError, Setup, shown


def seed_label(key: str, seed: int) -> str:
    """A row at one seed, as stage keys and job names start: `<key>` at seed 0 (the layout of a single-seed run),
    else `<key>/seed<N>`."""
    return key if seed == 0 else f"{key}/seed{seed}"


def seeds_note(seeds: int) -> str:
    return (f"SEEDS={seeds}: every row pre-trained and evaluated with seeds 0..{seeds - 1} (fit's seed_everything, "
            f"evaluate's --seed); each top-1 cell is the mean, std the sample standard deviation (n - 1; - when n = 1) "
            f"and n the seeds with a result; img/s and wall-clock are means over the seeds.")


# The table columns of a run's `analyze` stage (`results.analysis_values` reads them from its analysis.csv).
ANALYSIS_COLUMNS = ("analysis-rank-patch", "analysis-rank-pooled", "analysis-distance")
# What `evaluate --protocols robustness` scores when no other protocol of the call built a classifier.
ROBUSTNESS_DEFAULT_CLASSIFIERS = ("knn", "logreg")


def result_protocols(protocols: str) -> tuple[str, ...]:
    """The results.csv protocols of one `evaluate --protocols <protocols>` call: each protocol, robustness as one
    `robustness-<classifier>` per classifier of the call's other protocols (fine-tune, k-NN, logistic regression),
    else for k-NN and logistic regression (`eval.robustness`)."""
    names = protocols.split(",")
    classifiers = tuple(name for name in names if name in ("finetune", "knn", "logreg"))
    robustness = tuple(f"robustness-{name}" for name in classifiers or ROBUSTNESS_DEFAULT_CLASSIFIERS)
    return tuple(column for name in names for column in (robustness if name == "robustness" else (name,)))


def check_seeds(seeds: int) -> range:
    """The seeds of SEEDS=seeds: 0..seeds-1."""
    if seeds < 1:
        raise ReproduceError(f"SEEDS must be at least 1, got {seeds}")
    return range(seeds)


@dataclass
class Stage:
    """One subprocess of a row: its command, the fingerprint that decides whether it must run, and its log."""

    key: str
    command: list[str]
    fingerprint: str
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    after: str | None = None
    alternative: str | None = None  # the same stage under the other launcher, printed by dry runs
    expects: Path | None = None  # the file a SLURM job of this stage must leave to count as done

    def shown(self) -> str:
        return " ".join([*(f"{name}={value}" for name, value in self.env.items()), shlex.join(self.command)])


@dataclass
class PlannedRun:
    """One row of the table at one seed: a pre-training and its evaluations."""

    key: str
    method: str
    backbone: str
    references: tuple[Row, ...]  # the paper rows whose reported numbers stand beside this run
    run_dir: Path  # the TensorBoard run: <out>/<key>/<pre-training fingerprint>
    description: str
    devices: int
    protocols: tuple[str, ...]
    stages: list[Stage]
    seed: int = 0  # pre-training's seed_everything and evaluate's --seed
    # A reference row (no pre-training of its own): what its evaluations score, as evaluate's --ckpt takes it
    # (`pixels`, `random:<a run's config.yaml>`); None for a pre-trained row.
    reference: str | None = None
    analysis_dir: Path | None = None  # the `--out` of its analyze stage, if it has one

    @property
    def label(self) -> str:
        return seed_label(self.key, self.seed)

    @property
    def pretrain(self) -> Stage | None:
        return next((stage for stage in self.stages if stage.key.endswith("/pretrain")), None)

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / "checkpoints" / "last.ckpt"

    @property
    def evaluated(self) -> str:
        """What its evaluate stages score: the checkpoint, or the reference's --ckpt value."""
        return shown(self.checkpoint) if self.reference is None else self.reference

    @property
    def results_name(self) -> str:
        """The `run` of its rows in results.csv."""
        if self.reference is None:
            return run_name(self.checkpoint)
        if self.reference.startswith("random:"):
            return random_run_name(Path(self.reference[len("random:"):]))
        return self.reference


@dataclass
class Plan:
    """A paper's (or the comparison's) rows, the notes its table carries, where its table goes (`out`) and the
    preset's folder its runs, state and results share (`store`)."""

    name: str
    title: str
    setup: Setup
    out: Path
    store: Path
    notes: list[str]
    runs: list[PlannedRun]  # the pre-trained rows, then the reference rows (which may read their folders)

    @property
    def protocols(self) -> tuple[str, ...]:
        """The table's protocols: those the runs evaluate and those the paper reports, in evaluate's order, then the
        columns of other data the runs evaluate (transfer sets: `reproduce.transfer`), in run order."""
        wanted = {protocol for run in self.runs for protocol in run.protocols}
        wanted |= {protocol for run in self.runs for row in run.references for protocol in row.reported}
        other = dict.fromkeys(protocol for run in self.runs for protocol in run.protocols if protocol not in PROTOCOLS)
        return tuple(protocol for protocol in PROTOCOLS if protocol in wanted) + tuple(other)
