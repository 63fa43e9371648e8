"""Encoder weight files: reading a checkpoint without running pickled code, writing an encoder as safetensors with
its backbone config and pre-training identity in the metadata, and reading those back."""
from __future__ import annotations

import argparse
import hashlib
import json
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open, save

from lightning_mim.backbone import BackboneConfig
from lightning_mim.methods.base import to_plain
from lightning_mim.reliability import atomic_write


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint as plain data: safetensors for `.safetensors`, else `torch.load(weights_only=True)`.

    A pickle that needs anything beyond tensors, plain containers and `argparse.Namespace` (the `args` entry of MAE /
    LUT training checkpoints, plain attribute storage) is refused (`pickle.UnpicklingError`) without running it.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise pickle.UnpicklingError(
            f"{path}: refused to unpickle: the file holds objects other than tensors and plain containers "
            f"(only weights_only=True loading is allowed). {error}") from None


def config_hash(hyper_parameters: dict[str, Any]) -> str:
    """sha1 (first 10 hex digits) of the hyper-parameters as canonical JSON, without LightningCLI's bookkeeping
    entries (`_class_path`, `_instantiator`)."""
    plain = {key: value for key, value in to_plain(hyper_parameters).items() if not key.startswith("_")}
    text = json.dumps(plain, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file (empty when it has none)."""
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


def pretraining_identity(path: str | Path, config: BackboneConfig) -> dict[str, str]:
    """`method`, `config_hash` and, when recorded, `run` (`<logger name>/<version>`) of the pre-training that
    produced a weights file: from a Lightning checkpoint, or from the metadata `export_encoder` copies them into.
    Other files (official releases) give method "unknown" and the hash of the backbone config alone."""
    path = Path(path)
    if path.suffix == ".safetensors":
        metadata = safetensors_metadata(path)
        identity = {key: metadata[key] for key in ("method", "config_hash", "run") if key in metadata}
    else:
        checkpoint = read_checkpoint(path)
        hyper = checkpoint.get("hyper_parameters") or {}
        identity = {"method": str(hyper["_class_path"]).rpartition(".")[2]} if "_class_path" in hyper else {}
        identity |= {"config_hash": config_hash(hyper)} if hyper else {}
        identity |= {"run": str(checkpoint["run"])} if "run" in checkpoint else {}
    return {"method": "unknown", "config_hash": config_hash({"backbone": config})} | identity


def backbone_config_of(path: str | Path) -> BackboneConfig:
    """The backbone config stored with a Lightning checkpoint (`hyper_parameters.backbone`) or in the metadata of a
    safetensors file written by `export_encoder`."""
    path = Path(path)
    if path.suffix == ".safetensors":
        metadata = safetensors_metadata(path)
        if "backbone" not in metadata:
            raise ValueError(f"{path}: no backbone config in the safetensors metadata; pass the config explicitly")
        return BackboneConfig(**json.loads(metadata["backbone"]))
    hyper = read_checkpoint(path).get("hyper_parameters") or {}
    if "backbone" not in hyper:
        raise ValueError(f"{path}: no hyper_parameters.backbone in the checkpoint; pass the config explicitly")
    return BackboneConfig.coerce(hyper["backbone"])


def save_encoder(state: Mapping[str, torch.Tensor], config: BackboneConfig, output_path: str | Path,
                 identity: Mapping[str, str] | None = None) -> Path:
    """Write an encoder state dict (timm key names) as safetensors, with the backbone config and the pre-training's
    `identity` (`pretraining_identity`) in the metadata."""
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.detach().cpu().contiguous() for key, value in state.items()}
    metadata = {"format": "pt", "backbone": json.dumps(config.to_dict()), **(identity or {})}
    payload = save(tensors, metadata=metadata)
    atomic_write(output_path, lambda handle: handle.write(payload))
    return output_path


__all__ = ["backbone_config_of", "config_hash", "pretraining_identity", "read_checkpoint", "safetensors_metadata",
           "save_encoder"]
