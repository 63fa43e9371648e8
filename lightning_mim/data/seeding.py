"""Reproducible sampling: a seed per sample and epoch, the resumable epoch sampler, fixed seeded subsets, and the
dataset that applies a transform under its sample's seed."""
from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler, Subset

from lightning_mim.data.skipping import SkipCounter, first_readable


class Transformed(Dataset):
    """Apply a transform to the image of (image, label) samples of a map-style dataset.

    Indexed by `(index, epoch)` pairs (what `EpochSampler` yields), the transform runs with the random generators
    seeded from (seed, epoch, index): a sample's augmentation is then the same whichever worker loads it, however
    many batches were prefetched, and after a resume mid-epoch. A plain int index leaves the generators alone.
    With a `counter`, an image the transform finds unreadable (`UnreadableImage`) is counted and the next sample
    taken in its place (`first_readable`), keeping its index's seed.
    """

    def __init__(self, dataset: Dataset, transform: Callable[[Image.Image], Any], seed: int = 0,
                 counter: SkipCounter | None = None) -> None:
        self.dataset = dataset
        self.transform = transform
        self.seed = seed
        self.counter = counter

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[Any, int]:
        index, epoch = (item, None) if isinstance(item, int) else item

        def load(position: int) -> tuple[Any, int]:
            image, label = self.dataset[position]
            with nullcontext() if epoch is None else seeded_generators(sample_seed(self.seed, epoch, index)):
                return self.transform(image), label

        return first_readable(index, len(self.dataset), load, self.counter)


_MASK64 = (1 << 64) - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample of one epoch (splitmix64 finaliser over a linear combination)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xD1B54A32D192ED03 + index * 0x8CB92BA72F3D8DD7 + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1


@contextmanager
def seeded_generators(seed: int) -> Iterator[None]:
    """Run the block with torch's CPU generator, Python's `random` and numpy's global generator seeded from `seed`
    (what torchvision and timm transforms draw from). Torch's state is restored afterwards, since the methods draw
    their masks from it in the main process when the loader has no workers; Python's and numpy's are left reseeded
    (restoring numpy's costs ~150 us a sample, and only the data pipeline and timm's Mixup draw from them)."""
    generator = torch.default_generator
    torch_state = generator.get_state()
    generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    try:
        yield
    finally:
        generator.set_state(torch_state)


class EpochSampler(DistributedSampler):
    """torch's DistributedSampler (a seeded permutation per epoch, this rank's share) yielding `(index, epoch)`,
    with a state (epoch, indices yielded) that a torchdata StatefulDataLoader saves and restores.

    The epoch is part of the state because Lightning builds the resumed epoch's iterator before it calls
    `set_epoch`; torchdata's own StatefulDistributedSampler keeps only the count and would replay epoch 0's order.
    Lightning leaves a DistributedSampler in place instead of wrapping it.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, shuffle: bool = True, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.yielded = 0
        self._resume_at = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        epoch, start = self.epoch, self._resume_at
        self._resume_at, self.yielded = 0, start
        for index in itertools.islice(super().__iter__(), start, None):
            self.yielded += 1
            yield index, epoch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self._resume_at = int(state["epoch"]), int(state["yielded"])


def seeded_subset(dataset: Dataset, size: int | None, seed: int, stream: int) -> Dataset:
    """A fixed random subset of `size` samples (sorted indices); the whole dataset when size is None or too large.

    `stream` separates the draws of different subsets made from the same seed (train, val, k-NN bank).
    """
    if size is None or size >= len(dataset):
        return dataset
    if size <= 0:
        raise ValueError(f"subset size must be positive, got {size}")
    rng = np.random.default_rng([seed, stream])
    indices = np.sort(rng.permutation(len(dataset))[:size])
    return Subset(dataset, indices.tolist())
