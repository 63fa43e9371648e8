"""Distribution-shift sets given as image folders (ImageNet-A, -R, -Sketch), scored as their standard evaluations do.

A shift folder's class folders are wnids of the training classes. Each maps to the index of its wnid in the sorted
wnid list of the training folder (`DATA_DIR/train`, the class order the classifier was trained with), and the
classifier's scores are restricted to the folder's classes before the argmax: ImageNet-A and -R (200 classes each)
are scored among their 200 classes, ImageNet-Sketch (all 1,000) among all of them.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes

from lightning_mim.data import MIMDataModule
from lightning_mim.data.decode import ToMode


@dataclass
class ShiftSet:
    """A shift folder: `dataset` yields (normalised image, index of its class among the folder's sorted wnids);
    `class_index[j]` is the training-class index of the folder's j-th wnid."""

    name: str
    dataset: ImageFolder
    class_index: Tensor


def parse_shift_dir(text: str) -> tuple[str, Path]:
    """`--shift-dir NAME=PATH`."""
    name, separator, path = text.partition("=")
    if not separator or not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"--shift-dir {text!r} is not NAME=PATH, e.g. imagenet-r=/data/imagenet-r")
    return name.strip(), Path(path.strip())


def class_mapping(shift_classes: list[str], training_classes: list[str], name: str) -> Tensor:
    """The training-class index of each shift class (by wnid); a wnid outside the training classes is refused."""
    position = {wnid: index for index, wnid in enumerate(training_classes)}
    unknown = [wnid for wnid in shift_classes if wnid not in position]
    if unknown:
        raise ValueError(f"shift set {name!r}: {len(unknown)} class folder(s) are not training classes (e.g. "
                         f"{unknown[0]!r}): its class folders must be wnids of DATA_DIR/train")
    return torch.tensor([position[wnid] for wnid in shift_classes], dtype=torch.int64)


def restricted_predictions(scores: Tensor, class_index: Tensor) -> Tensor:
    """For (B, K) scores over the training classes, the position (into `class_index`) of the best-scoring class
    among `class_index`: the scores of every other class take no part."""
    return scores[:, class_index.to(scores.device)].argmax(dim=1)


def training_classes(datamodule: MIMDataModule) -> list[str]:
    """The sorted class folders (wnids) of the training split of an image-folder source."""
    hparams = datamodule.hparams
    if hparams.source != "imagefolder" or hparams.data_dir is None:
        raise ValueError(f"--shift-dir maps wnids to the classes of an image-folder training split, but the data "
                         f"source is {hparams.source!r}: evaluate with --data-source imagefolder --data-dir DATA_DIR")
    return find_classes(str(Path(hparams.data_dir) / "train"))[0]


def shift_sets(specs: list[tuple[str, Path]], datamodule: MIMDataModule) -> list[ShiftSet]:
    """The shift folders of `--shift-dir`, read with the evaluation transform of `datamodule`."""
    if not specs:
        return []
    classes = training_classes(datamodule)
    transform = transforms.Compose([ToMode("L" if datamodule.in_chans == 1 else "RGB"), datamodule.eval_transform()])
    sets = []
    for name, path in specs:
        if not path.is_dir():
            raise FileNotFoundError(f"shift set {name!r}: {path} is not a folder of class sub-folders (wnids)")
        dataset = ImageFolder(str(path), transform=transform)
        sets.append(ShiftSet(name, dataset, class_mapping(dataset.classes, classes, name)))
    return sets


@torch.no_grad()
def shift_top1(scorer: Callable[[Tensor], Tensor], shift: ShiftSet, batch_size: int, num_workers: int) -> float:
    """Top-1 (%) of `scorer` (normalised images -> training-class scores) on a shift set, among its classes."""
    loader = DataLoader(shift.dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    correct = total = 0
    for images, labels in loader:
        predictions = restricted_predictions(scorer(images), shift.class_index).cpu()
        correct += int((predictions == labels).sum())
        total += len(labels)
    return 100.0 * correct / max(total, 1)


__all__ = ["ShiftSet", "class_mapping", "parse_shift_dir", "restricted_predictions", "shift_sets", "shift_top1",
           "training_classes"]
