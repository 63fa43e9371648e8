"""MIMDataModule: the one LightningDataModule shared by every method, for four image sources."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal, get_args

import lightning as L
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate
from torchdata.stateful_dataloader import StatefulDataLoader
from torchvision import transforms

from lightning_mim.augment import normalize, to_unit_float
from lightning_mim.data.device_decode import DeferViews, EncodedReader, collate_encoded, decode_views
from lightning_mim.data.fashion_mnist import FASHION_MNIST_CLASSES, ArrayImages, default_fashion_mnist_dir, load_fashion_mnist
from lightning_mim.data.jpeg_crop import CropDecoder, decodes_crop_region
from lightning_mim.data.sources import (
    EpochSampler, NodeSplitter, SkipCounter, SkippingImageFolder, SyntheticImages, TensorDecoder, ToMode, Transformed,
    build_imagefolder, check_token_ids, count_samples, expand_shards, read_classes, seeded_subset, webdataset_pipeline,
)

Source = Literal["fashion_mnist", "imagefolder", "webdataset", "synthetic"]
Place = Literal["loader", "device"]  # where part of the training views is made
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_DEFAULT_STATS = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "synthetic": ((0.5,), (0.5,)),
    "imagefolder": (IMAGENET_MEAN, IMAGENET_STD),
    "webdataset": (IMAGENET_MEAN, IMAGENET_STD),
}
# Streams of the seeded subset draws, so the train, val and k-NN bank subsets are independent.
_TRAIN, _VAL, _KNN = 0, 1, 2


def _expand_stats(values: tuple[float, ...], in_chans: int, name: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == in_chans:
        return values
    if len(values) == 1:
        return values * in_chans
    if len(values) == 3 and in_chans == 1:
        return (sum(values) / 3,)
    raise ValueError(f"{name} has {len(values)} values; cannot expand it to {in_chans} channels")


def has_device_views(module: Any) -> bool:
    """Whether the module's `loader_views` belongs to its `train_transform`: defined by the class that defines
    train_transform or a subclass of it. A method that overrides only train_transform (written before the device
    path) would otherwise get the views of a base class, so its views are made per image in the loader."""
    if not callable(getattr(module, "loader_views", None)):
        return False
    owner = {name: next(cls for cls in type(module).__mro__ if name in vars(cls))
             for name in ("train_transform", "loader_views")}
    return issubclass(owner["loader_views"], owner["train_transform"])


class MIMDataModule(L.LightningDataModule):
    """Images for masked-image-modeling pre-training and their k-NN monitoring.

    The method declares its views: `bind(image_size, in_chans, train_transform)` (called by `setup` from the
    attached LightningModule's `image_size`, `in_chans` and `train_transform(mean, std)`, or with `augment_on`
    "device" its `loader_views()` and `augment_views`). Every image is converted to the model's channel mode ('L' or
    'RGB') before any transform.

    Loaders: `train_dataloader` yields (views, label) with the bound train transform (the eval transform when none
    is bound); `val_dataloader` and `knn_bank_dataloader` yield (image, label) with the eval transform, the latter
    from a fixed seeded subset of the train split.

    Sources: `fashion_mnist` (idx files in `data_dir`, default /usr/share/datasets/fashion-mnist), `imagefolder`
    (`data_dir/train/<class>/<image>` and `data_dir/val/...`), `webdataset` (tar shards `train_shards`,
    `val_shards`; `train_samples` sets the epoch length, by default the sample count that `make-shards` records in
    its manifest beside the shards), `synthetic` (generated, for tests).

    `seed` fixes the subsets, the training order (a permutation per epoch) and every sample's augmentation draws
    (seeded from seed, epoch and index), so a run resumed mid-epoch sees exactly the batches it had not seen yet.
    WebDataset training resamples shards from a fresh random stream instead, and resumes at the right step only.
    """

    def __init__(
        self,
        source: Source = "fashion_mnist",
        data_dir: str | None = None,
        train_shards: str | None = None,
        val_shards: str | None = None,
        train_samples: int | None = None,
        batch_size: int = 256,
        global_batch_size: int | None = None,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        drop_last: bool = True,
        train_subset: int | None = None,
        val_subset: int | None = None,
        knn_bank_size: int | None = 10000,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        synthetic_size: int = 1024,
        synthetic_image_size: int = 32,
        synthetic_classes: int = 10,
        seed: int = 0,
        eval_resize_ratio: float = 0.875,
        shuffle_buffer: int = 1000,
        token_ids_key: str | None = None,
        augment_on: Place = "device",
        decode_on: Place = "loader",
        crop_decode: bool = True,
    ) -> None:
        """See the class docstring; `shuffle_buffer` is the WebDataset sample shuffle buffer (per worker).

        `augment_on`: where the training views are augmented. "device": the loader workers only read, decode and
        crop (the method's `loader_views`, uint8 tensors, a quarter of float32's bytes to collate and copy); scaling
        to [0, 1], the method's photometric augmentation (`augment_views`, per-sample draws on the device) and
        normalisation run batched on the training device (`on_after_batch_transfer`). "loader": the method's whole
        per-image `train_transform` in the workers (the reference pipeline). A module without its own
        `loader_views` (`has_device_views`) is always augmented in the loader.

        `decode_on`: "loader" decodes the training images in the workers; "device" (with augment_on "device", for
        imagefolder and webdataset) has the workers read the files only and decodes the JPEGs of each batch in one
        call on the training device (nvJPEG on a GPU) before the crops (`lightning_mim.data.device_decode`).

        `crop_decode` (augment_on "device", decode_on "loader"): a method whose views start with a
        `RegionResizedCrop` (MAE, SimMIM, SymMIM, Beyond Masking) has libjpeg-turbo decode only the crop of each
        training JPEG, the same pixels as a full decode (`lightning_mim.data.jpeg_crop`); false decodes them whole.

        `token_ids_key` (webdataset only, e.g. "tokens.npy"): each training sample's precomputed tokenizer ids,
        written by `lightning-mim tokenizer encode`, replace element [1] of its views (the tokenizer view) as an int64
        (h, w) tensor. The ids belong to the centre-square view, so this is only valid for a method whose crop is
        deterministic (MaPeT's scale-1 centre square).

        `global_batch_size`, when given, replaces `batch_size`: each device then loads global_batch_size /
        (devices x nodes x accumulate_grad_batches) images a step, which must divide exactly.
        """
        super().__init__()
        if source not in get_args(Source):
            raise ValueError(f"unknown source {source!r}; choose one of {', '.join(get_args(Source))}")
        if batch_size <= 0 or num_workers < 0:
            raise ValueError(f"need batch_size > 0 and num_workers >= 0, got {batch_size} and {num_workers}")
        if global_batch_size is not None and global_batch_size <= 0:
            raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
        if token_ids_key is not None and source != "webdataset":
            raise ValueError(f"token_ids_key reads ids stored in WebDataset shards (`lightning-mim tokenizer encode`), "
                             f"not source {source!r}: use --data.source webdataset --data.train_shards PATTERN, or "
                             f"drop token_ids_key to tokenise in the training step")
        if not 0.0 < eval_resize_ratio <= 1.0:
            raise ValueError(f"eval_resize_ratio must be in (0, 1], got {eval_resize_ratio}")
        if augment_on not in get_args(Place):
            raise ValueError(f"unknown augment_on {augment_on!r}; choose 'device' (batched on the training device) "
                             f"or 'loader' (per image in the loader workers)")
        if decode_on not in get_args(Place):
            raise ValueError(f"unknown decode_on {decode_on!r}; choose 'loader' (in the loader workers) or 'device' "
                             f"(JPEGs decoded on the training device)")
        if decode_on == "device" and (augment_on != "device" or source not in ("imagefolder", "webdataset")):
            raise ValueError(f"decode_on 'device' decodes JPEG files before the device-side views: it needs "
                             f"augment_on 'device' and source 'imagefolder' or 'webdataset' (got augment_on "
                             f"{augment_on!r}, source {source!r}); set decode_on 'loader' otherwise")
        self.save_hyperparameters()
        self._image_size: int | None = None
        self._in_chans: int | None = None
        self._train_transform: Callable[[Image.Image], Any] | None = None
        self._counter: SkipCounter | None = None
        self._num_classes: int | None = None
        self._train_set: Dataset | None = None
        self._train_raw: Dataset | None = None
        self._val_set: Dataset | None = None
        self._knn_set: Dataset | None = None
        self._train_urls: list[str] = []
        self._val_urls: list[str] = []
        self._train_samples: int | None = None
        self._augment_module: Any = None  # the module whose augment_views completes the views on the device
        self._device_stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------------------------------ model binding
    @property
    def image_size(self) -> int:
        """Bound image size, else the source's native size (28 Fashion-MNIST, synthetic_image_size, 224)."""
        if self._image_size is not None:
            return self._image_size
        native = self.native_format()
        return native[0] if native is not None else 224

    @property
    def in_chans(self) -> int:
        """Bound channel count, else the source's native one (1 for Fashion-MNIST), else 3."""
        if self._in_chans is not None:
            return self._in_chans
        native = self.native_format()
        return native[1] if native is not None else 3

    def bind(self, image_size: int, in_chans: int, train_transform: Callable[[Image.Image], Any] | None = None,
             augment_module: Any = None) -> None:
        """Store what the data needs from the model: input size, channel count and the training views.

        With `augment_module` (a method, its `loader_views()` as train_transform), the views are completed on the
        device: files decode straight to uint8 tensors (`decode_to_tensor`), and training batches go through the
        module's `augment_views` and the normalisation in `on_after_batch_transfer`."""
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self._image_size, self._in_chans, self._train_transform = int(image_size), int(in_chans), train_transform
        self._augment_module = augment_module

    def mean_for(self, in_chans: int) -> tuple[float, ...]:
        """Normalisation mean for a model with in_chans channels."""
        mean = self.hparams.mean or _DEFAULT_STATS[self.hparams.source][0]
        return _expand_stats(mean, in_chans, "mean")

    def std_for(self, in_chans: int) -> tuple[float, ...]:
        """Normalisation std for a model with in_chans channels."""
        std = self.hparams.std or _DEFAULT_STATS[self.hparams.source][1]
        return _expand_stats(std, in_chans, "std")

    def eval_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """PIL image -> normalised tensor at the model's size and channel count.

        imagefolder/webdataset: resize the shorter side to image_size / eval_resize_ratio, then centre-crop;
        fashion_mnist/synthetic: resize only when the model's size differs from the native one.
        """
        size = self.image_size
        steps: list[Callable] = [ToMode(self._mode)]
        if self.hparams.source in ("imagefolder", "webdataset"):
            steps += [transforms.Resize(int(size / self.hparams.eval_resize_ratio),
                                        interpolation=transforms.InterpolationMode.BICUBIC),
                      transforms.CenterCrop(size)]
        elif size != self.native_format()[0]:
            steps.append(transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BICUBIC))
        steps += [transforms.ToTensor(),
                  transforms.Normalize(self.mean_for(self.in_chans), self.std_for(self.in_chans))]
        return transforms.Compose(steps)

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self, stage: str | None = None) -> None:
        """Bind to the attached LightningModule if it declares its views, and build the datasets (once)."""
        self._bind_from_trainer()
        _ = self.batch_size  # a global batch that does not split over the devices fails here, before any compute
        if self._counter is None:
            self._counter = SkipCounter()
        if self._num_classes is not None:
            return
        hp = self.hparams
        if hp.source == "webdataset":
            self._setup_webdataset()
            return
        if hp.source == "fashion_mnist":
            data_dir = hp.data_dir or default_fashion_mnist_dir()
            train_raw: Dataset = ArrayImages(*load_fashion_mnist(data_dir, "train"))
            val_raw: Dataset = ArrayImages(*load_fashion_mnist(data_dir, "test"))
            num_classes = len(FASHION_MNIST_CLASSES)
        elif hp.source == "imagefolder":
            train_raw = build_imagefolder(hp.data_dir, "train", self._counter)
            val_raw = build_imagefolder(hp.data_dir, "val", self._counter)
            if train_raw.classes != val_raw.classes:
                raise ValueError(f"{hp.data_dir}: train/ and val/ have different class folders "
                                 f"({len(train_raw.classes)} vs {len(val_raw.classes)})")
            num_classes = len(train_raw.classes)
        else:
            args = (hp.synthetic_image_size, hp.synthetic_classes, hp.seed)
            train_raw = SyntheticImages(hp.synthetic_size, *args, stream=_TRAIN)
            val_raw = SyntheticImages(max(hp.synthetic_size // 4, 1), *args, stream=_VAL)
            num_classes = hp.synthetic_classes
        self._train_raw = train_raw
        self._train_set = seeded_subset(train_raw, hp.train_subset, hp.seed, _TRAIN)
        self._val_set = seeded_subset(val_raw, hp.val_subset, hp.seed, _VAL)
        self._knn_set = seeded_subset(train_raw, hp.knn_bank_size, hp.seed, _KNN)
        self._num_classes = num_classes

    def _setup_webdataset(self) -> None:
        hp = self.hparams
        if not hp.train_shards:
            raise ValueError("source 'webdataset' needs --data.train_shards PATTERN (e.g. "
                             "/data/in1k/train-{000000..001023}.tar)")
        if hp.train_samples is not None and hp.train_samples <= 0:
            raise ValueError(f"train_samples must be positive, got {hp.train_samples}")
        if hp.train_subset is not None:
            raise ValueError("train_subset is not supported for source 'webdataset' (training shards are "
                             "resampled); lower train_samples to shorten the epoch")
        self._train_urls = expand_shards(hp.train_shards)
        self._val_urls = expand_shards(hp.val_shards) if hp.val_shards else []
        self._train_samples = count_samples(self._train_urls) if hp.train_samples is None else hp.train_samples
        if hp.token_ids_key is not None:
            check_token_ids(self._train_urls, hp.token_ids_key)
        classes = read_classes(self._train_urls) or read_classes(self._val_urls)
        # -1 marks "set up, class count unknown" (shards without the writer's classes.json).
        self._num_classes = len(classes) if classes else -1

    def _bind_from_trainer(self) -> None:
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        make_views = getattr(module, "train_transform", None)
        size, chans = getattr(module, "image_size", None), getattr(module, "in_chans", None)
        if callable(make_views) and isinstance(size, int) and isinstance(chans, int):
            if self.hparams.augment_on == "device" and has_device_views(module):
                self.bind(size, chans, module.loader_views(), augment_module=module)
            else:
                self.bind(size, chans, make_views(self.mean_for(chans), self.std_for(chans)))

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Training batches of encoded images (decode_on "device"): decoded on the training device and cropped
        there by the module's `loader_views`, each image with its own seed. Other batches pass unchanged."""
        trainer = self.trainer
        if not self._decodes_on_device or trainer is None or not trainer.training:
            return batch
        images, labels = batch
        return decode_views(images, self._train_transform, self._mode, trainer.strategy.root_device), labels

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Training batches of device-side views (`augment_on="device"`): uint8 -> [0, 1] floats, the module's
        `augment_views` (its draws come from the device's generator, saved in checkpoints), then normalisation.
        Other batches pass unchanged."""
        trainer = self.trainer
        if self._augment_module is None or trainer is None or not trainer.training:
            return batch
        views, labels = batch
        many = isinstance(views, (tuple, list))
        floats = [to_unit_float(view) for view in (views if many else [views])]
        floats = self._augment_module.augment_views(floats if many else floats[0])
        mean, std = self._stats_on(floats[0].device if many else floats.device)
        views = [normalize(view, mean, std) for view in floats] if many else normalize(floats, mean, std)
        # what Lightning does to float inputs before the transfer (to bf16 / fp16 under "-true" precision), which
        # the uint8 batch skipped
        plugin = getattr(trainer, "precision_plugin", None)
        return (plugin.convert_input(views) if plugin is not None else views), labels

    def _stats_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalisation mean and std as tensors on `device`, copied there once."""
        if device not in self._device_stats:
            chans = self.in_chans
            self._device_stats[device] = (torch.tensor(self.mean_for(chans)).to(device),
                                          torch.tensor(self.std_for(chans)).to(device))
        return self._device_stats[device]

    # ------------------------------------------------------------------------------------------- properties
    @property
    def num_classes(self) -> int:
        """Number of classes of the source (after setup)."""
        self._require_setup()
        if self._num_classes < 0:
            raise RuntimeError(f"class count unknown: no classes.json next to {self.hparams.train_shards} "
                               f"(`lightning-mim make-shards` writes one)")
        return self._num_classes

    @property
    def train_dataset_size(self) -> int:
        """Training samples per epoch over all ranks (after setup)."""
        self._require_setup()
        if self.hparams.source == "webdataset":
            return self._train_samples
        return len(self._train_set)

    @property
    def batch_size(self) -> int:
        """Per-device batch size: `batch_size`, or `global_batch_size` split over devices and accumulation."""
        hp = self.hparams
        if hp.global_batch_size is None:
            return int(hp.batch_size)
        world = self.trainer.world_size if self.trainer is not None else 1
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        shares = world * accumulate
        if hp.global_batch_size % shares:
            raise ValueError(f"global_batch_size={hp.global_batch_size} does not split over {world} device(s) x "
                             f"{accumulate} accumulation step(s) = {shares} shares; choose a multiple of {shares} "
                             f"or change trainer.devices / num_nodes / accumulate_grad_batches")
        return hp.global_batch_size // shares

    @property
    def skipped_samples(self) -> int:
        """Distinct unreadable images / samples / shards met so far by this process (this rank) and its loader
        workers, each counted once however often it is re-read (logged as `data/skipped_samples`)."""
        return self._counter.distinct if self._counter is not None else 0

    @property
    def skipped_samples_epoch(self) -> int:
        """Distinct unreadable items met in the current epoch (training, validation and k-NN passes together;
        logged as `data/skipped_samples_epoch`)."""
        return self._counter.in_epoch if self._counter is not None else 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch that `skipped_samples_epoch` counts in (the methods set it when an epoch starts, after setup)."""
        if self._counter is not None:
            self._counter.set_epoch(epoch)

    # -------------------------------------------------------------------------------------------- loaders
    def train_dataloader(self) -> Iterable[Any]:
        """(views, label) batches; under DDP every rank yields the same number of batches."""
        self._require_setup()
        hp = self.hparams
        transform = self.eval_transform() if self._train_transform is None else transforms.Compose(
            [ToMode(self._mode), self._train_transform])
        collate = default_collate
        if self._decodes_on_device:
            transform, collate = DeferViews(), collate_encoded
        rank, world = self._rank_world()
        if hp.source == "webdataset":
            batches = self._train_samples // (self.batch_size * world)
            if batches == 0:
                raise ValueError(f"train_samples={self._train_samples} is less than one batch of {self.batch_size} "
                                 f"on each of {world} ranks")
            # Each rank and worker draws shards with replacement from its own randomly seeded stream (webdataset
            # seeds it from pid, time and urandom), so no split by rank is needed; the stream never runs out, so
            # with_epoch cuts exactly `batches` batches on every rank.
            pipeline = webdataset_pipeline(self._train_urls, transform, self._counter, resampled=True,
                                           node_splitter=None, shuffle_buffer=hp.shuffle_buffer,
                                           batch_size=self.batch_size, token_ids_key=hp.token_ids_key,
                                           decode=self._file_decoder, collate=collate)
            loader = wds.WebLoader(pipeline, batch_size=None, shuffle=False, **self._loader_kwargs())
            return loader.with_epoch(batches).with_length(batches, silent=True)
        if hp.drop_last and len(self._train_set) < self.batch_size * world:
            raise ValueError(f"{len(self._train_set)} training samples give no full batch of {self.batch_size} on "
                             f"each of {world} ranks; lower batch_size or set drop_last=False")
        # StatefulDataLoader: Lightning saves its position in every checkpoint and resumes mid-epoch at the next
        # unseen batch; the sampler's order and the per-sample augmentation seeds depend only on data.seed.
        sampler = EpochSampler(self._train_set, num_replicas=world, rank=rank, shuffle=True, seed=hp.seed)
        train_set = self._train_set
        if self._file_decoder is not None and isinstance(self._train_raw, SkippingImageFolder):
            # the same subset of the same files, read by the device-side views' decoder
            train_set = seeded_subset(self._train_raw.reading_with(self._file_decoder), hp.train_subset, hp.seed,
                                      _TRAIN)
        return StatefulDataLoader(Transformed(train_set, transform, hp.seed, self._counter),
                                  batch_size=self.batch_size, sampler=sampler, drop_last=hp.drop_last,
                                  collate_fn=collate, **self._loader_kwargs())

    def val_dataloader(self) -> Iterable[Any]:
        """(image, label) batches of the validation split with the eval transform.

        webdataset: each rank reads its share of `val_shards` once, and with val_subset only the first
        ceil(val_subset / world_size) of its samples; ranks may get different batch counts. Without val_shards
        there is no validation (an empty list).
        """
        self._require_setup()
        hp = self.hparams
        if hp.source == "webdataset":
            if not self._val_urls:
                return []
            rank, world = self._rank_world()
            limit = None if hp.val_subset is None else -(-hp.val_subset // world)
            return self._shard_eval_loader(self._val_urls, NodeSplitter(rank, world), limit)
        return DataLoader(Transformed(self._val_set, self.eval_transform()), batch_size=self.batch_size,
                          shuffle=False, drop_last=False, **self._loader_kwargs())

    @property
    def val_split_by_rank(self) -> bool:
        """True when `val_dataloader()` already gives each DDP rank only its own share (webdataset)."""
        return self.hparams.source == "webdataset"

    def knn_bank_dataloader(self) -> Iterable[Any]:
        """(image, label) batches of the labelled k-NN bank: a fixed subset of the train split, eval transform.

        Every rank gets the whole bank. webdataset: the first knn_bank_size samples of the train shards in order.
        """
        self._require_setup()
        hp = self.hparams
        if hp.source == "webdataset":
            return self._shard_eval_loader(self._train_urls, None, hp.knn_bank_size)
        return DataLoader(Transformed(self._knn_set, self.eval_transform()), batch_size=self.batch_size,
                          shuffle=False, drop_last=False, **self._loader_kwargs())

    # ------------------------------------------------------------------------------------------- helpers
    def _shard_eval_loader(self, urls: list[str], node_splitter: NodeSplitter | None,
                           limit: int | None) -> Iterable[Any]:
        """Read shards once in order with the eval transform, keeping at most `limit` samples."""
        bs = self.batch_size
        pipeline = webdataset_pipeline(urls, self.eval_transform(), self._counter, resampled=False,
                                       node_splitter=node_splitter, batch_size=bs, partial_batches=True)
        loader = wds.WebLoader(pipeline, batch_size=None, shuffle=False, **self._loader_kwargs())
        if limit is None:
            return loader
        return loader.unbatched().slice(limit).batched(bs, collation_fn=default_collate, partial=True)

    @property
    def _mode(self) -> str:
        return "L" if self.in_chans == 1 else "RGB"

    @property
    def _decodes_on_device(self) -> bool:
        return self.hparams.decode_on == "device" and self._augment_module is not None

    @property
    def _file_decoder(self) -> Callable[[bytes, str], Any] | None:
        """How the training loader reads image files for device-side views: the JPEG bytes left to the device
        (decode_on device), or decoded straight to tensors; None (PIL images) for the per-image reference views."""
        if self._augment_module is None:
            return None
        if self._decodes_on_device:
            return EncodedReader(self._mode)
        if self.hparams.crop_decode and decodes_crop_region(self._train_transform):
            return CropDecoder(self._mode)
        return TensorDecoder(self._mode)

    def native_format(self) -> tuple[int, int] | None:
        """(image size, channels) that every image of the source has: 28 x 28 grey for Fashion-MNIST,
        synthetic_image_size RGB for synthetic; None for image folders and shards (any size, colour or grey)."""
        if self.hparams.source == "fashion_mnist":
            return 28, 1
        if self.hparams.source == "synthetic":
            return self.hparams.synthetic_image_size, 3
        return None

    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return int(self.trainer.global_rank), int(self.trainer.world_size)

    def _loader_kwargs(self) -> dict[str, Any]:
        workers = self.hparams.num_workers
        # an own generator for the loaders' worker base seeds, so that creating a loader iterator (each epoch, each
        # validation, a resume) draws nothing from the global generator the methods' masking uses
        return {"num_workers": workers,
                "pin_memory": self.hparams.pin_memory and torch.cuda.is_available(),
                "persistent_workers": self.hparams.persistent_workers and workers > 0,
                "generator": torch.Generator().manual_seed(self.hparams.seed)}

    def _require_setup(self) -> None:
        if self._num_classes is None:
            raise RuntimeError("MIMDataModule.setup() has not been called")
