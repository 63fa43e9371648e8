"""Older runs of a row that no table uses move aside, so the preset's TensorBoard folder shows the runs the tables
use: `<store>/<row>/<fingerprint>/` -> `<store>/superseded/<row>/<fingerprint>/` (kept, never deleted).

A run is moved when all of these hold: the table being written uses another fingerprint of the same row at the same
seed (the stage `<row>[/seed<k>]/pretrain` in state.json holds both); no table of the preset (`<store>/*/table.json`,
compare's and every paper's) lists its checkpoint; and its pre-training ended before the current one's (the
checkpoints' modification times). Its state.json records go with it (a stage whose log lay in the moved folder is
forgotten), so planning that fingerprint again trains it again instead of skipping to a missing checkpoint."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from lightning_mim.reproduce.plan import Plan
from lightning_mim.reproduce.presets import shown
from lightning_mim.reproduce.state import State

SUPERSEDED = "superseded"


def runs_in_tables(store: Path) -> set[tuple[str, str]]:
    """(row, fingerprint) of every run a table of the preset lists (its checkpoint is `<row>/<fp>/checkpoints/...`)."""
    used = set()
    for table in store.glob("*/table.json"):
        for record in json.loads(table.read_text()).get("rows", []):
            for checkpoint in record.get("checkpoints", []):
                parts = Path(checkpoint).parts
                if len(parts) >= 4:
                    used.add((parts[-4], parts[-3]))
    return used


def finished_at(run_dir: Path) -> float:
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    return (checkpoint if checkpoint.is_file() else run_dir).stat().st_mtime


def move_superseded(plan: Plan, state: State) -> list[Path]:
    """Move the plan's rows' superseded runs (see the module's doc), printing one line per move; returns the new
    folders."""
    used = runs_in_tables(plan.store)
    moved = []
    for run in plan.runs:
        current = run.run_dir.name
        if run.reference is not None or not run.run_dir.is_dir():  # a reference row reads a run, it has none
            continue
        for old in sorted(state.stages.get(run.pretrain.key, {})):
            old_dir = run.run_dir.parent / old
            if (old == current or (run.key, old) in used or not old_dir.is_dir()
                    or finished_at(old_dir) >= finished_at(run.run_dir)):
                continue
            target = plan.store / SUPERSEDED / run.key / old
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(old_dir), str(target))
            forget_stages_in(state, old_dir)
            with state.update() as stages:  # its HParams record: a run trained again at `old` writes its own
                stages.pop(f"{run.label}/hparams_session", None)
            print(f"superseded: {shown(old_dir)} -> {shown(target)} (an older run of row {run.label}; the tables use "
                  f"{current})", flush=True)
            moved.append(target)
    return moved


def forget_stages_in(state: State, folder: Path) -> None:
    """Drop the state.json records of the stages whose log lies in `folder`."""
    inside = str(folder.resolve())
    with state.update() as stages:
        for key in list(stages):
            kept = {fingerprint: record for fingerprint, record in stages[key].items()
                    if not str(Path(record.get("log", "")).resolve()).startswith(inside + "/")}
            if kept:
                stages[key] = kept
            else:
                del stages[key]
