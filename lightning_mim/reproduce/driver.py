"""`lightning-mim reproduce <paper>`: a paper's table rows as resumable stages, then its results table.

    lightning-mim reproduce lut                                    # PRESET=demo: Fashion-MNIST on the CPU
    lightning-mim reproduce lut --preset paper --data /data/imagenet --gpus 8 --nodes 4 --dry-run
    lightning-mim reproduce all --preset smoke

Each row is one pre-training (`lightning-mim fit` with the row's recipe composed with the preset's trainer and data)
followed by its evaluations (`lightning-mim evaluate`), each a subprocess with its own log. Outputs go to
`<out>/<preset>/<paper>/`: `state.json` (every stage's fingerprint, status and wall-clock seconds), `results.csv` /
`results.md` (evaluate's rows), `table.md` / `table.csv` / `table.json` (the paper's numbers beside this run's), and
per row `<row>/<fingerprint>/`: the TensorBoard run, `checkpoints/`, and the stage logs.

A stage is skipped when state.json records it done with the same fingerprint: the sha1 of its arguments, with every
configuration file taken by its content, and of the stage it follows. A changed recipe therefore reruns its
pre-training (into a new folder: the old run stays) and that row's evaluations; a changed evaluation recipe reruns
only the evaluations. An interrupted pre-training resumes from `checkpoints/last.ckpt` (the CLI does so on its own);
a failed stage stops the paper with its log path and leaves the finished stages as they are.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lightning_mim.eval.evaluate import PROTOCOLS
from lightning_mim.reproduce.papers import COMPARE_ROWS, DEMO_CODEBOOKS, DEMO_RECIPES, PAPERS, Paper, Row
from lightning_mim.reproduce.presets import (
    EvalSpec, ReproduceError, Setup, evaluations, pretrain_args, sbatch_command, sbatch_wrap, shown,
    torchrun_command,
)

LOG_TAIL_LINES = 15
# One evaluation for every method in `compare` at paper scale: MAE's linear-probe and fine-tuning recipes.
COMPARE_LINEAR = "configs/eval/linear_mae_vit_b16_in1k.yaml"
COMPARE_FINETUNE = "configs/eval/finetune_mae_vit_b16_in1k.yaml"
# Compare at demo and smoke scale runs every method at 32 px: the SimMIM / SymMIM masks need the 8 x 8 patch grid.
COMPARE_IMG_SIZE = 32


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

    def shown(self) -> str:
        return " ".join([*(f"{name}={value}" for name, value in self.env.items()), shlex.join(self.command)])


@dataclass
class PlannedRun:
    """One row of the table: a pre-training and its evaluations."""

    key: str
    method: str
    backbone: str
    references: tuple[Row, ...]  # the paper rows whose reported numbers stand beside this run
    run_dir: Path  # the TensorBoard run: <out>/<key>/<pre-training fingerprint>
    description: str
    devices: int
    protocols: tuple[str, ...]
    stages: list[Stage]

    @property
    def pretrain(self) -> Stage:
        return next(stage for stage in self.stages if stage.key.endswith("/pretrain"))

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / "checkpoints" / "last.ckpt"


@dataclass
class Plan:
    """A paper's (or the comparison's) rows, where they write, and the notes its table carries."""

    name: str
    title: str
    setup: Setup
    out: Path
    notes: list[str]
    runs: list[PlannedRun]

    @property
    def protocols(self) -> tuple[str, ...]:
        """The table's protocols: those the runs evaluate and those the paper reports, in evaluate's order."""
        wanted = {protocol for run in self.runs for protocol in run.protocols}
        wanted |= {protocol for run in self.runs for row in run.references for protocol in row.reported}
        return tuple(protocol for protocol in PROTOCOLS if protocol in wanted)


class State:
    """`state.json`: per stage key and fingerprint, the status of its last attempt (running, done, failed), its log,
    its attempts and their summed wall-clock seconds. Every fingerprint keeps its own record, so a changed
    configuration that fails, or is reverted, leaves the record of the finished one as it was."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.stages: dict[str, dict[str, dict]] = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key: str, fingerprint: str) -> dict | None:
        return self.stages.get(key, {}).get(fingerprint)

    def done(self, key: str, fingerprint: str) -> bool:
        record = self.get(key, fingerprint)
        return record is not None and record["status"] == "done"

    def start(self, stage: Stage) -> None:
        previous = self.get(stage.key, stage.fingerprint) or {"attempts": 0, "seconds": 0.0}
        self.stages.setdefault(stage.key, {})[stage.fingerprint] = {
            "status": "running", "log": shown(stage.log), "attempts": previous["attempts"] + 1,
            "seconds": previous["seconds"]}
        self.save()

    def finish(self, stage: Stage, status: str, seconds: float) -> None:
        record = self.stages[stage.key][stage.fingerprint]
        record["status"] = status
        record["seconds"] += seconds
        self.save()

    def record(self, key: str, fingerprint: str) -> None:
        """An in-process stage (logging to TensorBoard) as done."""
        self.stages.setdefault(key, {})[fingerprint] = {"status": "done", "attempts": 1, "seconds": 0.0}
        self.save()

    def seconds(self, stage: Stage) -> float:
        return self.stages[stage.key][stage.fingerprint]["seconds"]

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".json.partial")
        partial.write_text(json.dumps(self.stages, indent=1, sort_keys=True) + "\n")
        partial.replace(self.path)


def fingerprint(words: Sequence[str], *upstream: str) -> str:
    """sha1 (10 hex digits) of a stage's arguments, a configuration file counted by its content (so the same
    stage launched from another folder keeps its fingerprint), and of the fingerprints it depends on."""
    parts = [f"file:{hashlib.sha1(Path(word).read_bytes()).hexdigest()}"
             if word.endswith(".yaml") and Path(word).is_file() else word for word in words]
    return hashlib.sha1(json.dumps([parts, list(upstream)]).encode()).hexdigest()[:10]


def cli_command(*words: str) -> list[str]:
    """`lightning-mim <words>` with this interpreter."""
    return [sys.executable, "-m", "lightning_mim.cli", *words]


def plan_run(setup: Setup, out: Path, key: str, method: str, recipe: str, backbone: str,
             references: tuple[Row, ...], effective_batch: int | None, specs: list[EvalSpec],
             extra_fit: Sequence[str] = ()) -> PlannedRun:
    """A row's stages: the pre-training (through torchrun or sbatch at paper scale) and one evaluate per spec."""
    fit_args, description = pretrain_args(setup, recipe, effective_batch)
    if setup.preset == "paper" and setup.nodes > 1 and not setup.slurm:
        description += f"; torchrun: run the same command on nodes 1..{setup.nodes - 1} with their NODE_RANK"
    fit_args += [*extra_fit, "--trainer.enable_progress_bar", "false", *setup.fit_args]
    pretrain_fingerprint = fingerprint([*fit_args, f"devices={setup.devices}"])
    run_dir = out / key / pretrain_fingerprint
    fit_args += ["--trainer.logger.init_args.save_dir", shown(out), "--trainer.logger.init_args.name", key,
                 "--trainer.logger.init_args.version", pretrain_fingerprint,
                 "--trainer.logger.init_args.default_hp_metric", "false",
                 "--checkpoint.dirpath", shown(run_dir / "checkpoints")]
    log = run_dir / "pretrain.log"
    if setup.preset != "paper":
        pretrain = Stage(f"{key}/pretrain", cli_command("fit", *fit_args), pretrain_fingerprint, log)
    else:
        torchrun, env = torchrun_command(setup, fit_args)
        launched = [Stage(f"{key}/pretrain", torchrun, pretrain_fingerprint, log, env),
                    Stage(f"{key}/pretrain", sbatch_command(setup, fit_args, log, key), pretrain_fingerprint, log)]
        pretrain, other = launched[::-1] if setup.slurm else launched
        pretrain.alternative = other.shown()
    stages = [pretrain]
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    for spec in specs:
        words = ["--protocols", spec.protocols, *spec.args, *setup.eval_args]
        log = run_dir / f"evaluate-{spec.protocols.replace(',', '+')}.log"
        command = cli_command("evaluate", "--ckpt", shown(checkpoint), "--results", shown(out), *words)
        if setup.slurm:
            command = sbatch_wrap(command, spec.devices, log, f"{key}-evaluate")
        stages.append(Stage(f"{key}/evaluate {spec.protocols}", command,
                            fingerprint(words, pretrain_fingerprint), log, after=pretrain.key))
    protocols = tuple(protocol for spec in specs for protocol in spec.protocols.split(","))
    return PlannedRun(key, method, backbone, references, run_dir, description, setup.devices, protocols, stages)


def codebook_path(out: Path, method: str) -> Path:
    return out / "codebooks" / ("fmnist_" + "_".join(DEMO_CODEBOOKS[method][1::2]) + ".safetensors")


def codebook_fit_args(setup: Setup, out: Path, method: str) -> list[str]:
    """A token method's demo pre-training reads the codebook its tokenizer-fit stage writes."""
    return ["--model.tokenizer.path", shown(codebook_path(out, method))] if method in DEMO_CODEBOOKS else []


def with_codebook(run: PlannedRun, setup: Setup, out: Path) -> PlannedRun:
    """Put the `tokenizer fit` stage of a token method's demo codebook before its pre-training: one stage key per
    codebook, so rows sharing it fit it once. The codebook's file name holds its settings, so a changed setting
    changes the pre-training's arguments and re-runs it."""
    if run.method not in DEMO_CODEBOOKS:
        return run
    path = codebook_path(out, run.method)
    words = [str(shown(path)), *DEMO_CODEBOOKS[run.method], "--source", "fashion_mnist",
             *(("--data-dir", setup.data) if setup.data else ()), *(("--max-images", "2000")
                                                                   if setup.preset == "smoke" else ())]
    fit = Stage(f"tokenizer/{path.stem}", cli_command("tokenizer", "fit", *words), fingerprint(words),
                out / "codebooks" / f"{path.stem}.log")
    run.stages.insert(0, fit)
    return run


def demo_backbone(setup: Setup, img_size: int | None = None) -> str:
    size = f", {img_size} px" if img_size else ""
    return f"ViT micro/4{size}, {'synthetic' if setup.preset == 'smoke' else 'Fashion-MNIST'}"


def select(runs: list[PlannedRun], rows: Sequence[str] | None) -> list[PlannedRun]:
    if not rows:
        return runs
    unknown = sorted(set(rows) - {run.key for run in runs})
    if unknown:
        raise ReproduceError(f"unknown ROWS {','.join(unknown)}: choose from {','.join(run.key for run in runs)}")
    return [run for run in runs if run.key in rows]


def preset_note(setup: Setup) -> str:
    """The scale of a table, and any arguments the user added to its runs."""
    if setup.preset == "paper":
        note = (f"PRESET=paper: ImageNet-1k at {setup.data}, {setup.gpus} GPUs x {setup.nodes} nodes, each row at "
                f"its paper's effective batch.")
    else:
        scale = ("PRESET=smoke: synthetic images, 6 steps; a test of the pipeline" if setup.preset == "smoke" else
                 "PRESET=demo: Fashion-MNIST, micro ViT (128 wide, 4 deep, patch 4), the demo recipes' 1,000 steps "
                 "of batch 256 on the CPU")
        note = f"{scale}. These are NOT paper numbers and are not comparable with the paper's ImageNet-1k numbers."
    for name, words in (("FIT_ARGS", setup.fit_args), ("EVAL_ARGS", setup.eval_args)):
        if words:
            note += f" {name}: {shlex.join(words)}."
    return note


def plan_paper(paper: Paper, setup: Setup, out_root: Path, rows: Sequence[str] | None = None) -> Plan:
    out = out_root / setup.preset / paper.key
    if setup.preset == "paper":
        runs = [plan_run(setup, out, row.key, row.method, row.recipe, row.backbone, (row,), row.effective_batch,
                         evaluations(setup, row.finetune_recipe)) for row in paper.rows]
    else:
        runs = [with_codebook(plan_run(setup, out, method.lower(), method, DEMO_RECIPES[method], demo_backbone(setup),
                                       tuple(row for row in paper.rows if row.method == method), None,
                                       evaluations(setup, None), codebook_fit_args(setup, out, method)),
                              setup, out)
                for method in paper.methods]
    notes = [preset_note(setup), f"Paper columns: ImageNet-1k top-1 (%) as ../shared/methods/{paper.key}.md reports "
                                 f"it; unknown: the spec has no such number."]
    notes += [f"{row.key}: {row.note}" for row in paper.rows if row.note]
    return Plan(paper.key, paper.title, setup, out, notes, select(runs, rows))


def plan_compare(setup: Setup, out_root: Path, rows: Sequence[str] | None = None, epochs: int = 800) -> Plan:
    """Every method that exists under one budget, one backbone, one data pipeline and one evaluation."""
    out = out_root / setup.preset / "compare"
    if setup.preset == "paper":
        specs = evaluations(setup, COMPARE_FINETUNE, COMPARE_LINEAR)
        runs = [plan_run(setup, out, row.method.lower(), row.method, row.recipe, row.backbone, (), row.effective_batch,
                         specs, ["--trainer.max_epochs", str(epochs)]) for row in COMPARE_ROWS]
        budget = (f"ViT-B/16 at 224 px, each method's paper recipe and effective batch for {epochs} epochs; one "
                  f"evaluation: k-NN, MAE's linear-probe and fine-tuning recipes")
    else:
        specs = evaluations(setup, None)
        runs = [plan_run(setup, out, row.method.lower(), row.method, DEMO_RECIPES[row.method],
                         demo_backbone(setup, COMPARE_IMG_SIZE), (), None, specs,
                         ["--model.backbone.img_size", str(COMPARE_IMG_SIZE)]) for row in COMPARE_ROWS]
        budget = (f"every method at {COMPARE_IMG_SIZE} x {COMPARE_IMG_SIZE} px (the SimMIM / SymMIM masks need an "
                  f"8 x 8 patch grid; MAE and LUT run with --model.backbone.img_size {COMPARE_IMG_SIZE}), its demo "
                  f"recipe with the same budget, data and evaluation")
    return Plan("compare", "Every method under one budget, one backbone, one data pipeline and one evaluation",
                setup, out, [preset_note(setup), budget], select(runs, rows))


def execute(stage: Stage) -> int:
    stage.log.parent.mkdir(parents=True, exist_ok=True)
    with stage.log.open("a") as log:
        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {stage.shown()}\n")
        log.flush()
        return subprocess.run(stage.command, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, **stage.env}).returncode


def log_tail(path: Path) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    return "\n".join("    " + line for line in lines[-LOG_TAIL_LINES:])


def run_plan(plan: Plan, dry_run: bool) -> State:
    """Run (or, dry, print) every stage that is not done; raise ReproduceError at the first failed stage."""
    setup = plan.setup
    if (not dry_run and setup.preset == "paper" and not setup.slurm and setup.nodes > 1
            and "MASTER_ADDR" not in os.environ):
        raise ReproduceError(f"NODES={setup.nodes} without SLURM=1: set MASTER_ADDR to node 0's address, and start "
                             f"the torchrun commands that DRY_RUN=1 prints on the other nodes with their NODE_RANK")
    state = State(plan.out / "state.json")
    print(f"# {plan.title}\n# {plan.notes[0]}\n# outputs: {shown(plan.out)}", flush=True)
    ran: set[str] = set()
    for run in plan.runs:
        print(f"# {run.key} ({run.method}, {run.backbone}): {run.description}", flush=True)
        for stage in run.stages:
            if state.done(stage.key, stage.fingerprint) and stage.after not in ran:
                print(f"[done] {stage.key} (fingerprint {stage.fingerprint}): skipped", flush=True)
                continue
            ran.add(stage.key)
            print(f"[{'dry run' if dry_run else 'run'}] {stage.key}  log: {shown(stage.log)}\n    {stage.shown()}",
                  flush=True)
            if stage.alternative is not None:
                print(f"    # or, with {'torchrun' if setup.slurm else 'SLURM (SLURM=1)'}:\n    {stage.alternative}")
            if dry_run:
                continue
            state.start(stage)
            start = time.perf_counter()
            returncode = execute(stage)
            seconds = time.perf_counter() - start
            state.finish(stage, "done" if returncode == 0 else "failed", seconds)
            if returncode:
                print(log_tail(stage.log), file=sys.stderr)
                raise ReproduceError(f"stage {stage.key} failed (exit {returncode}); its log: {shown(stage.log)}. "
                                     f"Finished stages are kept: fix the cause and run the same command again")
            print(f"    done in {seconds:.0f} s", flush=True)
    return state


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=("smoke", "demo", "paper"), default=None,
                        help="default: paper when --data is given, else demo")
    parser.add_argument("--data", default=None, help="paper: ImageNet ImageFolder or make-shards folder; demo: the "
                                                     "Fashion-MNIST folder")
    parser.add_argument("--gpus", type=int, default=8, help="paper: GPUs per node")
    parser.add_argument("--nodes", type=int, default=1, help="paper: nodes")
    parser.add_argument("--slurm", action="store_true", help="paper: submit experiments/slurm_pretrain.sbatch")
    parser.add_argument("--dry-run", action="store_true", help="print every command without running it")
    parser.add_argument("--rows", default=None, help="comma-separated row keys (default: all)")
    parser.add_argument("--out", default="runs/reproduce", help="outputs: <out>/<preset>/<paper>/")
    parser.add_argument("--fit-args", default="", help="more `lightning-mim fit` arguments for every pre-training")
    parser.add_argument("--eval-args", default="", help="more `lightning-mim evaluate` arguments for every evaluation")


def setup_of(options: argparse.Namespace) -> Setup:
    preset = options.preset or ("paper" if options.data else "demo")
    return Setup(preset, options.data, options.gpus, options.nodes, options.slurm,
                 tuple(shlex.split(options.fit_args)), tuple(shlex.split(options.eval_args)))


def main(argv: list[str] | None = None) -> list[Plan]:
    from lightning_mim.reproduce.tables import finish_paper

    parser = argparse.ArgumentParser(prog="lightning-mim reproduce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paper", choices=(*PAPERS, "all"))
    add_options(parser)
    options = parser.parse_args(argv)
    plans = []
    try:
        setup = setup_of(options)
        if options.paper == "all" and options.rows:
            raise ReproduceError("ROWS selects rows of one paper: use it with reproduce-lut or reproduce-symmim")
        rows = options.rows.split(",") if options.rows else None
        for paper in PAPERS.values() if options.paper == "all" else [PAPERS[options.paper]]:
            plan = plan_paper(paper, setup, Path(options.out), rows)
            state = run_plan(plan, options.dry_run)
            if not options.dry_run:
                finish_paper(plan, state)
            plans.append(plan)
    except ReproduceError as error:
        raise SystemExit(f"lightning-mim reproduce: {error}") from None
    return plans


def main_compare(argv: list[str] | None = None) -> Plan:
    from lightning_mim.reproduce.tables import finish_compare

    parser = argparse.ArgumentParser(prog="lightning-mim compare", description=plan_compare.__doc__)
    add_options(parser)
    parser.add_argument("--epochs", type=int, default=800, help="paper: the pre-training budget of every method")
    options = parser.parse_args(argv)
    try:
        plan = plan_compare(setup_of(options), Path(options.out), options.rows.split(",") if options.rows else None,
                            options.epochs)
        state = run_plan(plan, options.dry_run)
        if not options.dry_run:
            finish_compare(plan, state)
    except ReproduceError as error:
        raise SystemExit(f"lightning-mim compare: {error}") from None
    return plan
