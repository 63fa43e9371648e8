"""Decoding on the training device (`MIMDataModule(decode_on="device")`): the loader workers only read the files and
hand over the encoded JPEG bytes; the main process decodes each batch with one `torchvision.io.decode_jpeg` call on
the training device (nvJPEG on a GPU; libjpeg-turbo on the CPU, which the CPU tests use) and runs the method's
`loader_views` (the geometric crops) there, image by image, with the random draws seeded per sample in the worker.

Images that are not JPEG (PNG, ...) are decoded in the worker (`decode_to_tensor`) and cropped on the device with
the others. A JPEG that reads but does not decode fails the batch with an error naming it: shards written by
`lightning-mim make-shards` have every image decode-checked; folders with broken files need `decode_on: loader`,
which skips them.

torchvision 0.29 deprecates its image decoders in favour of TorchCodec (which needs FFmpeg libraries); these are
still the fastest decoders available here (pyproject.toml filters the deprecation warning in the tests).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch.utils.data import default_collate
from torchvision.io import ImageReadMode, decode_jpeg

from lightning_mim.data.decode import decode_to_tensor, pil_luma

_JPEG = b"\xff\xd8"


class EncodedImage(NamedTuple):
    """One training image whose decoding and crop are left to the device: `data` is the JPEG file (uint8, 1-D) when
    `encoded`, else the decoded uint8 image (C, H, W); `seed` seeds its crop draws; `name` names it in errors."""

    data: torch.Tensor
    encoded: bool
    seed: int
    name: str


class EncodedReader:
    """(file bytes, name) -> EncodedImage: JPEG bytes as they are, other formats decoded here in `mode`; picklable,
    for the loader workers. The seed is set later, by `DeferViews`."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, data: bytes, name: str) -> EncodedImage:
        if data.startswith(_JPEG):
            return EncodedImage(torch.frombuffer(bytearray(data), dtype=torch.uint8), True, 0, str(name))
        return EncodedImage(decode_to_tensor(data, self.mode), False, 0, str(name))


class DeferViews:
    """The train transform of `decode_on="device"`: draws the seed of the image's crop from torch's generator, which
    `Transformed` seeds per sample and epoch, so the crop is the same whichever worker reads it and after a resume."""

    def __call__(self, image: EncodedImage) -> EncodedImage:
        return image._replace(seed=int(torch.randint(2**62, ()).item()))


def collate_encoded(samples: list[tuple[EncodedImage, Any]]) -> tuple[list[EncodedImage], torch.Tensor]:
    """A batch of (EncodedImage, label): the images as a list (their sizes differ), the labels collated."""
    images, labels = zip(*samples)
    return list(images), default_collate(list(labels))


@contextmanager
def _torch_seeded(seed: int) -> Iterator[None]:
    """Torch's CPU generator (what torchvision's transforms draw their crops from) seeded, then restored."""
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(state)


def decode_batch(images: list[EncodedImage], mode: str, device: torch.device) -> list[torch.Tensor]:
    """Every image of the batch as a uint8 (C, H, W) tensor on `device`, the JPEGs in one `decode_jpeg` call."""
    jpegs = [index for index, image in enumerate(images) if image.encoded]
    rgb = ImageReadMode.RGB
    try:
        decoded = decode_jpeg([images[index].data for index in jpegs], mode=rgb, device=device) if jpegs else []
    except RuntimeError:
        decoded = []
        for index in jpegs:  # find the image that fails, to name it
            try:
                decoded.append(decode_jpeg(images[index].data, mode=rgb, device=device))
            except RuntimeError as exc:
                raise ValueError(f"{images[index].name} does not decode ({exc}); with decode_on 'device' every JPEG "
                                 f"must decode: write shards with `lightning-mim make-shards` (it checks each image) "
                                 f"or set data.decode_on 'loader', which skips unreadable images") from exc
    if mode == "L":  # PIL's luma of the RGB decode, as decode_to_tensor and the reference pipeline
        decoded = [pil_luma(pixels) for pixels in decoded]
    by_index = dict(zip(jpegs, decoded))
    return [by_index[index] if image.encoded else image.data.to(device, non_blocking=True)
            for index, image in enumerate(images)]


def decode_views(images: list[EncodedImage], views: Callable[[torch.Tensor], Any], mode: str,
                 device: torch.device) -> torch.Tensor | list[torch.Tensor]:
    """Decode a batch on `device` and apply the method's `loader_views` to each image with its seed: the uint8 views
    (B, C, H, W), or a list of them for a method with several views."""
    outputs = []
    for image, pixels in zip(images, decode_batch(images, mode, device)):
        with _torch_seeded(image.seed):
            outputs.append(views(pixels))
    if isinstance(outputs[0], (tuple, list)):
        return [torch.stack(view) for view in zip(*outputs)]
    return torch.stack(outputs)
