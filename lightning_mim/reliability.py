"""Crash safety: atomic checkpoint writes, weights-only loading, per-rank random streams that resume exactly, and
early checks of configuration values that would otherwise fail deep inside a run (among them the process layout a
cluster launcher started)."""
from __future__ import annotations

import os
import pickle
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
import torch
from lightning import LightningModule, Trainer
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.pytorch import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn


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
    "data.val_shards", "data.augment_on", "data.decode_on",
})


def _process_rng_state() -> dict[str, Any]:
    # numpy's state as plain lists so the checkpoint still loads weights-only
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {"python": random.getstate(), "numpy": [kind, keys.tolist(), position, has_gauss, cached],
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_process_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_process(seed: int) -> None:
    """Seed python's, numpy's and torch's (CPU and every CUDA device) generators, as `seed_everything` does but
    leaving its PL_GLOBAL_SEED (the run's seed, which `RNGState.setup` reads) as it is."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class RNGState(Callback):
    """Per-process random streams that a resume continues exactly.

    Under DDP every process starts from the same seed (`seed_everything`, then Lightning's re-seed when the process
    group starts), so every rank would draw the same masks, augmentation parameters and drop-path keeps for its
    samples. At the start of fit each rank r of a multi-process run is re-seeded with seed + r (MAE's convention);
    one process keeps its stream as it is. Every checkpoint holds the python, numpy and torch (CPU and CUDA)
    generator states of every rank (gathered from all ranks when it is written), and a resume gives each rank its
    own. Resuming on another number of processes cannot continue the streams: ranks the checkpoint does not have are
    seeded afresh, with a warning."""

    def __init__(self) -> None:
        self.rank, self.world_size, self.seed = 0, 1, 0

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.rank, self.world_size = trainer.global_rank, trainer.world_size
        self.seed = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed()))
        if stage == "fit" and self.world_size > 1:
            seed_process(self.seed + self.rank)

    def state_dict(self) -> dict[str, Any]:
        state = _process_rng_state()
        if self.world_size == 1 or not torch.distributed.is_initialized():
            return {"ranks": [state]}
        ranks: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(ranks, state)
        return {"ranks": ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ranks = state_dict.get("ranks", [state_dict])  # checkpoints before per-rank states held one process's
        if len(ranks) != self.world_size:
            rank_zero_warn(f"The checkpoint holds the random generator states of {len(ranks)} process(es) and this "
                           f"run has {self.world_size}: the random streams (masks, augmentations, drop-path) do not "
                           f"continue exactly; ranks beyond the checkpoint's are seeded with seed + rank.")
        if self.rank < len(ranks):
            _set_process_rng_state(ranks[self.rank])
        else:
            seed_process(self.seed + self.rank)


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


def check_vocabulary(tokenizer_vocab: int, head_classes: int) -> None:
    """MaPeT predicts tokenizer ids: its head needs exactly one output per vocabulary entry."""
    if tokenizer_vocab <= 0:
        raise ValueError(f"tokenizer vocabulary size must be positive, got {tokenizer_vocab}")
    if tokenizer_vocab != head_classes:
        raise ValueError(f"the prediction head has {head_classes} classes but the tokenizer vocabulary has "
                         f"{tokenizer_vocab} entries; set the head's class count to {tokenizer_vocab}")


@dataclass(frozen=True)
class LauncherLayout:
    """The processes a cluster launcher started: `per_node` on each of `nodes` nodes. `origin` names the environment
    variables the numbers come from, for messages."""
    launcher: str
    per_node: int
    nodes: int
    origin: str


def launcher_layout() -> LauncherLayout | None:
    """The layout torchrun or SLURM's srun started, None when Lightning starts the processes itself. torchrun is
    looked for first, as Lightning does: it can run inside a SLURM allocation."""
    if TorchElasticEnvironment.detect():
        world, per_node = int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_WORLD_SIZE"])
        launcher, origin = "torchrun", f"WORLD_SIZE={world}, LOCAL_WORLD_SIZE={per_node}"
        nodes = world // per_node
    elif SLURMEnvironment.detect():
        world, nodes = int(os.environ["SLURM_NTASKS"]), int(os.environ.get("SLURM_NNODES", "1"))
        per_node = int(os.environ.get("SLURM_NTASKS_PER_NODE", world // nodes))
        launcher = "SLURM"
        origin = f"SLURM_NTASKS={world}, SLURM_NNODES={nodes}, SLURM_NTASKS_PER_NODE={per_node}"
    else:
        return None
    if per_node * nodes != world:
        raise ValueError(f"{launcher} started an uneven number of processes per node ({origin}); start the same "
                         f"number on every node")
    return LauncherLayout(launcher, per_node, nodes, origin)


def _device_count(devices: Any) -> int | None:
    """How many devices per node a `trainer.devices` value asks for; None for "auto" / -1 (whatever is there)."""
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str) and "," in devices:
        return len([index for index in devices.split(",") if index.strip()])
    if devices in ("auto", "-1", -1, None):
        return None
    return int(devices)


def fit_to_launcher(devices: Any, num_nodes: int, layout: LauncherLayout,
                    typed: frozenset[str]) -> tuple[Any, int]:
    """`trainer.devices` and `trainer.num_nodes` for the processes `layout` started. A value typed on the command line
    (its name in `typed`) must agree with the launcher; one from a config or a default gives way to it, since a run
    whose devices x num_nodes differs from the launcher's world size fails, or worse, without DDP trains
    independent copies that overwrite each other's checkpoints."""
    count = _device_count(devices)
    if "devices" in typed and count not in (None, layout.per_node):
        raise ValueError(f"--trainer.devices {devices} asks for {count} processes per node but {layout.launcher} "
                         f"started {layout.per_node} ({layout.origin}): set --trainer.devices {layout.per_node} "
                         f"or leave it out")
    if "num_nodes" in typed and num_nodes != layout.nodes:
        raise ValueError(f"--trainer.num_nodes {num_nodes} but {layout.launcher} started {layout.nodes} nodes "
                         f"({layout.origin}): set --trainer.num_nodes {layout.nodes} or leave it out")
    return (devices if count == layout.per_node else layout.per_node), layout.nodes


class ResumeLoaderPosition(Callback):
    """Resumes the training loader at the checkpoint's position also when the loader was built before the checkpoint
    was restored. A recipe bounded by epochs reads `trainer.estimated_stepping_batches` in `configure_optimizers`
    (lr schedule), which builds the loader before Lightning restores the loops; Lightning then keeps that loader and
    never applies the saved position, so a resume mid-epoch replays the epoch from its first batch. At the start of
    training, a position still waiting to be applied rebuilds the loader the way a late build would."""

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loop = trainer.fit_loop
        if loop._combined_loader_states_to_load and loop._combined_loader is not None:
            loop._combined_loader = None
            loop.setup_data()
