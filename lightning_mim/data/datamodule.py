"""MIMDataModule: the one LightningDataModule shared by every method, for four image sources."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate
from torchvision import transforms

from lightning_mim.data.decode import ToMode
from lightning_mim.data.device_decode import DeferViews, collate_encoded
from lightning_mim.data.device_views import DeviceViews, has_device_views
from lightning_mim.data.map_source import MapSource
from lightning_mim.data.options import Place, Source, check_options, per_device_batch_size
from lightning_mim.data.shard_source import ShardSource
from lightning_mim.data.skipping import SkipCounter
from lightning_mim.data.views import DEFAULT_STATS, eval_transform, expand_stats

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
        check_options(source=source, batch_size=batch_size, num_workers=num_workers,
                      global_batch_size=global_batch_size, token_ids_key=token_ids_key,
                      eval_resize_ratio=eval_resize_ratio, augment_on=augment_on, decode_on=decode_on)
        self.save_hyperparameters()
        self._image_size: int | None = None
        self._in_chans: int | None = None
        self._train_transform: Callable[[Image.Image], Any] | None = None
        self._counter: SkipCounter | None = None
        self._num_classes: int | None = None
        self._source: MapSource | ShardSource | None = None
        self._device_views: DeviceViews | None = None  # the views completed on the device (augment_on "device")

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
        self._device_views = None if augment_module is None else DeviceViews(
            augment_module, train_transform, self._mode, self.mean_for(in_chans), self.std_for(in_chans),
            self.hparams.decode_on, self.hparams.crop_decode)

    def mean_for(self, in_chans: int) -> tuple[float, ...]:
        """Normalisation mean for a model with in_chans channels."""
        mean = self.hparams.mean or DEFAULT_STATS[self.hparams.source][0]
        return expand_stats(mean, in_chans, "mean")

    def std_for(self, in_chans: int) -> tuple[float, ...]:
        """Normalisation std for a model with in_chans channels."""
        std = self.hparams.std or DEFAULT_STATS[self.hparams.source][1]
        return expand_stats(std, in_chans, "std")

    def eval_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """PIL image -> normalised tensor at the model's size and channel count (`views.eval_transform`)."""
        native = self.native_format()
        return eval_transform(self.hparams.source, self.image_size, None if native is None else native[0], self._mode,
                              self.mean_for(self.in_chans), self.std_for(self.in_chans), self.hparams.eval_resize_ratio)

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self, stage: str | None = None) -> None:
        """Bind to the attached LightningModule if it declares its views, and build the datasets (once)."""
        self._bind_from_trainer()
        _ = self.batch_size  # a global batch that does not split over the devices fails here, before any compute
        if self._counter is None:
            self._counter = SkipCounter()
        if self._num_classes is not None:
            return
        if self.hparams.source == "webdataset":
            self._source = ShardSource.build(self.hparams)
        else:
            self._source = MapSource.build(self.hparams, self._counter)
        self._num_classes = self._source.num_classes

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
        return self._device_views.decode(images, trainer.strategy.root_device), labels

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Training batches of device-side views (`augment_on="device"`): uint8 -> [0, 1] floats, the module's
        `augment_views` (its draws come from the device's generator, saved in checkpoints), then normalisation.
        Other batches pass unchanged."""
        trainer = self.trainer
        if self._device_views is None or trainer is None or not trainer.training:
            return batch
        views, labels = batch
        views = self._device_views.complete(views)
        # what Lightning does to float inputs before the transfer (to bf16 / fp16 under "-true" precision), which
        # the uint8 batch skipped
        plugin = getattr(trainer, "precision_plugin", None)
        return (plugin.convert_input(views) if plugin is not None else views), labels

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
        return self._source.train_size

    @property
    def batch_size(self) -> int:
        """Per-device batch size: `batch_size`, or `global_batch_size` split over devices and accumulation."""
        hp, trainer = self.hparams, self.trainer
        if hp.global_batch_size is None:
            return int(hp.batch_size)
        return per_device_batch_size(hp.global_batch_size, trainer.world_size if trainer is not None else 1,
                                     trainer.accumulate_grad_batches if trainer is not None else 1)

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
        transform = self.eval_transform() if self._train_transform is None else transforms.Compose(
            [ToMode(self._mode), self._train_transform])
        collate = default_collate
        if self._decodes_on_device:
            transform, collate = DeferViews(), collate_encoded
        rank, world = self._rank_world()
        return self._source.train_loader(transform, self._counter, self._file_decoder, batch_size=self.batch_size,
                                         rank=rank, world=world, collate=collate, loader_options=self._loader_kwargs())

    def val_dataloader(self) -> Iterable[Any]:
        """(image, label) batches of the validation split with the eval transform.

        webdataset: each rank reads its share of `val_shards` once, and with val_subset only the first
        ceil(val_subset / world_size) of its samples; ranks may get different batch counts. Without val_shards
        there is no validation (an empty list).
        """
        self._require_setup()
        rank, world = self._rank_world()
        return self._source.val_loader(self.eval_transform(), self._counter, batch_size=self.batch_size, rank=rank,
                                       world=world, loader_options=self._loader_kwargs())

    @property
    def val_split_by_rank(self) -> bool:
        """True when `val_dataloader()` already gives each DDP rank only its own share (webdataset)."""
        return self.hparams.source == "webdataset"

    def knn_bank_dataloader(self) -> Iterable[Any]:
        """(image, label) batches of the labelled k-NN bank: a fixed subset of the train split, eval transform.

        Every rank gets the whole bank. webdataset: the first knn_bank_size samples of the train shards in order.
        """
        self._require_setup()
        return self._source.knn_bank_loader(self.eval_transform(), self._counter, batch_size=self.batch_size,
                                            loader_options=self._loader_kwargs())

    # ------------------------------------------------------------------------------------------- helpers
    @property
    def _train_set(self) -> Dataset:
        """The training subset of a map-style source (after setup); `_val_set` and `_knn_set` likewise."""
        return self._source.train

    @property
    def _val_set(self) -> Dataset:
        return self._source.val

    @property
    def _knn_set(self) -> Dataset:
        return self._source.knn

    @property
    def _mode(self) -> str:
        return "L" if self.in_chans == 1 else "RGB"

    @property
    def _decodes_on_device(self) -> bool:
        return self._device_views is not None and self._device_views.decodes_on_device

    @property
    def _file_decoder(self) -> Callable[[bytes, str], Any] | None:
        """How the training loader reads image files for device-side views (`DeviceViews.file_decoder`); None (PIL
        images) for the per-image reference views."""
        return None if self._device_views is None else self._device_views.file_decoder()

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
