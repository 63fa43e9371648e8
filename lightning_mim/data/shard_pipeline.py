"""The `webdataset` source's pipeline: samples read from tar shards, decoded and transformed in the loader workers,
unreadable shards and samples skipped and counted."""
from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import default_collate

from lightning_mim.data.skipping import LOAD_ERRORS, SkipCounter, UnreadableImage

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm", "pgm")


class NodeSplitter:
    """Give rank r of a world of w every w-th shard starting at r (the rank is fixed when the loader is built)."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    def __call__(self, src: Any) -> Any:
        for i, item in enumerate(src):
            if i % self.world_size == self.rank:
                yield item


class SkipHandler:
    """WebDataset exception handler: count the error, warn naming the shard or sample the first time, continue.

    The error's message names the item; a truncated shard can count twice (its broken member, then the end of the
    archive).
    """

    def __init__(self, counter: SkipCounter) -> None:
        self.counter = counter

    def __call__(self, exc: Exception) -> bool:
        self.counter.add(f"WebDataset sample or shard: {exc!r}")
        return True


class SkipUnreadable(SkipHandler):
    """`SkipHandler` for the views' transform: it skips images found unreadable there (`UnreadableImage`) and
    re-raises anything else, which is a bug rather than bad data."""

    def __call__(self, exc: Exception) -> bool:
        if not isinstance(exc, UnreadableImage):
            raise exc
        return super().__call__(exc)


def decode_sample(sample: dict[str, Any], decode: Callable[[bytes, str], Any] | None = None) -> tuple[Any, int]:
    """(image, label) from a raw WebDataset sample: a PIL RGB image, or decode(image bytes, name) (e.g.
    `TensorDecoder`); errors name the shard and the sample key."""
    where = f"{sample.get('__url__')} sample {sample.get('__key__')!r}"
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise ValueError(f"{where}: no image (looked for {', '.join(IMAGE_KEYS)}; found {sorted(sample)})")
    if "cls" not in sample:
        raise ValueError(f"{where}: no 'cls' label")
    try:
        if decode is not None:
            image = decode(sample[key], where)
        else:
            with Image.open(io.BytesIO(sample[key])) as image:
                image = image.convert("RGB")
        label = int(sample["cls"])
    except LOAD_ERRORS as exc:
        raise ValueError(f"{where}: {exc}") from exc
    return image, label


class DecodeSample:
    """`decode_sample` with a fixed `decode` (picklable, for the loader workers)."""

    def __init__(self, decode: Callable[[bytes, str], Any] | None = None) -> None:
        self.decode = decode

    def __call__(self, sample: dict[str, Any]) -> tuple[Any, int]:
        return decode_sample(sample, self.decode)


class DecodeWithIds:
    """(image, label, ids) from a raw WebDataset sample: `decode_sample` plus the int64 id grid stored under `key`."""

    def __init__(self, key: str, decode: Callable[[bytes, str], Any] | None = None) -> None:
        self.key, self.decode = key, decode

    def __call__(self, sample: dict[str, Any]) -> tuple[Any, int, torch.Tensor]:
        image, label = decode_sample(sample, self.decode)
        if self.key not in sample:
            raise ValueError(f"{sample.get('__url__')} sample {sample.get('__key__')!r}: no {self.key!r} token ids")
        return image, label, torch.from_numpy(np.load(io.BytesIO(sample[self.key]))).long()


class ApplyWithIds:
    """Transform the image of an (image, label, ids) triple into views and put the ids in place of views[1]."""

    def __init__(self, transform: Callable[[Image.Image], Any]) -> None:
        self.transform = transform

    def __call__(self, sample: tuple[Image.Image, int, torch.Tensor]) -> tuple[Any, int]:
        image, label, ids = sample
        views = self.transform(image)
        if not isinstance(views, (tuple, list)) or len(views) < 2:
            raise ValueError("token_ids_key replaces views[1], the tokenizer view, but the method's train_transform "
                             "returns no tuple of at least two views; drop --data.token_ids_key for this method")
        return (views[0], ids, *views[2:]), label


class ApplyToImage:
    """Apply a transform to the image of an (image, label) pair."""

    def __init__(self, transform: Callable[[Image.Image], Any]) -> None:
        self.transform = transform

    def __call__(self, sample: tuple[Image.Image, int]) -> tuple[Any, int]:
        return self.transform(sample[0]), sample[1]


def webdataset_pipeline(urls: list[str], transform: Callable[[Image.Image], Any], counter: SkipCounter, *,
                        resampled: bool, node_splitter: NodeSplitter | None, shuffle_buffer: int = 0,
                        batch_size: int | None = None, partial_batches: bool = False,
                        token_ids_key: str | None = None, decode: Callable[[bytes, str], Any] | None = None,
                        collate: Callable[[list[Any]], Any] = default_collate) -> wds.WebDataset:
    """Samples (transform(image), label) read from tar shards; unreadable shards and samples are skipped.

    resampled=True draws shards with replacement forever (training: the epoch length is set by the loader);
    otherwise each shard is read once in order. With batch_size, batches are formed in the workers (the last
    incomplete one of each worker is kept only with partial_batches, `collate` forms them). With decode, images
    are decode(bytes, name) (e.g. `TensorDecoder`) instead of PIL images. With token_ids_key, each sample's stored
    ids replace views[1] (`ApplyWithIds`).
    """
    handler = SkipHandler(counter)
    dataset = wds.WebDataset(urls, handler=handler, resampled=resampled, shardshuffle=False,
                             nodesplitter=node_splitter, workersplitter=wds.split_by_worker, empty_check=False)
    if shuffle_buffer > 0:
        dataset = dataset.shuffle(shuffle_buffer)
    if token_ids_key is None:
        dataset = dataset.map(DecodeSample(decode), handler=handler).map(ApplyToImage(transform),
                                                                          handler=SkipUnreadable(counter))
    else:
        dataset = dataset.map(DecodeWithIds(token_ids_key, decode), handler=handler).map(
            ApplyWithIds(transform), handler=SkipUnreadable(counter))
    if batch_size is not None:
        dataset = dataset.batched(batch_size, collation_fn=collate, partial=partial_batches)
    return dataset
