"""Transfer rows of a paper's table at paper scale (`reproduce <paper> --transfer-data inat2018=/data/inat2018,...`,
Makefile TRANSFER_DATA=): every pre-training of a method with a transfer recipe (MAE, LUT) fine-tuned on each given
ImageFolder, as more evaluation stages of the same run (the pre-training keeps its fingerprint, so a finished one is
reused), with the ImageNet fine-tune stages' devices, effective-batch pinning (`recipe_batch_args`) and SLURM jobs.

A transfer set's results go to `<store>/transfer/<name>/results.csv` (evaluate's rows, protocol `finetune`), its
working folders under `<store>/transfer/<name>/eval/`; the table shows one column per set, named `transfer_<name>`,
beside the paper's number where the spec has one: MAE's own ViT-B numbers for iNat 2017 / 2018 / 2019 (lut.md
section 4, from mae/README.md; `papers.py`); LUT's fine-grained table is not retrievable (unknown), nor which FGVC
sets it used: any other name runs with an `unknown` paper cell.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

from lightning_mim.reproduce.plan import Plan, PlannedRun, Stage
from lightning_mim.reproduce.planning import cli_command
from lightning_mim.reproduce.launch import sbatch_wrap
from lightning_mim.reproduce.presets import ReproduceError, config, recipe_batch_args, shown
from lightning_mim.reproduce.state import fingerprint

# A method's transfer fine-tuning recipe (every value a stated fallback: see the recipe headers).
TRANSFER_RECIPES = {"MAE": "configs/eval/finetune_transfer_mae_vit_b16.yaml",
                    "LUT": "configs/eval/finetune_transfer_lut_vit_b16.yaml"}
# The ImageNet fine-tune stages' data config (its loader workers); the folder is the transfer set's --data-dir.
TRANSFER_DATA_CONFIG = "configs/data/imagenet_folder.yaml"
PREFIX = "transfer_"
SET_NAMES = {"inat2017": "iNat 2017", "inat2018": "iNat 2018", "inat2019": "iNat 2019"}
NAME = re.compile(r"[a-z][a-z0-9_-]*")


def parse_transfer_data(text: str, variable: str = "TRANSFER_DATA",
                        example: str = "inat2018=/data/inat2018,cub200=/data/cub200") -> tuple[tuple[str, str], ...]:
    """`name=folder,name=folder` (TRANSFER_DATA, SHIFT_DATA) -> ((name, folder), ...), names lower-case words
    (inat2018, fgvc_aircraft, imagenet-a)."""
    pairs: list[tuple[str, str]] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, folder = item.partition("=")
        if not NAME.fullmatch(name) or not folder:
            raise ReproduceError(f"{variable} item {item!r} is not name=folder with a lower-case name: write e.g. "
                                 f"{variable}={example}")
        if name in dict(pairs):
            raise ReproduceError(f"{variable} names {name} twice: give each set once")
        pairs.append((name, folder))
    return tuple(pairs)


def transfer_protocol(name: str) -> str:
    return PREFIX + name


def transfer_title(protocol: str) -> str | None:
    """The table's name of a transfer column ("iNat 2018 fine-tune"); None for another protocol."""
    if not protocol.startswith(PREFIX):
        return None
    name = protocol[len(PREFIX):]
    return f"{SET_NAMES.get(name, name)} fine-tune"


def results_folder(store: Path, name: str) -> Path:
    return store / "transfer" / name


def transfer_stage(run: PlannedRun, plan: Plan, recipe: str, name: str, folder: str) -> Stage:
    """`evaluate --protocols finetune` of the run's checkpoint on one transfer set, after its pre-training."""
    setup = plan.setup
    words = ["--protocols", "finetune", "--data-config", config(TRANSFER_DATA_CONFIG), "--data-dir", folder,
             "--accelerator", "gpu", "--finetune-config", config(recipe), "--devices", str(setup.gpus),
             "--strategy", "ddp", *recipe_batch_args(recipe, setup.gpus), *setup.eval_args,
             *(("--seed", str(run.seed)) if run.seed else ())]
    log = run.run_dir / f"transfer-{name}.log"
    command = cli_command("evaluate", "--ckpt", shown(run.checkpoint), "--results",
                          shown(results_folder(plan.store, name)), *words)
    if setup.slurm:
        job_name = f"{run.label.replace('/', '-')}-transfer-{name}"
        command = sbatch_wrap(command, setup.gpus, log, job_name, setup.cpus_per_gpu)
    return Stage(f"{run.label}/transfer {name}", command, fingerprint(words, run.pretrain.fingerprint), log,
                 after=run.pretrain.key)


def add_transfer(plan: Plan, transfer: tuple[tuple[str, str], ...]) -> None:
    """Append a transfer stage per set to every run whose method has a transfer recipe, its column to the run's
    protocols, and the notes that say what the columns are."""
    if not transfer:
        return
    if plan.setup.preset != "paper":
        raise ReproduceError(f"TRANSFER_DATA fine-tunes the paper-scale pre-trainings: use it with PRESET=paper "
                             f"(got PRESET={plan.setup.preset})")
    for run in (run for run in plan.runs if run.reference is None):
        recipe = TRANSFER_RECIPES.get(run.method)
        if recipe is not None:
            run.stages += [transfer_stage(run, plan, recipe, name, folder) for name, folder in transfer]
            run.protocols += tuple(transfer_protocol(name) for name, _ in transfer)
    sets = ", ".join(f"{name} ({folder})" for name, folder in transfer)
    plan.notes.append(f"Transfer columns: each {' / '.join(TRANSFER_RECIPES)} run fine-tuned on {sets} with its "
                      f"method's transfer recipe ({', '.join(TRANSFER_RECIPES.values())}: every value the ImageNet "
                      f"recipe's, as a fallback: the transfer protocol is unknown in the spec); paper: MAE's own ViT-B "
                      f"numbers where lut.md section 4 has them (iNat 2017 / 2018 / 2019), LUT's fine-grained table "
                      f"is not retrievable (unknown).")
    others = sorted({run.method for run in plan.runs} - set(TRANSFER_RECIPES))
    if others:
        plan.notes.append(f"No transfer recipe for {', '.join(others)}: those rows have no transfer stages.")


def transfer_top1(store: Path, run: str) -> dict[str, float]:
    """A run's latest transfer fine-tuning top-1 per set, from `<store>/transfer/<name>/results.csv`."""
    top1: dict[str, float] = {}
    for results in sorted((store / "transfer").glob("*/results.csv")):
        with results.open() as handle:
            for row in csv.DictReader(handle):
                if row["run"] == run and row["protocol"] == "finetune":
                    top1[transfer_protocol(results.parent.name)] = float(row["top1"])
    return top1


__all__ = ["TRANSFER_RECIPES", "add_transfer", "parse_transfer_data", "transfer_title", "transfer_top1"]
