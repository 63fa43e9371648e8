"""Frozen features of one encoder, or of the raw pixels, on the evaluation splits: extracted once and cached on disk,
so that k-NN and the logistic-regression probe of the same encoder (and a later evaluation) read them back.

A cached file `<cache>/<key>.pt` holds the un-normalised float32 features (N, D) and int64 labels (N,) of one
split. Its key hashes what the features depend on: the encoder (the weights file's SHA-256, its backbone config and
the pooling; or "pixels") and the data (source, folder or shards, seed, subset size, image size, channels,
normalisation and eval resize). The data files themselves are not hashed: after replacing a data set in place, clear
the cache folder.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from lightning_mim.backbone import BackboneConfig, MIMViT
from lightning_mim.data import MIMDataModule
from lightning_mim.eval.knn import extract_features
from lightning_mim.eval.weights import load_encoder_state, load_into
from lightning_mim.reliability import atomic_write

PIXELS = "pixels"  # the pseudo encoder whose features are the flattened, normalised images


def flatten_pixels(images: Tensor) -> Tensor:
    """The pixel pseudo encoder: (B, C, H, W) images, already normalised by the eval transform, as (B, C*H*W)."""
    return images.flatten(1)


def encoder_feature_fn(weights: Path, config: BackboneConfig, pool: str,
                       device: torch.device) -> Callable[[Tensor], Tensor]:
    """The pooled features of the encoder stored in `weights`, evaluated on `device`."""
    model = MIMViT(config)
    state, report = load_encoder_state(weights, config)
    load_into(model, state, report)
    model.to(device).eval()
    return lambda images: model.pooled_features(images, pool)


def pixel_datamodule(arguments: dict[str, Any]) -> MIMDataModule:
    """The evaluation data for the pixel pseudo encoder, at the source's own image size and channels
    (Fashion-MNIST 28 x 28 grey, synthetic its synthetic_image_size; image folders and shards 224 RGB)."""
    datamodule = MIMDataModule(**arguments)
    datamodule.bind(datamodule.image_size, datamodule.in_chans, None)
    datamodule.setup("fit")
    return datamodule


@dataclass
class FrozenFeatures:
    """Features of one encoder (`identity` names it, `feature_fn` computes them) on the data of `datamodule`:
    `train(size)` for a seeded `size`-image subset of the training split (None: all of it), `val()` for the
    validation split, each extracted on `device` once per `cache_dir` (None: no cache) and held in memory once
    loaded."""

    datamodule: MIMDataModule
    feature_fn: Callable[[Tensor], Tensor]
    identity: dict[str, Any]
    cache_dir: Path | None
    device: torch.device
    _loaded: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict, init=False, repr=False)

    def train(self, size: int | None) -> tuple[Tensor, Tensor]:
        def loader() -> Any:  # the k-NN bank loader of a datamodule whose bank is this subset (its seeded draw)
            datamodule = self.datamodule
            if size != datamodule.hparams.knn_bank_size:
                datamodule = MIMDataModule(**{**dict(self.datamodule.hparams), "knn_bank_size": size})
                datamodule.bind(self.datamodule.image_size, self.datamodule.in_chans, None)
                datamodule.setup("fit")
            return datamodule.knn_bank_dataloader()

        return self._cached({"split": "train", "size": size}, loader)

    def val(self) -> tuple[Tensor, Tensor]:
        split = {"split": "val", "size": self.datamodule.hparams.val_subset}
        return self._cached(split, self.datamodule.val_dataloader)

    def data_identity(self) -> dict[str, Any]:
        hp = self.datamodule.hparams
        names = ("source", "data_dir", "train_shards", "val_shards", "seed", "eval_resize_ratio")
        if hp.source == "synthetic":
            names += ("synthetic_size", "synthetic_image_size", "synthetic_classes")
        channels = self.datamodule.in_chans
        return {**{name: hp[name] for name in names}, "image_size": self.datamodule.image_size, "in_chans": channels,
                "mean": list(self.datamodule.mean_for(channels)), "std": list(self.datamodule.std_for(channels))}

    def _cached(self, split: dict[str, Any], loader: Callable[[], Any]) -> tuple[Tensor, Tensor]:
        identity = json.dumps({"encoder": self.identity, "data": self.data_identity(), **split}, sort_keys=True)
        if identity not in self._loaded:
            self._loaded[identity] = self._read_or_extract(identity, loader)
        return self._loaded[identity]

    def _read_or_extract(self, identity: str, loader: Callable[[], Any]) -> tuple[Tensor, Tensor]:
        path = None
        if self.cache_dir is not None:
            path = self.cache_dir / f"{hashlib.sha256(identity.encode()).hexdigest()[:32]}.pt"
            if path.is_file():
                stored = torch.load(path, map_location="cpu", weights_only=True)
                if stored["identity"] == identity:
                    return stored["features"], stored["labels"]
        features, labels = extract_features(self.feature_fn, loader(), self.device, normalize=False)
        if path is not None:
            buffer = io.BytesIO()
            torch.save({"features": features, "labels": labels, "identity": identity}, buffer)
            atomic_write(path, lambda handle: handle.write(buffer.getbuffer()))
        return features, labels


__all__ = ["PIXELS", "FrozenFeatures", "encoder_feature_fn", "flatten_pixels", "pixel_datamodule"]
