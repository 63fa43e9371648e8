"""What makes `evaluate`'s linear probe and fine-tuning survive a kill or a SLURM requeue: a working folder per
(encoder, protocol, recipe, settings) holding `last.ckpt` (written atomically at the end of every epoch, with every
rank's random generator states) and, once the protocol has finished, `result.json`. A rerun of the same command
resumes from `last.ckpt` (same data order, same lr step) or, when `result.json` exists, reports it without training.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any, Sequence

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment

from lightning_mim.callbacks import MIMCheckpoint, RequeueAtStepBoundary
from lightning_mim.data.imagefolder import class_folders
from lightning_mim.reliability import AtomicCheckpointIO, ResumeLoaderPosition, RNGState, atomic_write

RESULT_NAME = "result.json"
LAST_NAME = "last.ckpt"
# settings that change where or how fast the data are read, not what is trained (as RESUME_MAY_CHANGE for `fit`)
NOT_IN_FINGERPRINT = frozenset({"num_workers", "pin_memory", "persistent_workers", "data_dir", "train_shards",
                                "val_shards", "augment_on", "decode_on"})


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes: two encoders saved under the same name (a pre-training's `last.ckpt` at two
    epochs) get different working folders."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def working_folder(root: Path, encoder_run: str, encoder_digest: str, protocol: str, recipe: Path,
                   settings: dict[str, Any]) -> Path:
    """`<root>/<encoder run>/<protocol>-<recipe name>-<fingerprint>`: the fingerprint hashes the encoder's bytes,
    the recipe and every setting that changes the result (data, epochs, seed, batch, devices). An image folder's
    path is left out (moving the data keeps a run resumable) but its training classes are not: the same recipe
    fine-tuned on two transfer sets gets two working folders."""
    kept = {key: value for key, value in settings.items() if key not in NOT_IN_FINGERPRINT}
    if settings.get("source") == "imagefolder" and settings.get("data_dir"):
        names = "\n".join(class_folders(settings["data_dir"], "train"))
        kept["train_classes"] = hashlib.sha256(names.encode()).hexdigest()
    text = json.dumps({"encoder": encoder_digest, "protocol": protocol, "settings": kept}, sort_keys=True,
                      default=str)
    fingerprint = hashlib.sha256(text.encode()).hexdigest()[:10]
    encoder_folder = re.sub(r"[^A-Za-z0-9._-]+", "_", encoder_run).strip("_") or "encoder"
    return root / encoder_folder / f"{protocol}-{recipe.stem}-{fingerprint}"


class BestTop1(L.Callback):
    """Tracks the best `val/top1` over the validated epochs (and its epoch); its state travels in the checkpoint,
    so a resumed run keeps the best of the epochs before the kill."""

    def __init__(self) -> None:
        self.best: float | None = None
        self.best_epoch: int | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or "val/top1" not in trainer.callback_metrics:
            return
        top1 = float(trainer.callback_metrics["val/top1"])
        if self.best is None or top1 > self.best:
            self.best, self.best_epoch = top1, trainer.current_epoch + 1

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best, self.best_epoch = state_dict["best"], state_dict["best_epoch"]


def resumable_trainer_arguments(folder: Path) -> dict[str, Any]:
    """`L.Trainer` arguments that write `folder/last.ckpt` atomically at the end of every training epoch (after
    that epoch's validation) and keep every rank's random streams in it."""
    # the one kept checkpoint is named `last`, so every epoch replaces it (Lightning 2.6 writes a save_last file only
    # beside a top-k one: this writes one file instead of two)
    checkpoint = MIMCheckpoint(dirpath=folder, filename=Path(LAST_NAME).stem, save_top_k=1, every_n_epochs=1,
                               save_on_train_epoch_end=True, enable_version_counter=False)
    # default_root_dir: a SLURM job signalled before its time limit writes its hpc_ckpt_<n>.ckpt there at a step
    # boundary (RequeueAtStepBoundary, as pre-training does; Lightning's own mid-step handler is switched off) and
    # is requeued; the rerun resumes from it (`resume_path`)
    plugins: list[Any] = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return {"callbacks": [checkpoint, RNGState(), ResumeLoaderPosition(), RequeueAtStepBoundary()], "plugins": plugins,
            "enable_checkpointing": True, "default_root_dir": str(folder)}


def resume_path(folder: Path) -> Path | None:
    """The newest of `folder/last.ckpt` (end of an epoch) and the `hpc_ckpt_<n>.ckpt` a signalled SLURM job wrote
    (mid-epoch), when an earlier run of the same evaluation left one."""
    found = [path for path in (folder / LAST_NAME, *folder.glob("hpc_ckpt_*.ckpt")) if path.is_file()]
    return max(found, key=lambda path: path.stat().st_mtime_ns) if found else None


def upgrade_csv(path: Path, columns: Sequence[str]) -> None:
    """Rewrite a results.csv written with other columns (an older version's) with `columns` first, its rows kept
    (new cells empty), so that rows appended with today's columns stay readable (atomically)."""
    if not path.exists():
        return
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        rows, fields = list(reader), reader.fieldnames or []
    if list(fields) == list(columns):
        return
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=[*columns, *(field for field in fields if field not in columns)],
                            restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda handle: handle.write(text.getvalue().encode()))


def read_result(folder: Path) -> dict[str, Any] | None:
    path = folder / RESULT_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def write_result(folder: Path, result: dict[str, Any]) -> None:
    atomic_write(folder / RESULT_NAME, lambda handle: handle.write(json.dumps(result, indent=1).encode()))


__all__ = ["BestTop1", "file_digest", "read_result", "resumable_trainer_arguments", "resume_path", "upgrade_csv",
           "working_folder", "write_result"]
