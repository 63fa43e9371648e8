"""The webdataset source: its train and val shards, the training samples per epoch, and its loaders (shards resampled
for training, read once in order for evaluation)."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import webdataset as wds
from torch.utils.data import default_collate

from lightning_mim.data.shard_files import check_token_ids, count_samples, expand_shards, read_classes
from lightning_mim.data.shard_pipeline import NodeSplitter, webdataset_pipeline
from lightning_mim.data.skipping import SkipCounter


@dataclass
class ShardSource:
    """The shards of the webdataset source, from the DataModule's hyperparameters (`options`)."""

    options: Mapping[str, Any] = field(repr=False)
    train_urls: list[str]
    val_urls: list[str]
    train_size: int  # training samples per epoch over all ranks
    num_classes: int  # -1: unknown (shards without the writer's classes.json)

    @classmethod
    def build(cls, options: Mapping[str, Any]) -> ShardSource:
        """Expand the shard patterns and count the training samples, with errors that name the fix."""
        if not options["train_shards"]:
            raise ValueError("source 'webdataset' needs --data.train_shards PATTERN (e.g. "
                             "/data/in1k/train-{000000..001023}.tar)")
        train_samples = options["train_samples"]
        if train_samples is not None and train_samples <= 0:
            raise ValueError(f"train_samples must be positive, got {train_samples}")
        if options["train_subset"] is not None:
            raise ValueError("train_subset is not supported for source 'webdataset' (training shards are "
                             "resampled); lower train_samples to shorten the epoch")
        train_urls = expand_shards(options["train_shards"])
        val_urls = expand_shards(options["val_shards"]) if options["val_shards"] else []
        samples = count_samples(train_urls) if train_samples is None else train_samples
        if options["token_ids_key"] is not None:
            check_token_ids(train_urls, options["token_ids_key"])
        classes = read_classes(train_urls) or read_classes(val_urls)
        return cls(options=options, train_urls=train_urls, val_urls=val_urls, train_size=samples,
                   num_classes=len(classes) if classes else -1)

    def train_loader(self, transform: Callable[[Any], Any], counter: SkipCounter,
                     decode: Callable[[bytes, str], Any] | None, *, batch_size: int, rank: int, world: int,
                     collate: Callable[[list[Any]], Any], loader_options: dict[str, Any]) -> wds.WebLoader:
        """(views, label) batches drawn from the shards with replacement, train_size // (batch_size x world) of them
        on every rank; with `decode`, images are decode(bytes, name) instead of PIL images."""
        batches = self.train_size // (batch_size * world)
        if batches == 0:
            raise ValueError(f"train_samples={self.train_size} is less than one batch of {batch_size} "
                             f"on each of {world} ranks")
        # Each rank and worker draws shards with replacement from its own randomly seeded stream (webdataset
        # seeds it from pid, time and urandom), so no split by rank is needed; the stream never runs out, so
        # with_epoch cuts exactly `batches` batches on every rank.
        pipeline = webdataset_pipeline(self.train_urls, transform, counter, resampled=True, node_splitter=None,
                                       shuffle_buffer=self.options["shuffle_buffer"], batch_size=batch_size,
                                       token_ids_key=self.options["token_ids_key"], decode=decode, collate=collate)
        loader = wds.WebLoader(pipeline, batch_size=None, shuffle=False, **loader_options)
        return loader.with_epoch(batches).with_length(batches, silent=True)

    def val_loader(self, transform: Callable[[Any], Any], counter: SkipCounter, *, batch_size: int, rank: int,
                   world: int, loader_options: dict[str, Any]) -> wds.WebLoader | list:
        """This rank's share of `val_shards`, read once, and with val_subset only the first
        ceil(val_subset / world) of its samples; without val_shards, no validation (an empty list)."""
        if not self.val_urls:
            return []
        val_subset = self.options["val_subset"]
        limit = None if val_subset is None else -(-val_subset // world)
        return self._eval_loader(self.val_urls, transform, counter, NodeSplitter(rank, world), limit, batch_size,
                                 loader_options)

    def knn_bank_loader(self, transform: Callable[[Any], Any], counter: SkipCounter, *, batch_size: int,
                        loader_options: dict[str, Any]) -> wds.WebLoader:
        """The first knn_bank_size samples of the train shards in order, on every rank."""
        return self._eval_loader(self.train_urls, transform, counter, None, self.options["knn_bank_size"],
                                 batch_size, loader_options)

    @staticmethod
    def _eval_loader(urls: list[str], transform: Callable[[Any], Any], counter: SkipCounter,
                     node_splitter: NodeSplitter | None, limit: int | None, batch_size: int,
                     loader_options: dict[str, Any]) -> wds.WebLoader:
        """Read shards once in order with `transform`, keeping at most `limit` samples."""
        pipeline = webdataset_pipeline(urls, transform, counter, resampled=False, node_splitter=node_splitter,
                                       batch_size=batch_size, partial_batches=True)
        loader = wds.WebLoader(pipeline, batch_size=None, shuffle=False, **loader_options)
        if limit is None:
            return loader
        return loader.unbatched().slice(limit).batched(batch_size, collation_fn=default_collate, partial=True)
