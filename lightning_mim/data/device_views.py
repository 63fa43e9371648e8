"""Training views completed on the training device (`MIMDataModule(augment_on="device")`): the loader workers make
the method's `loader_views` (decode and crop, uint8 tensors, a quarter of float32's bytes to collate and copy), and
each training batch is scaled to [0, 1], augmented by the method's `augment_views` and normalised on the device.
With decode_on "device" the workers only read the files, and each batch is decoded and cropped on the device first
(`lightning_mim.data.device_decode`)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lightning_mim.augment import normalize, to_unit_float
from lightning_mim.data.decode import TensorDecoder
from lightning_mim.data.device_decode import EncodedImage, EncodedReader, decode_views
from lightning_mim.data.jpeg_crop import CropDecoder, decodes_crop_region


def has_device_views(module: Any) -> bool:
    """Whether the module's `loader_views` belongs to its `train_transform`: defined by the class that defines
    train_transform or a subclass of it. A method that overrides only train_transform (written before the device
    path) would otherwise get the views of a base class, so its views are made per image in the loader."""
    if not callable(getattr(module, "loader_views", None)):
        return False
    owner = {name: next(cls for cls in type(module).__mro__ if name in vars(cls))
             for name in ("train_transform", "loader_views")}
    return issubclass(owner["loader_views"], owner["train_transform"])


class DeviceViews:
    """The device side of a method's training views: `module.augment_views` after its `loader_views` in the workers,
    for images in `mode` ('L' or 'RGB') normalised with `mean` and `std`."""

    def __init__(self, module: Any, loader_views: Callable[[torch.Tensor], Any], mode: str, mean: tuple[float, ...],
                 std: tuple[float, ...], decode_on: str, crop_decode: bool) -> None:
        self.module, self.loader_views, self.mode = module, loader_views, mode
        self.mean, self.std = mean, std
        self.decode_on, self.crop_decode = decode_on, crop_decode
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def decodes_on_device(self) -> bool:
        return self.decode_on == "device"

    def file_decoder(self) -> Callable[[bytes, str], Any]:
        """How the training loader reads image files: the JPEG bytes left to the device (decode_on device), only the
        region of a `RegionResizedCrop` decoded (crop_decode), or decoded whole straight to tensors."""
        if self.decodes_on_device:
            return EncodedReader(self.mode)
        if self.crop_decode and decodes_crop_region(self.loader_views):
            return CropDecoder(self.mode)
        return TensorDecoder(self.mode)

    def decode(self, images: list[EncodedImage], device: torch.device) -> Any:
        """A batch of encoded images (decode_on device) decoded on `device` and cropped there by `loader_views`,
        each image with its own seed."""
        return decode_views(images, self.loader_views, self.mode, device)

    def complete(self, views: Any) -> Any:
        """uint8 views (a batch, or a list of batches) -> [0, 1] floats, the module's `augment_views` (its draws come
        from the device's generator, saved in checkpoints), then normalisation."""
        many = isinstance(views, (tuple, list))
        floats = [to_unit_float(view) for view in (views if many else [views])]
        floats = self.module.augment_views(floats if many else floats[0])
        mean, std = self._stats_on(floats[0].device if many else floats.device)
        return [normalize(view, mean, std) for view in floats] if many else normalize(floats, mean, std)

    def _stats_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalisation mean and std as tensors on `device`, copied there once."""
        if device not in self._stats:
            self._stats[device] = torch.tensor(self.mean).to(device), torch.tensor(self.std).to(device)
        return self._stats[device]
