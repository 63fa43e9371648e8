"""A run's hyper-parameters and final metrics for TensorBoard's HParams tab, written so that the tab's columns are the
union over every run of the folder it serves.

Each run gets only a session-start record (`tensorboard.plugins.hparams.summary_v2.hparams_pb`) and its final
metrics as scalars; no experiment summary. With no experiment summary in the folder, TensorBoard's HParams plugin
builds the experiment from the runs' session-start records: every hyper-parameter any run has becomes a column,
marked `differs` where the runs' values differ (those are shown first and by default), and every scalar tag of a run
becomes a metric column (`tensorboard/plugins/hparams/backend_context.py`, `_compute_experiment_from_runs`). An
experiment summary in any one run (what Lightning's `TensorBoardLogger.log_hyperparams` writes with metrics) would
replace that union by that run's own hyper-parameters."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.hparams.metadata import EXPERIMENT_TAG
from tensorboard.plugins.hparams.summary_v2 import hparams_pb
from torch.utils.tensorboard import SummaryWriter

HParamValue = bool | int | float | str
OLD_HPARAMS_FILE_BYTES = 1 << 20  # the event files of older table runs held only HParams and final metrics


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, HParamValue]:
    """Nested dicts as `a/b/c` keys; a class's `init_args` are its own values (`model/init_args/mask_ratio` is
    `model/mask_ratio`); lists and other values as text, None as "None"."""
    flat: dict[str, HParamValue] = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            inner = value.get("init_args") if set(value) <= {"class_path", "init_args"} else None
            flat.update(flatten(inner if isinstance(inner, dict) else value, f"{key}/"))
        elif isinstance(value, (bool, int, float, str)):
            flat[key] = value
        else:
            flat[key] = str(value)
    return flat


def run_hparams(config: dict[str, Any], recipe: str, extra: dict[str, HParamValue],
                trainer_keys: tuple[str, ...]) -> dict[str, HParamValue]:
    """The columns of one run from its saved `config.yaml`: `method` (the model's class name, e.g. MAE), `recipe`
    (the recipe file's stem), `extra` (preset, seed, ...), then `model/...`, `data/...` and the trainer's
    `trainer_keys`."""
    model = config.get("model") or {}
    method = str(model.get("class_path", "")).rpartition(".")[2] if isinstance(model, dict) else ""
    trainer = config.get("trainer") or {}
    nested = {"model": model, "data": config.get("data") or {},
              "trainer": {name: trainer.get(name) for name in trainer_keys}}
    return {"method": method, "recipe": recipe, **extra, **flatten(nested)}


def write_session(run_dir: Path, hparams: dict[str, HParamValue], metrics: dict[str, float],
                  step: int = 0) -> None:
    """Append the run's session-start record and its metrics (scalars at `step`) to a new event file in `run_dir`,
    the run's TensorBoard folder."""
    writer = SummaryWriter(log_dir=str(run_dir))
    try:
        writer.file_writer.add_summary(hparams_pb(hparams, trial_id=run_dir.parent.name + "/" + run_dir.name))
        for name, value in metrics.items():
            writer.add_scalar(name, value, global_step=step)
    finally:
        writer.close()


def remove_experiment_summaries(run_dir: Path, metric_names: set[str]) -> None:
    """Delete the event files of `run_dir` that hold an HParams experiment summary and nothing but HParams records
    and the metrics `metric_names` (what tables wrote before session-start records), printing a line each: one
    experiment summary in the folder hides every other run's hyper-parameters. Training's event files are kept."""
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        if path.stat().st_size > OLD_HPARAMS_FILE_BYTES:
            continue
        tags = {value.tag for event in EventFileLoader(str(path)).Load() for value in event.summary.value}
        if EXPERIMENT_TAG in tags and all(tag.startswith("_hparams_/") or tag in metric_names for tag in tags):
            path.unlink()
            print(f"removed {path}: an HParams experiment summary (written by an older version) that would hide the "
                  "other runs' hyper-parameters", flush=True)
