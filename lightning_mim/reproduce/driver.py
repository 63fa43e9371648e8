"""`lightning-mim reproduce <paper>`: a paper's table rows as resumable stages, then its results table.

    lightning-mim reproduce lut                                    # PRESET=demo: Fashion-MNIST on the CPU
    lightning-mim reproduce lut --preset paper --data /data/imagenet --gpus 8 --nodes 4 --dry-run
    lightning-mim reproduce all --preset smoke
    lightning-mim reproduce lut --seeds 3                          # each row at seeds 0, 1, 2: mean, std, verdicts
    lightning-mim reproduce lut --data /data/imagenet --transfer-data inat2018=/data/inat2018  # + transfer column

Each row is one pre-training (`lightning-mim fit` with the row's recipe composed with the preset's trainer and data)
followed by its evaluations (`lightning-mim evaluate`), each a subprocess with its own log; `--jobs N` runs N rows at
once, each process with its share of the CPU threads. Every paper of a preset, and `compare`, share one folder
`<out>/<preset>/`: `state.json` (every stage's fingerprint, status and wall-clock seconds), `results.csv` /
`results.md` (evaluate's rows), per row `<row>/<fingerprint>/` (the TensorBoard run, `checkpoints/`, the stage logs),
so a run that two tables hold (MAE in LUT's table and in `compare`) trains once. `--seeds N` runs every row N times,
seeded 0..N-1, each seed with its own stages (`<row>/seed<k>/...`; seed 0 keeps the single-seed keys) and folder, so
SEEDS=3 after SEEDS=1 reuses seed 0. Each table is written to `<out>/<preset>/<paper>/`: `table.md` / `table.csv` /
`table.json` (the mean, sample std and n over the seeds beside the paper's numbers, and the verdict of each of the
paper's claims).

A stage is skipped when state.json records it done with the same fingerprint: the sha1 of its arguments, with every
configuration file taken by its content, and of the stage it follows. A changed recipe therefore reruns its
pre-training (into a new folder: the old run stays) and that row's evaluations; a changed evaluation recipe reruns
only the evaluations. An interrupted pre-training resumes from `checkpoints/last.ckpt` (the CLI does so on its own);
a failed stage stops the paper with its log path and leaves the finished stages as they are.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lightning_mim.reproduce.papers import PAPERS
from lightning_mim.reproduce.plan import Plan, PlannedRun, Stage
from lightning_mim.reproduce.planning import plan_compare, plan_paper
from lightning_mim.reproduce.presets import DEMO_STEPS, GPU_STEPS, PRESETS, ReproduceError, Setup, shown
from lightning_mim.reproduce.slurm import DEFAULT_CPUS_PER_GPU, SlurmJobError, node_cpus_per_gpu, submit, wait_for_job
from lightning_mim.reproduce.state import State
from lightning_mim.reproduce.tables import finish_compare, finish_paper
from lightning_mim.reproduce.transfer import add_transfer, parse_transfer_data

LOG_TAIL_LINES = 15


def execute(stage: Stage, env: dict[str, str]) -> int:
    stage.log.parent.mkdir(parents=True, exist_ok=True)
    with stage.log.open("a") as log:
        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {stage.shown()}\n")
        log.flush()
        return subprocess.run(stage.command, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, **env, **stage.env}).returncode


def execute_slurm_job(stage: Stage, say: Callable[[str], None]) -> str | None:
    """Submit a stage's sbatch command and follow the job to its end; None when it did what the stage needs, else
    the line that says what happened."""
    stage.log.parent.mkdir(parents=True, exist_ok=True)
    with stage.log.open("a") as log:
        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {stage.shown()}\n")
    try:
        job_id = submit(stage.command)
        say(f"    SLURM job {job_id} submitted; log: {shown(stage.log)}")
        wait_for_job(job_id, shown(stage.log), stage.expects, say)
    except SlurmJobError as error:
        return str(error)
    return None


def log_tail(path: Path) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    return "\n".join("    " + line for line in lines[-LOG_TAIL_LINES:])


def threads_env(jobs: int) -> dict[str, str]:
    """With `jobs` rows at once, each process gets an equal share of the CPU threads (unless OMP_NUM_THREADS is
    set)."""
    if jobs == 1 or "OMP_NUM_THREADS" in os.environ:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))}


def run_plan(plan: Plan, dry_run: bool, jobs: int = 1) -> State:
    """Run (or, dry, print) every stage that is not done, `jobs` rows at once; raise ReproduceError after the first
    failed stage (the other rows stop after their current stage)."""
    setup = plan.setup
    if (not dry_run and setup.preset == "paper" and not setup.slurm and setup.nodes > 1
            and "MASTER_ADDR" not in os.environ):
        raise ReproduceError(f"NODES={setup.nodes} without SLURM=1: set MASTER_ADDR to node 0's address, and start "
                             f"the torchrun commands that DRY_RUN=1 prints on the other nodes with their NODE_RANK")
    if jobs < 1:
        raise ReproduceError(f"JOBS must be at least 1, got {jobs}")
    state = State(plan.store / "state.json")
    print(f"# {plan.title}\n# {plan.notes[0]}\n# outputs: {shown(plan.out)} (runs: {shown(plan.store)})", flush=True)
    ran: set[str] = set()
    stage_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
    printing = threading.Lock()
    failures: list[tuple[Stage, int, str | None]] = []
    env = threads_env(jobs)

    def say(text: str, file=sys.stdout) -> None:
        with printing:  # rows running at once print whole lines
            print(text, file=file, flush=True)

    def run_row(run: PlannedRun) -> None:
        say(f"# {run.label} ({run.method}, {run.backbone}, seed {run.seed}): {run.description}")
        for stage in run.stages:
            if failures:
                return
            with stage_locks[stage.key]:  # a stage that rows share (the demo codebook) runs once
                if state.done(stage.key, stage.fingerprint) and stage.after not in ran:
                    say(f"[done] {stage.key} (fingerprint {stage.fingerprint}): skipped")
                    continue
                ran.add(stage.key)
                say(f"[{'dry run' if dry_run else 'run'}] {stage.key}  log: {shown(stage.log)}\n    {stage.shown()}")
                if stage.alternative is not None:
                    say(f"    # or, with {'torchrun' if setup.slurm else 'SLURM (SLURM=1)'}:\n    {stage.alternative}")
                if dry_run:
                    continue
                state.start(stage)
                start = time.perf_counter()
                if stage.command[:1] == ["sbatch"]:
                    failure = execute_slurm_job(stage, say)
                    returncode = int(failure is not None)
                else:
                    failure, returncode = None, execute(stage, env)
                seconds = time.perf_counter() - start
                state.finish(stage, "done" if returncode == 0 else "failed", seconds)
                if returncode:
                    failures.append((stage, returncode, failure))
                    say(failure or log_tail(stage.log), file=sys.stderr)
                    return
                say(f"    {stage.key} done in {seconds:.0f} s")

    # the reference rows after the pre-trained ones: a random-init row reads the config its pre-training saved
    for phase in ([run for run in plan.runs if run.reference is None], [run for run in plan.runs if run.reference]):
        if jobs == 1 or dry_run:
            for run in phase:
                run_row(run)
        else:
            with ThreadPoolExecutor(jobs) as pool:
                list(pool.map(run_row, phase))
    if failures:
        stage, returncode, failure = failures[0]
        if failure is not None:
            raise ReproduceError(f"stage {stage.key}: {failure}. Finished stages are kept")
        raise ReproduceError(f"stage {stage.key} failed (exit {returncode}); its log: {shown(stage.log)}. Finished "
                             f"stages are kept: fix the cause and run the same command again")
    return state


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=PRESETS, default=None,
                        help="default: paper when --data is given, else demo")
    parser.add_argument("--data", default=None, help="paper: ImageNet ImageFolder or make-shards folder; demo: the "
                                                     "Fashion-MNIST folder; gpu: that or an ImageFolder")
    parser.add_argument("--gpus", type=int, default=8, help="paper: GPUs per node")
    parser.add_argument("--nodes", type=int, default=1, help="paper: nodes")
    parser.add_argument("--slurm", action="store_true", help="paper: submit experiments/slurm_pretrain.sbatch")
    parser.add_argument("--cpus-per-gpu", type=int, default=None,
                        help=f"SLURM: --cpus-per-task of every job (default: the GPU nodes' CPUs per GPU as sinfo "
                             f"reports them, else {DEFAULT_CPUS_PER_GPU})")
    parser.add_argument("--dry-run", action="store_true", help="print every command without running it")
    parser.add_argument("--rows", default=None, help="comma-separated row keys (default: all)")
    parser.add_argument("--steps", type=int, default=None, help=f"demo / gpu: pre-training steps of every row "
                                                                 f"(default {DEMO_STEPS} / {GPU_STEPS})")
    parser.add_argument("--jobs", type=int, default=1, help="rows run at once, each with its share of the CPU "
                                                            "threads")
    parser.add_argument("--seeds", type=int, default=None, help="runs of every row, pre-training and evaluation "
                                                                "seeded 0..N-1: tables give mean, std and n, and "
                                                                "each claim's verdict (seed 0 is the single-seed run; "
                                                                "default 1, 3 with --preset gpu)")
    parser.add_argument("--out", default="runs/reproduce", help="runs in <out>/<preset>/, tables in "
                                                                "<out>/<preset>/<paper>/")
    parser.add_argument("--fit-args", default="", help="more `lightning-mim fit` arguments for every pre-training")
    parser.add_argument("--eval-args", default="", help="more `lightning-mim evaluate` arguments for every evaluation")
    parser.add_argument("--shift-data", default="",
                        help="paper: name=folder,... distribution-shift ImageFolders of ImageNet wnids (imagenet-a, "
                             "imagenet-r, imagenet-sketch: beside MAE's reported numbers) each fine-tuned row is also "
                             "scored on")


def setup_of(options: argparse.Namespace) -> Setup:
    preset = options.preset or ("paper" if options.data else "demo")
    cpus = options.cpus_per_gpu or (node_cpus_per_gpu() if options.slurm else None) or DEFAULT_CPUS_PER_GPU
    shift = parse_transfer_data(options.shift_data, "SHIFT_DATA", "imagenet-a=/data/imagenet-a,imagenet-r=/data/"
                                                                  "imagenet-r")
    return Setup(preset, options.data, options.gpus, options.nodes, options.slurm,
                 tuple(shlex.split(options.fit_args)), tuple(shlex.split(options.eval_args)), options.steps, cpus,
                 shift)


def seeds_of(options: argparse.Namespace, setup: Setup) -> int:
    """SEEDS as given, else the preset's default."""
    return setup.default_seeds if options.seeds is None else options.seeds


def main(argv: list[str] | None = None) -> list[Plan]:
    parser = argparse.ArgumentParser(prog="lightning-mim reproduce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paper", choices=(*PAPERS, "all"))
    add_options(parser)
    parser.add_argument("--transfer-data", default="",
                        help="paper: name=folder,... ImageFolders (train/, val/) each MAE / LUT pre-training is also "
                             "fine-tuned on (inat2017, inat2018, inat2019: beside MAE's reported numbers)")
    options = parser.parse_args(argv)
    plans = []
    try:
        setup = setup_of(options)
        if options.paper == "all" and options.rows:
            raise ReproduceError("ROWS selects rows of one paper: use it with one paper's target (reproduce-lut, ...)")
        rows = options.rows.split(",") if options.rows else None
        transfer = parse_transfer_data(options.transfer_data)
        for paper in PAPERS.values() if options.paper == "all" else [PAPERS[options.paper]]:
            plan = plan_paper(paper, setup, Path(options.out), rows, seeds_of(options, setup))
            add_transfer(plan, transfer)
            state = run_plan(plan, options.dry_run, options.jobs)
            if not options.dry_run:
                finish_paper(plan, state)
            plans.append(plan)
    except ReproduceError as error:
        raise SystemExit(f"lightning-mim reproduce: {error}") from None
    return plans


def main_compare(argv: list[str] | None = None) -> Plan:
    parser = argparse.ArgumentParser(prog="lightning-mim compare", description=plan_compare.__doc__)
    add_options(parser)
    parser.add_argument("--epochs", type=int, default=800, help="paper: the pre-training budget of every method")
    options = parser.parse_args(argv)
    try:
        setup = setup_of(options)
        plan = plan_compare(setup, Path(options.out), options.rows.split(",") if options.rows else None,
                            options.epochs, seeds_of(options, setup))
        state = run_plan(plan, options.dry_run, options.jobs)
        if not options.dry_run:
            finish_compare(plan, state)
    except ReproduceError as error:
        raise SystemExit(f"lightning-mim compare: {error}") from None
    return plan
