"""Dataset builders for the DataModule: ImageFolder (skipping unreadable files), WebDataset shards, synthetic images."""
from __future__ import annotations

import copy
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import random
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
import webdataset as wds
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, DistributedSampler, Subset, default_collate
from torchvision.datasets import ImageFolder
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2.functional import pil_to_tensor
from webdataset.shardlists import expand_urls

# The `format` of the manifest that `make-shards` writes beside its shards (shards.py writes it, this module reads it).
MANIFEST_FORMAT = "lightning-mim make-shards manifest 1"
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm", "pgm")
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


class ToMode:
    """Convert a PIL image to a mode ('L' or 'RGB') if it is in another one; tensors, decoded in their mode
    already (`decode_to_tensor`), pass unchanged."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, image: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
        if isinstance(image, torch.Tensor) or image.mode == self.mode:
            return image
        return image.convert(self.mode)


_JPEG_OR_PNG = (b"\xff\xd8", b"\x89PNG\r\n\x1a\n")


class TensorDecoder:
    """(encoded bytes, name) -> uint8 tensor in `mode` (`decode_to_tensor`); picklable, for the loader workers."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, data: bytes, name: str) -> torch.Tensor:
        return decode_to_tensor(data, self.mode)


def pil_luma(rgb: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) -> (1, H, W) exactly as PIL's convert("L") computes it (ITU-R 601-2 in 16-bit fixed point),
    so grey views equal the reference pipeline's; a JPEG's own luma channel differs from it by up to ~15 levels."""
    red, green, blue = rgb.to(torch.int32)
    return ((red * 19595 + green * 38470 + blue * 7471 + 0x8000) >> 16).to(torch.uint8).unsqueeze(0)


def decode_to_tensor(data: bytes, mode: str) -> torch.Tensor:
    """Encoded image -> uint8 tensor (C, H, W) in mode 'RGB' or 'L'. JPEG and PNG go through torchvision's decoder
    (libjpeg-turbo / libpng straight into a tensor: no PIL image and no copy out of it; the same pixels as PIL's
    decode, in 20-33 % less time than PIL decode + conversion to a tensor, benchmarks/README.md); other formats
    through PIL. Raises ValueError for an unreadable image."""
    if data.startswith(_JPEG_OR_PNG):
        try:
            rgb = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError as exc:
            raise ValueError(f"cannot decode: {exc}") from exc
        return rgb if mode == "RGB" else pil_luma(rgb)
    with Image.open(io.BytesIO(data)) as image:
        return pil_to_tensor(image.convert(mode))


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


# ----------------------------------------------------------------------------------------------------- ImageFolder

class SkippingImageFolder(Dataset):
    """torchvision ImageFolder whose unreadable images are skipped, counted and named in a warning (`SkipCounter`).

    A failing index returns the next readable sample (at most 32 tries), so the epoch keeps its length.
    """

    def __init__(self, root: str | os.PathLike, counter: SkipCounter) -> None:
        self.folder = ImageFolder(str(root))
        self.counter = counter
        self.decode: Callable[[bytes, str], Any] | None = None

    def reading_with(self, decode: Callable[[bytes, str], Any]) -> SkippingImageFolder:
        """The same folder (no rescan) yielding decode(file bytes, path) instead of PIL RGB images (e.g.
        `TensorDecoder`); decode raises one of LOAD_ERRORS for an unreadable file."""
        view = copy.copy(self)
        view.decode = decode
        return view

    @property
    def classes(self) -> list[str]:
        """Class folder names, sorted; the label is the index in this list."""
        return self.folder.classes

    def __len__(self) -> int:
        return len(self.folder.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image | torch.Tensor, int]:
        return first_readable(index, len(self), self._read, self.counter, f" in {self.folder.root}")

    def _read(self, index: int) -> tuple[Image.Image | torch.Tensor, int]:
        path, label = self.folder.samples[index]
        try:
            if self.decode is not None:
                return self.decode(Path(path).read_bytes(), path), label
            with Image.open(path) as image:
                return image.convert("RGB"), label
        except LOAD_ERRORS as exc:
            raise UnreadableImage(path, str(exc)) from exc


def build_imagefolder(data_dir: str | None, split: str, counter: SkipCounter) -> SkippingImageFolder:
    """ImageFolder on DATA_DIR/<split>, with errors that name the path and the expected layout."""
    layout = f"DATA_DIR/{split}/<class>/<image> (e.g. DATA_DIR/{split}/n01440764/img_0001.jpg)"
    if data_dir is None:
        raise ValueError(f"source 'imagefolder' needs --data.data_dir DATA_DIR laid out as {layout}")
    root = Path(data_dir) / split
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory; source 'imagefolder' expects {layout}")
    if not any(entry.is_dir() for entry in root.iterdir()):
        raise FileNotFoundError(f"{root} has no class sub-folders; source 'imagefolder' expects {layout}")
    try:
        return SkippingImageFolder(root, counter)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{root}: {exc}; source 'imagefolder' expects {layout}") from exc


# ------------------------------------------------------------------------------------------------------ synthetic

class SyntheticImages(Dataset):
    """Deterministic RGB images whose class sets the stripe orientation, frequency and colour; noise on top.

    Image i depends only on (seed, stream, i), so it is generated on access and costs no memory.
    The label of image i is i % num_classes.
    """

    def __init__(self, size: int, image_size: int, num_classes: int, seed: int, stream: int) -> None:
        if size <= 0 or image_size <= 0 or num_classes <= 0:
            raise ValueError(f"synthetic data needs positive sizes, got size={size}, "
                             f"image_size={image_size}, num_classes={num_classes}")
        self.size, self.image_size, self.num_classes = size, image_size, num_classes
        self.seed, self.stream = seed, stream
        grid = np.arange(image_size, dtype=np.float32) / image_size
        self._yy, self._xx = np.meshgrid(grid, grid, indexing="ij")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        if not 0 <= index < self.size:
            raise IndexError(index)
        label = index % self.num_classes
        rng = np.random.default_rng([self.seed, self.stream, index])
        angle = np.pi * label / self.num_classes
        cycles = 2 + label % 3
        along = np.cos(angle) * self._xx + np.sin(angle) * self._yy
        stripes = 0.5 + 0.5 * np.sin(2 * np.pi * cycles * along + rng.uniform(0, 2 * np.pi))
        colour = 0.6 + 0.4 * np.cos(2 * np.pi * (label / self.num_classes + np.array([0.0, 1 / 3, 2 / 3])))
        image = stripes[..., None] * colour + rng.normal(0.0, 0.1, (*stripes.shape, 3))
        return Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)), label


# ---------------------------------------------------------------------------------------------------- WebDataset

def _is_local(url: str) -> bool:
    return urlparse(url).scheme in ("", "file")


def _local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def expand_shards(pattern: str) -> list[str]:
    """Brace-expand a shard pattern; local shards that do not exist are dropped with a warning.

    Raises FileNotFoundError naming the pattern when it names local files and none exists.
    """
    urls = expand_urls(pattern)
    missing = [url for url in urls if _is_local(url) and not os.path.isfile(_local_path(url))]
    if len(missing) == len(urls):
        raise FileNotFoundError(f"no shard file matches {pattern!r} (expanded to {len(urls)} paths, "
                                f"e.g. {urls[0]}); write shards with `lightning-mim make-shards SRC OUT_PATTERN`")
    if missing:
        warnings.warn(f"{len(missing)} of {len(urls)} shards of {pattern!r} do not exist (e.g. {missing[0]}); "
                      f"reading the others", RuntimeWarning, stacklevel=2)
    return [url for url in urls if url not in missing]


def read_classes(urls: list[str]) -> list[str] | None:
    """Class names from the classes.json that the shard writer puts next to local shards, if there is one."""
    if not urls or not _is_local(urls[0]):
        return None
    path = Path(_local_path(urls[0])).parent / "classes.json"
    if not path.is_file():
        return None
    return list(json.loads(path.read_text()))


_TRAIN_SAMPLES_FIX = "pass --data.train_samples N (the number of training samples; it sets the epoch length)"


def _manifest_entries(folder: Path) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Shard file name -> (manifest, entry) for every make-shards manifest in a folder."""
    entries: dict[str, tuple[Path, dict[str, Any]]] = {}
    for manifest_file in sorted(folder.glob("*manifest.json")):
        manifest = json.loads(manifest_file.read_text())
        if isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT:
            entries.update({name: (manifest_file, entry) for name, entry in manifest["shards"].items()})
    return entries


def count_samples(urls: list[str]) -> int:
    """Total samples of the shards `urls`, from the manifests that `make-shards` writes beside them.

    Raises ValueError naming `--data.train_samples` when a shard is remote or in no manifest, or when its size on
    disk differs from the recorded one.
    """
    by_folder: dict[Path, dict[str, tuple[Path, dict[str, Any]]]] = {}
    total = 0
    for url in urls:
        if not _is_local(url):
            raise ValueError(f"{url}: the sample count of remote shards is unknown; {_TRAIN_SAMPLES_FIX}")
        path = Path(_local_path(url))
        if path.parent not in by_folder:
            by_folder[path.parent] = _manifest_entries(path.parent)
        entries = by_folder[path.parent]
        if path.name not in entries:
            raise ValueError(f"{url} is in no make-shards manifest ({path.parent}/*manifest.json), so its sample count "
                             f"is unknown; write the shards with `lightning-mim make-shards`, which records it, or "
                             f"{_TRAIN_SAMPLES_FIX}")
        manifest_file, entry = entries[path.name]
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise ValueError(f"{url} has changed since {manifest_file} recorded it ({size} bytes on disk, "
                             f"{entry['bytes']} recorded); re-run its make-shards command, or {_TRAIN_SAMPLES_FIX}")
        total += entry["samples"]
    return total


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


def check_token_ids(urls: list[str], key: str) -> None:
    """Fail unless every local shard is recorded in a manifest of `lightning-mim tokenizer encode` that stored the
    ids under `key` (a plain make-shards manifest holds no ids)."""
    by_folder: dict[Path, set[str]] = {}
    for url in urls:
        if _is_local(url):
            path = Path(_local_path(url))
            by_folder.setdefault(path.parent, set()).add(path.name)
    for folder, names in sorted(by_folder.items()):
        recorded: set[str] = set()
        for manifest_file in folder.glob("*manifest.json"):
            manifest = json.loads(manifest_file.read_text())
            if isinstance(manifest, dict) and manifest.get("token_ids_key") == key:
                recorded |= set(manifest.get("shards", {}))
        if not names <= recorded:
            raise ValueError(f"token_ids_key {key!r}: {sorted(names - recorded)[0]} in {folder} holds no ids under "
                             f"that key (no `lightning-mim tokenizer encode` manifest records it); write the shards "
                             f"with `lightning-mim tokenizer encode ... IN_PATTERN OUT_PATTERN` and train on those")


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
