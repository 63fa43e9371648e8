"""The `imagefolder` source: torchvision's ImageFolder whose unreadable images are skipped and counted."""
from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from lightning_mim.data.skipping import LOAD_ERRORS, SkipCounter, UnreadableImage, first_readable


class SkippingImageFolder(Dataset):
    """torchvision ImageFolder whose unreadable images are skipped, counted and named in a warning (`SkipCounter`).

    A failing index returns the next readable sample (at most 32 tries), so the epoch keeps its length. With
    `allow_empty`, a class folder without images keeps its label (a val split lacking a class's images).
    """

    def __init__(self, root: str | os.PathLike, counter: SkipCounter, allow_empty: bool = False) -> None:
        self.folder = ImageFolder(str(root), allow_empty=allow_empty)
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
    """ImageFolder on DATA_DIR/<split>, with errors that name the path and the expected layout. The val split may
    hold an empty class folder (a class without val images), so that its class folders can be train/'s."""
    layout = f"DATA_DIR/{split}/<class>/<image> (e.g. DATA_DIR/{split}/n01440764/img_0001.jpg)"
    if data_dir is None:
        raise ValueError(f"source 'imagefolder' needs --data.data_dir DATA_DIR laid out as {layout}")
    root = Path(data_dir) / split
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory; source 'imagefolder' expects {layout}")
    if not any(entry.is_dir() for entry in root.iterdir()):
        raise FileNotFoundError(f"{root} has no class sub-folders; source 'imagefolder' expects {layout}")
    try:
        folder = SkippingImageFolder(root, counter, allow_empty=split == "val")
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{root}: {exc}; source 'imagefolder' expects {layout}") from exc
    if len(folder) == 0:
        raise FileNotFoundError(f"{root} has no images in its class folders; source 'imagefolder' expects {layout}")
    return folder


def class_folders(data_dir: str | os.PathLike, split: str) -> list[str]:
    """The class folder names of DATA_DIR/<split>, sorted as ImageFolder labels them (no image scan); empty when the
    folder does not exist."""
    root = Path(data_dir) / split
    return sorted(entry.name for entry in os.scandir(root) if entry.is_dir()) if root.is_dir() else []


def check_same_classes(data_dir: str | os.PathLike, train: list[str], val: list[str]) -> None:
    """Refuse a val/ whose class folders are not train/'s: the labels are indices into the sorted names, so a
    missing, extra or renamed folder would score every image against another class's label."""
    if train == val:
        return
    only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))

    def listed(names: list[str]) -> str:
        return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "") if names else "none"

    raise ValueError(f"{data_dir}: val/ has other class folders than train/ ({len(train)} in train/, {len(val)} in "
                     f"val/; only in train/: {listed(only_train)}; only in val/: {listed(only_val)}): give both "
                     f"splits the same class folders (an empty val/ folder for a class without val images)")
