"""The map-style sources (fashion_mnist, imagefolder, synthetic): their train, val and k-NN bank splits as fixed
seeded subsets, and their loaders (a resumable seeded order for training, each sample once for evaluation)."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_mim.data.fashion_mnist import (
    FASHION_MNIST_CLASSES, ArrayImages, default_fashion_mnist_dir, load_fashion_mnist,
)
from lightning_mim.data.imagefolder import SkippingImageFolder, build_imagefolder, check_same_classes
from lightning_mim.data.seeding import EpochSampler, Transformed, seeded_subset
from lightning_mim.data.skipping import SkipCounter
from lightning_mim.data.synthetic import SyntheticImages

# Streams of the seeded subset draws, so the train, val and k-NN bank subsets are independent.
_TRAIN, _VAL, _KNN = 0, 1, 2


@dataclass
class MapSource:
    """The splits of a map-style source, built from the DataModule's hyperparameters (`options`)."""

    options: Mapping[str, Any] = field(repr=False)
    train_raw: Dataset  # the whole train split, before `train_subset`
    train: Dataset
    val: Dataset
    knn: Dataset
    num_classes: int

    @classmethod
    def build(cls, options: Mapping[str, Any], counter: SkipCounter) -> MapSource:
        """Read or generate the source's splits; unreadable images of an image folder are counted in `counter`."""
        source, seed = options["source"], options["seed"]
        if source == "fashion_mnist":
            data_dir = options["data_dir"] or default_fashion_mnist_dir()
            train_raw: Dataset = ArrayImages(*load_fashion_mnist(data_dir, "train"))
            val_raw: Dataset = ArrayImages(*load_fashion_mnist(data_dir, "test"))
            num_classes = len(FASHION_MNIST_CLASSES)
        elif source == "imagefolder":
            train_raw = build_imagefolder(options["data_dir"], "train", counter)
            val_raw = build_imagefolder(options["data_dir"], "val", counter)
            check_same_classes(options["data_dir"], train_raw.classes, val_raw.classes)
            num_classes = len(train_raw.classes)
        else:
            args = (options["synthetic_image_size"], options["synthetic_classes"], seed)
            train_raw = SyntheticImages(options["synthetic_size"], *args, stream=_TRAIN)
            val_raw = SyntheticImages(max(options["synthetic_size"] // 4, 1), *args, stream=_VAL)
            num_classes = options["synthetic_classes"]
        return cls(options=options, train_raw=train_raw,
                   train=seeded_subset(train_raw, options["train_subset"], seed, _TRAIN),
                   val=seeded_subset(val_raw, options["val_subset"], seed, _VAL),
                   knn=seeded_subset(train_raw, options["knn_bank_size"], seed, _KNN),
                   num_classes=num_classes)

    @property
    def train_size(self) -> int:
        """Training samples per epoch over all ranks."""
        return len(self.train)

    def train_loader(self, transform: Callable[[Any], Any], counter: SkipCounter,
                     decode: Callable[[bytes, str], Any] | None, *, batch_size: int, rank: int, world: int,
                     collate: Callable[[list[Any]], Any], loader_options: dict[str, Any]) -> StatefulDataLoader:
        """(views, label) batches in a seeded order per epoch, this rank's share, each sample's augmentation seeded
        from (seed, epoch, index); with `decode`, an image folder's files are read by it instead of PIL."""
        seed, drop_last = self.options["seed"], self.options["drop_last"]
        if drop_last and len(self.train) < batch_size * world:
            raise ValueError(f"{len(self.train)} training samples give no full batch of {batch_size} on "
                             f"each of {world} ranks; lower batch_size or set drop_last=False")
        # StatefulDataLoader: Lightning saves its position in every checkpoint and resumes mid-epoch at the next
        # unseen batch; the sampler's order and the per-sample augmentation seeds depend only on data.seed.
        sampler = EpochSampler(self.train, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        train_set = self.train
        if decode is not None and isinstance(self.train_raw, SkippingImageFolder):
            # the same subset of the same files, read by the device-side views' decoder
            train_set = seeded_subset(self.train_raw.reading_with(decode), self.options["train_subset"], seed, _TRAIN)
        return StatefulDataLoader(Transformed(train_set, transform, seed, counter), batch_size=batch_size,
                                  sampler=sampler, drop_last=drop_last, collate_fn=collate, **loader_options)

    def val_loader(self, transform: Callable[[Any], Any], counter: SkipCounter, *, batch_size: int, rank: int,
                   world: int, loader_options: dict[str, Any]) -> DataLoader:
        """(image, label) batches of the validation subset in order, the whole subset on every rank (`counter`,
        `rank` and `world` serve the shard source's loader)."""
        return self._eval_loader(self.val, transform, batch_size, loader_options)

    def knn_bank_loader(self, transform: Callable[[Any], Any], counter: SkipCounter, *, batch_size: int,
                        loader_options: dict[str, Any]) -> DataLoader:
        """(image, label) batches of the k-NN bank, a fixed subset of the train split, in order."""
        return self._eval_loader(self.knn, transform, batch_size, loader_options)

    @staticmethod
    def _eval_loader(dataset: Dataset, transform: Callable[[Any], Any], batch_size: int,
                     loader_options: dict[str, Any]) -> DataLoader:
        return DataLoader(Transformed(dataset, transform), batch_size=batch_size, shuffle=False, drop_last=False,
                          **loader_options)
