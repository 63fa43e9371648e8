"""Unreadable data: counted and named once across the loader workers (`SkipCounter`), and skipped in favour of the
next readable sample (`first_readable`) so that an epoch keeps its length."""
from __future__ import annotations

import hashlib
import multiprocessing
import warnings
from collections.abc import Callable
from typing import Any

from PIL import UnidentifiedImageError

LOAD_ERRORS = (OSError, ValueError, UnidentifiedImageError)
_MAX_ATTEMPTS = 32


class SkipCounter:
    """The unreadable items (image files, WebDataset samples or shards) met by this process and the DataLoader
    workers it forks, in shared memory. Each distinct item is named in one warning, by the first process that meets
    it, and counted once overall (`distinct`) and once per epoch (`in_epoch`), however often epochs, validation and
    k-NN passes re-read it. Items are told apart by a 64-bit hash of their name in an open-addressing table."""

    capacity = 1 << 18

    def __init__(self) -> None:
        self._hashes = multiprocessing.RawArray("Q", self.capacity)  # 0 marks a free slot
        self._epochs = multiprocessing.RawArray("q", self.capacity)  # the epoch each item was last met in
        self._distinct = multiprocessing.RawValue("q", 0)
        self._in_epoch = multiprocessing.RawValue("q", 0)
        self._epoch = multiprocessing.RawValue("q", 0)
        self._lock = multiprocessing.Lock()

    def add(self, name: str, detail: str = "") -> None:
        """Count the unreadable item `name` (a path; a shard and sample key); warn, with `detail`, when it is new."""
        key = int.from_bytes(hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=8).digest(),
                             "little") or 1
        with self._lock:
            slot = key % self.capacity
            while self._hashes[slot] not in (0, key):
                slot = (slot + 1) % self.capacity
            new = self._hashes[slot] == 0
            if new:
                if self._distinct.value >= self.capacity // 2:
                    raise RuntimeError(f"more than {self.capacity // 2} unreadable images or samples; the data set "
                                       f"looks broken")
                self._hashes[slot] = key
                self._distinct.value += 1
            if new or self._epochs[slot] != self._epoch.value:
                self._epochs[slot] = self._epoch.value
                self._in_epoch.value += 1
        if new:
            reason = f": {detail}" if detail else ""
            warnings.warn(f"skipped unreadable {name}{reason} (named once; counted in data/skipped_samples)",
                          RuntimeWarning, stacklevel=3)

    def set_epoch(self, epoch: int) -> None:
        """Start counting `in_epoch` afresh when `epoch` is not the current one."""
        with self._lock:
            if epoch != self._epoch.value:
                self._epoch.value, self._in_epoch.value = epoch, 0

    @property
    def distinct(self) -> int:
        """Distinct unreadable items met so far."""
        return int(self._distinct.value)

    @property
    def in_epoch(self) -> int:
        """Distinct unreadable items met since the current epoch was set."""
        return int(self._in_epoch.value)


class UnreadableImage(ValueError):
    """Raised by a transform whose input image was read but is decoded only there (`jpeg_crop.RegionResizedCrop`)
    and does not decode; the loader skips and counts the image, as it does those that fail when read."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name, self.reason = name, reason


def first_readable(index: int, size: int, load: Callable[[int], Any], counter: SkipCounter | None,
                   where: str = "") -> Any:
    """load(index), or where it raises `UnreadableImage`, load of the next index (at most 32 tries, wrapping around
    `size`), each unreadable image counted and named once (`SkipCounter`); without a counter the error is raised."""
    for attempt in range(_MAX_ATTEMPTS):
        try:
            return load((index + attempt) % size)
        except UnreadableImage as exc:
            if counter is None:
                raise
            counter.add(f"image {exc.name}", exc.reason)
    raise RuntimeError(f"{_MAX_ATTEMPTS} consecutive unreadable images from index {index}{where}; the data set looks "
                       f"broken")
