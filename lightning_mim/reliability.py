"""Crash safety: atomic checkpoint writes, weights-only loading, and early checks of configuration values that would
otherwise fail deep inside a run."""
from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch
from lightning.fabric.plugins import TorchCheckpointIO


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint holds pickled objects that `torch.load(weights_only=True)` refuses (they could run code)."""


def safe_load(path: str | os.PathLike) -> Any:
    """`torch.load(path, weights_only=True, map_location="cpu")` with a clear error for pickles that would run code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(
            f"{path}: refused to load, the file holds objects that only a full unpickle could build (which can run "
            f"arbitrary code). Our own checkpoints load weights-only; if you trust this file, load it yourself with "
            f"torch.load(..., weights_only=False). Details: {error}") from error


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Call `write(handle)` on a temporary file in the target folder, flush + fsync, rename over `path`, fsync the
    folder: a crash at any point leaves either the old file or the new one, never a truncated mix. The file gets
    the permissions a plain `open(path, "wb")` would (mkstemp alone makes it private to the owner)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save(obj, path)` through `atomic_write`."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO that writes checkpoints atomically (see `atomic_torch_save`) and loads them
    weights-only on the CPU (see `safe_load`). ModelCheckpoint's `last.ckpt` (save_last=True) and the SLURM
    `hpc_ckpt_*.ckpt` files are written through `trainer.save_checkpoint`, hence through this plugin."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO takes no storage_options, got {storage_options!r}")
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: str | os.PathLike, map_location: Callable | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if not Path(path).is_file():
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        return safe_load(path)


# Settings a resumed run may change without changing the experiment: how the work is executed and where data lives.
RESUME_MAY_CHANGE = frozenset({
    "model.backbone.grad_checkpointing", "model.optim.fused", "model.optim.max_consecutive_nonfinite",
    "data.num_workers", "data.pin_memory", "data.persistent_workers", "data.data_dir", "data.train_shards",
    "data.val_shards",
})


def _flatten(tree: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: list(tree) if isinstance(tree, tuple) else tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if key != "_instantiator":
            flat |= _flatten(value, f"{prefix}.{key}")
    return flat


def check_same_experiment(checkpoint: dict[str, Any], model_hparams: dict[str, Any],
                          data_hparams: dict[str, Any] | None) -> None:
    """Refuse to resume a checkpoint whose model or data hyper-parameters differ from this run's (other than
    `RESUME_MAY_CHANGE`): that would silently continue another experiment (or fail later on a weight shape)."""
    differences = []
    for section, saved, current in (("model", checkpoint.get("hyper_parameters"), model_hparams),
                                    ("data", checkpoint.get("datamodule_hyper_parameters"), data_hparams)):
        if saved is None or current is None:
            continue
        before, now = _flatten(dict(saved), section), _flatten(dict(current), section)
        for key in sorted(set(before) | set(now)):
            if key not in RESUME_MAY_CHANGE and before.get(key, "<unset>") != now.get(key, "<unset>"):
                differences.append(f"{key}: {before.get(key, '<unset>')!r} in the checkpoint, "
                                   f"{now.get(key, '<unset>')!r} in this run")
    if differences:
        raise ValueError(
            "the checkpoint to resume was written by another configuration:\n  " + "\n  ".join(differences) +
            "\nResume with the checkpoint's settings (drop these overrides), or start a new run in another "
            "folder (a new --checkpoint.dirpath, no --ckpt_path); to start from its weights only, use "
            "`lightning-mim export` and the fine-tuning / evaluation commands")


def check_cell_size(grid: int, cell: int) -> None:
    """SymMIM's checkerboard masks a `grid` x `grid` patch grid in `cell` x `cell` blocks: `cell` must divide it."""
    if grid <= 0 or cell <= 0:
        raise ValueError(f"grid ({grid}) and cell ({cell}) must be positive")
    if grid % cell:
        divisors = [d for d in range(1, grid + 1) if grid % d == 0]
        raise ValueError(f"checkerboard cell size {cell} does not divide the {grid} x {grid} patch grid; "
                         f"choose one of {divisors}")


def check_vocabulary(tokenizer_vocab: int, head_classes: int) -> None:
    """MaPeT predicts tokenizer ids: its head needs exactly one output per vocabulary entry."""
    if tokenizer_vocab <= 0:
        raise ValueError(f"tokenizer vocabulary size must be positive, got {tokenizer_vocab}")
    if tokenizer_vocab != head_classes:
        raise ValueError(f"the prediction head has {head_classes} classes but the tokenizer vocabulary has "
                         f"{tokenizer_vocab} entries; set the head's class count to {tokenizer_vocab}")
