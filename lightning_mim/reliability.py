"""Crash safety: atomic checkpoint writes, weights-only loading, and early checks of configuration values that would
otherwise fail deep inside a run."""
from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable

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


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the target folder, flush + fsync, rename over `path`, fsync the folder: a
    crash at any point leaves either the old file or the new one, never a truncated mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


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
