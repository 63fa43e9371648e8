"""How each table row becomes stages: the `lightning-mim fit` and `evaluate` commands of a row at every seed, with
their fingerprints and logs, for a paper's table (`plan_paper`) and for `compare` (`plan_compare`)."""
from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from lightning_mim.eval.frozen import FROZEN_PROTOCOLS
from lightning_mim.reproduce.papers import (
    COMPARE_ROWS, DEMO_CODEBOOK, DEMO_IMG_SIZE, DEMO_ROWS, DemoRow, Paper, Row,
)
from lightning_mim.reproduce.plan import (
    ANALYSIS_COLUMNS, Plan, PlannedRun, Stage, check_seeds, result_protocols, seed_label, seeds_note,
)
from lightning_mim.reproduce.launch import sbatch_command, sbatch_wrap, torchrun_command
from lightning_mim.reproduce.presets import (
    EvalSpec, ReproduceError, Setup, analyze_args, evaluations, pretrain_args, shown, small_data,
    supervised_evaluation,
)
from lightning_mim.reproduce.state import fingerprint

# One evaluation for every method in `compare` at paper scale: MAE's linear-probe and fine-tuning recipes.
COMPARE_LINEAR = "configs/eval/linear_mae_vit_b16_in1k.yaml"
COMPARE_FINETUNE = "configs/eval/finetune_mae_vit_b16_in1k.yaml"
# Rows whose encoder only its own fine-tuning recipe can take: SimMIM's relative position bias (copied per block).
OWN_FINETUNE = {"simmim"}


def cli_command(*words: str) -> list[str]:
    """`lightning-mim <words>` with this interpreter."""
    return [sys.executable, "-m", "lightning_mim.cli", *words]


def plan_run(setup: Setup, store: Path, key: str, method: str, recipe: str, backbone: str,
             references: tuple[Row, ...], effective_batch: int | None, specs: list[EvalSpec],
             extra_fit: Sequence[str] = (), seed: int = 0) -> PlannedRun:
    """A row's stages at one seed: the pre-training (through torchrun or sbatch at paper scale) and one evaluate per
    spec. Seed 0 adds no argument (every recipe's seed_everything is 0, evaluate's --seed defaults to 0), so its
    fingerprints, stage keys and folder are those of a single-seed run; another seed passes `--seed_everything` to
    fit and `--seed` to evaluate (after FIT_ARGS / EVAL_ARGS, so SEEDS wins), which gives it its own fingerprints
    and run folder."""
    fit_args, description = pretrain_args(setup, recipe, effective_batch)
    if setup.preset == "paper" and setup.nodes > 1 and not setup.slurm:
        description += f"; torchrun: run the same command on nodes 1..{setup.nodes - 1} with their NODE_RANK"
    fit_args += [*extra_fit, "--trainer.enable_progress_bar", "false", *setup.fit_args,
                 *(("--seed_everything", str(seed)) if seed else ())]
    label = seed_label(key, seed)
    pretrain_fingerprint = fingerprint([*fit_args, f"devices={setup.devices}"])
    run_dir = store / key / pretrain_fingerprint
    fit_args += ["--trainer.logger.init_args.save_dir", shown(store), "--trainer.logger.init_args.name", key,
                 "--trainer.logger.init_args.version", pretrain_fingerprint,
                 "--trainer.logger.init_args.default_hp_metric", "false",
                 "--checkpoint.dirpath", shown(run_dir / "checkpoints")]
    log = run_dir / "pretrain.log"
    job_name = label.replace("/", "-")
    if setup.preset != "paper":
        pretrain = Stage(f"{label}/pretrain", cli_command("fit", *fit_args), pretrain_fingerprint, log)
    else:
        torchrun, env = torchrun_command(setup, fit_args)
        launched = [Stage(f"{label}/pretrain", torchrun, pretrain_fingerprint, log, env),
                    Stage(f"{label}/pretrain", sbatch_command(setup, fit_args, log, job_name), pretrain_fingerprint,
                          log)]
        pretrain, other = launched[::-1] if setup.slurm else launched
        pretrain.alternative = other.shown()
    stages = [pretrain]
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    pretrain.expects = checkpoint
    specs = [spec for spec in specs if seed == 0 or not spec.first_seed_only]
    for spec in specs:
        words = ["--protocols", spec.protocols, *spec.args, *setup.eval_args, *(("--seed", str(seed)) if seed else ())]
        log = run_dir / f"evaluate-{spec.protocols.replace(',', '+')}.log"
        command = cli_command("evaluate", "--ckpt", shown(checkpoint), "--results", shown(store), *words)
        if setup.slurm:
            command = sbatch_wrap(command, spec.devices, log, f"{job_name}-evaluate", setup.cpus_per_gpu)
        stages.append(Stage(f"{label}/evaluate {spec.protocols}", command,
                            fingerprint(words, pretrain_fingerprint), log, after=pretrain.key))
    protocols = tuple(column for spec in specs for column in spec.columns or result_protocols(spec.protocols))
    run = PlannedRun(key, method, backbone, references, run_dir, description, setup.devices, protocols, stages, seed)
    add_analysis(setup, run, shown(checkpoint), run_dir / "analysis", pretrain)
    return run


def add_analysis(setup: Setup, run: PlannedRun, ckpt: str, out: Path, pretrain: Stage,
                 extra: Sequence[str] = ()) -> None:
    """The run's `lightning-mim analyze` stage of the encoder `ckpt` into `out` (analysis.csv, spectrum.csv, figures),
    after the pre-training that writes it (or the config a random initialisation reads), and its table columns;
    nothing where the preset analyses nothing."""
    common = analyze_args(setup)
    if common is None:
        return
    words = [*common, *(word for word in extra if word not in common)]
    command = cli_command("analyze", "--ckpt", ckpt, "--out", shown(out), *words)
    log = out.parent / f"{out.name}.log"
    if setup.slurm:
        command = sbatch_wrap(command, 1, log, f"{run.label.replace('/', '-')}-analyze", setup.cpus_per_gpu)
    run.stages.append(Stage(f"{run.label}/analyze", command, fingerprint([ckpt, *words], pretrain.fingerprint), log,
                            after=pretrain.key))
    run.protocols += ANALYSIS_COLUMNS
    run.analysis_dir = out


def codebook_path(store: Path) -> Path:
    return store / "codebooks" / ("fmnist_" + "_".join(DEMO_CODEBOOK[1::2]) + ".safetensors")


def demo_run(setup: Setup, store: Path, demo: DemoRow, references: tuple[Row, ...] = (), seed: int = 0) -> PlannedRun:
    """A method's demo (or smoke) row at the demo image size and one seed; a token method's first stage fits the demo
    codebook (one stage key for every row and seed that reads it, so it is fitted once; its file name holds its
    settings, so a changed setting changes the pre-training's arguments and re-runs it)."""
    path = codebook_path(store)
    extra = [*demo.size_args, *(("--model.tokenizer.path", shown(path)) if demo.codebook else ())]
    run = plan_run(setup, store, demo.key, demo.method, demo.recipe, demo_backbone(setup), references, None,
                   evaluations(setup, None), extra, seed)
    if demo.codebook:
        imagefolder = small_data(setup.data)[1][:2] == ["--data.source", "imagefolder"]
        words = [shown(path), *DEMO_CODEBOOK, "--source", "imagefolder" if imagefolder else "fashion_mnist",
                 *(("--data-dir", setup.data) if setup.data else ()),
                 *(("--max-images", "2000") if setup.preset == "smoke" else ())]
        run.stages.insert(0, Stage(f"tokenizer/{path.stem}", cli_command("tokenizer", "fit", *words),
                                   fingerprint(words), store / "codebooks" / f"{path.stem}.log"))
    return run


def demo_backbone(setup: Setup) -> str:
    return f"ViT micro/4, {DEMO_IMG_SIZE} px, {'synthetic' if setup.preset == 'smoke' else 'Fashion-MNIST'}"


def frozen_spec(specs: list[EvalSpec]) -> EvalSpec | None:
    """The reference rows' evaluation: the frozen-feature protocols (k-NN, logistic regression) of the first spec
    that has any, with its arguments; None when the preset evaluates none."""
    for spec in specs:
        protocols = [protocol for protocol in spec.protocols.split(",") if protocol in FROZEN_PROTOCOLS]
        if protocols:
            return EvalSpec(",".join(protocols), spec.args)
    return None


def reference_stage(setup: Setup, store: Path, label: str, ckpt: str, spec: EvalSpec, log: Path, seed: int,
                    upstream: tuple[str, ...] = (), after: str | None = None) -> Stage:
    words = ["--protocols", spec.protocols, *spec.args, *setup.eval_args, *(("--seed", str(seed)) if seed else ())]
    command = cli_command("evaluate", "--ckpt", ckpt, "--results", shown(store), *words)
    if setup.slurm:
        command = sbatch_wrap(command, 1, log, f"{label.replace('/', '-')}-evaluate", setup.cpus_per_gpu)
    return Stage(f"{label}/evaluate {spec.protocols}", command, fingerprint([ckpt, *words], *upstream), log,
                 after=after)


def supervised_runs(setup: Setup, store: Path, runs: list[PlannedRun]) -> list[PlannedRun]:
    """Supervised from scratch, where the preset affords a converged fine-tuning (`supervised_evaluation`): the
    table's first row's encoder at its random initialisation, fine-tuned like the pre-trained rows, at each seed."""
    spec = supervised_evaluation(setup)
    if spec is None:
        return []
    firsts = {run.seed: run for run in reversed(runs)}
    supervised = []
    for seed, run in sorted(firsts.items()):
        ckpt = f"random:{shown(run.run_dir / 'config.yaml')}"
        log = run.run_dir / "evaluate-supervised-finetune.log"
        stage = reference_stage(setup, store, seed_label(f"supervised_{run.key}", seed), ckpt, spec, log, seed,
                                (run.pretrain.fingerprint,), run.pretrain.key)
        supervised.append(PlannedRun(f"supervised_{run.key}", f"supervised from scratch ({run.method}'s init)",
                                     run.backbone, (), run.run_dir, "the random initialisation fine-tuned", 1,
                                     result_protocols(spec.protocols), [stage], seed, ckpt))
    return supervised


def reference_runs(setup: Setup, store: Path, runs: list[PlannedRun], spec: EvalSpec | None) -> list[PlannedRun]:
    """The rows that say whether pre-training helped, evaluated like the pre-trained rows (`spec`: k-NN and the
    logistic-regression probe): each pre-trained row's encoder at its random initialisation (the run's own saved
    config, so its seed, size and recipe; `random:` reads it after the pre-training wrote it), and the raw pixels
    once, at the table's first seed (n = 1: pixels have no pre-training seed, and their results.csv rows, all named
    `pixels`, could not tell seeds apart; not at paper scale: 150,528-dimensional features of 1.28 M images)."""
    references = supervised_runs(setup, store, runs)
    if spec is None:
        return references
    for run in runs:
        key, config_path = f"{run.key}_random_init", run.run_dir / "config.yaml"
        ckpt = f"random:{shown(config_path)}"
        log = run.run_dir / f"evaluate-random-init-{spec.protocols.replace(',', '+')}.log"
        # a run's config records no data source: --adapt-images sizes the data as the pre-training did
        adapted = spec if "--adapt-images" in spec.args else EvalSpec(spec.protocols, (*spec.args, "--adapt-images"))
        stage = reference_stage(setup, store, seed_label(key, run.seed), ckpt, adapted, log, run.seed,
                                (run.pretrain.fingerprint,), run.pretrain.key)
        references.append(PlannedRun(key, f"{run.method} at random init", run.backbone, (), run.run_dir,
                                     "the pre-training recipe's seeded initialisation, not trained", 1,
                                     result_protocols(spec.protocols), [stage], run.seed, ckpt))
        add_analysis(setup, references[-1], ckpt, run.run_dir / "analysis-random-init", run.pretrain,
                     ("--adapt-images",))
    if setup.preset != "paper":
        folder = store / "pixels"
        for seed in sorted({run.seed for run in runs})[:1]:
            log = folder / f"evaluate-{spec.protocols.replace(',', '+')}-seed{seed}.log"
            stage = reference_stage(setup, store, seed_label("pixels", seed), "pixels", spec, log, seed)
            references.append(PlannedRun("pixels", "raw pixels", "the normalised images, flattened", (), folder,
                                         "no encoder", 1, tuple(spec.protocols.split(",")), [stage], seed, "pixels"))
    return references


def references_notes(setup: Setup, spec: EvalSpec | None) -> list[str]:
    if spec is None:
        return []
    pixels = ("raw pixels: not at paper scale (150,528-dimensional features of 1.28 M images)"
              if setup.preset == "paper" else "pixels: the same protocols on the normalised images, flattened, "
              "once (n = 1: no pre-training seed)")
    supervised = ("supervised_<first row>: that row's random initialisation fine-tuned like the rows"
                  if supervised_evaluation(setup) else "supervised from scratch: not at this preset (no converged "
                  "fine-tuning on the CPU; PRESET=gpu runs it)" if setup.preset in ("smoke", "demo") else
                  "supervised from scratch: the specs' supervised ImageNet baselines are not re-run")
    return [f"Reference rows ({spec.protocols}): <row>_random_init: the row's encoder at its seeded random "
            f"initialisation (the same recipe, not trained); {pixels}; {supervised}."]


def select(runs: list[PlannedRun], rows: Sequence[str] | None) -> list[PlannedRun]:
    if not rows:
        return runs
    unknown = sorted(set(rows) - {run.key for run in runs})
    if unknown:
        keys = ",".join(dict.fromkeys(run.key for run in runs))
        raise ReproduceError(f"unknown ROWS {','.join(unknown)}: choose from {keys}")
    return [run for run in runs if run.key in rows]


def preset_note(setup: Setup) -> str:
    """The scale of a table, and any arguments the user added to its runs."""
    if setup.preset == "paper":
        note = (f"PRESET=paper: ImageNet-1k at {setup.data}, {setup.gpus} GPUs x {setup.nodes} nodes, each row at "
                f"its paper's effective batch.")
    else:
        gpu_data = f"DATA={setup.data} (read as grey images)" if setup.data else "Fashion-MNIST"
        scale = {"smoke": "PRESET=smoke: synthetic images, 6 steps; a test of the pipeline",
                 "demo": f"PRESET=demo: Fashion-MNIST at {DEMO_IMG_SIZE} x {DEMO_IMG_SIZE} px, micro ViT (128 wide, "
                         f"4 deep, patch 4), each method's demo recipe for {setup.demo_steps} steps of batch 256 on "
                         f"the CPU",
                 "gpu": f"PRESET=gpu: {gpu_data} at {DEMO_IMG_SIZE} x {DEMO_IMG_SIZE} px, micro ViT (128 wide, 4 "
                        f"deep, patch 4), each method's demo recipe for {setup.demo_steps} steps of batch 256 on one "
                        f"GPU (bf16); fine-tuning: the small-scale recipe, its column shown only where every seed's "
                        f"curve reached its plateau (Convergence)"}[
            setup.preset]
        note = f"{scale}. These are NOT paper numbers and are not comparable with the paper's ImageNet-1k numbers."
    for name, words in (("FIT_ARGS", setup.fit_args), ("EVAL_ARGS", setup.eval_args)):
        if words:
            note += f" {name}: {shlex.join(words)}."
    return note


def plan_paper(paper: Paper, setup: Setup, out_root: Path, rows: Sequence[str] | None = None, seeds: int = 1) -> Plan:
    """A paper's rows, each at seeds 0..seeds-1 (every row at seed 0 first, then at seed 1, ...)."""
    store = out_root / setup.preset
    notes = [preset_note(setup), seeds_note(seeds), f"Paper columns: ImageNet-1k top-1 (%) as "
                                                    f"../shared/methods/{paper.key}.md reports it; unknown: the spec "
                                                    f"has no such number."]
    if setup.preset == "paper":
        runs = [plan_run(setup, store, row.key, row.method, row.recipe, row.backbone, (row,), row.effective_batch,
                         evaluations(setup, row.finetune_recipe), seed=seed)
                for seed in check_seeds(seeds) for row in paper.rows]
    else:
        runs = [demo_run(setup, store, DEMO_ROWS[key], tuple(row for row in paper.rows if row.demo_key == key), seed)
                for seed in check_seeds(seeds) for key in paper.demo_keys]
        notes += [f"{row.key}: no demo row: Fashion-MNIST is grey, and {row.backbone} needs colour input"
                  for row in paper.rows if row.demo_key not in DEMO_ROWS]
    notes += [f"{row.key}: {row.note}" for row in paper.rows if row.note]
    runs = select(runs, rows)
    spec = frozen_spec(evaluations(setup, None))
    return Plan(paper.key, paper.title, setup, store / paper.key, store, notes + references_notes(setup, spec),
                runs + reference_runs(setup, store, runs, spec))


def plan_compare(setup: Setup, out_root: Path, rows: Sequence[str] | None = None, epochs: int = 800,
                 seeds: int = 1) -> Plan:
    """Every method that exists under one budget, one backbone, one data pipeline and one evaluation, each at seeds
    0..seeds-1."""
    store = out_root / setup.preset
    if setup.preset == "paper":
        runs = [plan_run(setup, store, f"compare_{key}", row.method, row.recipe, row.backbone, (),
                         row.effective_batch,
                         evaluations(setup, row.finetune_recipe if key in OWN_FINETUNE else COMPARE_FINETUNE,
                                     COMPARE_LINEAR), ["--trainer.max_epochs", str(epochs)], seed)
                for seed in check_seeds(seeds) for key, row in COMPARE_ROWS.items()]
        budget = (f"ViT-B/16 at 224 px, each method's paper recipe and effective batch for {epochs} epochs (the token "
                  f"methods with the VQ-KD tokenizer); one evaluation: k-NN, the logistic-regression probe, MAE's "
                  f"linear-probe and fine-tuning recipes (SimMIM: its own fine-tuning recipe, which its relative "
                  f"position bias needs)")
    else:
        runs = [demo_run(setup, store, demo, seed=seed) for seed in check_seeds(seeds) for demo in DEMO_ROWS.values()]
        budget = (f"every method at {DEMO_IMG_SIZE} x {DEMO_IMG_SIZE} px (the SimMIM / SymMIM masks need an 8 x 8 "
                  f"patch grid), its demo recipe with the same budget, data and evaluation; the same runs as the "
                  f"papers' demo tables. Beyond Masking's de-colourisation has no row: Fashion-MNIST is grey")
    runs = select(runs, rows)
    spec = frozen_spec(evaluations(setup, None))
    return Plan("compare", "Every method under one budget, one backbone, one data pipeline and one evaluation",
                setup, store / "compare", store, [preset_note(setup), seeds_note(seeds), budget,
                                                  *references_notes(setup, spec)],
                runs + reference_runs(setup, store, runs, spec))


__all__ = ["codebook_path", "plan_compare", "plan_paper", "plan_run"]
