"""Decode only the crop of a JPEG (`MIMDataModule(crop_decode=True)`): the loader workers read a training JPEG's
header (`read_jpeg` -> `JPEGFile`), and `RegionResizedCrop` draws its crop exactly as torchvision's
RandomResizedCrop does, then has libjpeg-turbo decode that region alone (TurboJPEG 3's cropping region: rows
below the crop are not read, rows above are entropy-decoded only, columns outside it are not transformed).

The pixels equal those of a full decode cropped afterwards (tested for every subsampling, progressive and grey
files, at every offset): the region is widened by `CONTEXT` pixels, whose chroma the upsampling of the crop's edge
pixels reads, and its left edge is put on an iMCU boundary as libjpeg-turbo requires. Anything the region decode
cannot do (a warning, a colour space it does not convert) falls back to the full decode, so a file decodes, or
fails, as it does without this module.

TurboJPEG 3 is reached through ctypes: a system libturbojpeg >= 3, else the one bundled by the `turbojpeg` wheel
(`pip install 'lightning_mim[jpeg]'`, which `make install` includes). Without either, JPEGs decode whole.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.metadata
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from lightning_mim.data.decode import TensorDecoder, ToMode, decode_to_tensor, pil_luma
from lightning_mim.data.skipping import UnreadableImage

CONTEXT = 2  # pixels of the full image around the crop that its edge pixels' chroma upsampling reads
_INIT_DECOMPRESS, _PIXEL_RGB = 1, 0
_PARAM_SUBSAMP, _PARAM_WIDTH, _PARAM_HEIGHT, _PARAM_COLORSPACE = 4, 5, 6, 8
_COLORSPACES_TO_RGB = (0, 1, 2)  # RGB, YCbCr, grey; CMYK and YCCK decode whole (through torchvision)
_MCU_WIDTH = (8, 16, 16, 8, 8, 32, 8)  # by TurboJPEG subsampling id: 444, 422, 420, grey, 440, 411, 441
_EOI = b"\xff\xd9"


class _Region(ctypes.Structure):
    _fields_ = [("x", ctypes.c_int), ("y", ctypes.c_int), ("w", ctypes.c_int), ("h", ctypes.c_int)]


def _library_candidates() -> Iterator[str]:
    system = ctypes.util.find_library("turbojpeg")
    if system:
        yield system
    try:
        files = importlib.metadata.files("turbojpeg") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.name.startswith("libturbojpeg"):
            yield str(file.locate())


class TurboJPEG:
    """The few TurboJPEG 3 calls this module makes, with one decompressor handle per process (loader workers are
    forked, and a handle must not be shared)."""

    def __init__(self, library: ctypes.CDLL, path: str) -> None:
        self.library, self.path = library, path
        handle, buffer, size = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t
        for name, restype, argtypes in (
                ("tj3Init", handle, [ctypes.c_int]),
                ("tj3DecompressHeader", ctypes.c_int, [handle, buffer, size]),
                ("tj3Get", ctypes.c_int, [handle, ctypes.c_int]),
                ("tj3SetCroppingRegion", ctypes.c_int, [handle, _Region]),
                ("tj3Decompress8", ctypes.c_int, [handle, buffer, size, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]),
                ("tj3GetErrorStr", ctypes.c_char_p, [handle])):
            function = getattr(library, name)
            function.restype, function.argtypes = restype, argtypes
        self._handle: int | None = None
        self._pid = -1

    @property
    def handle(self) -> int:
        if self._pid != os.getpid():
            self._handle, self._pid = self.library.tj3Init(_INIT_DECOMPRESS), os.getpid()
            if not self._handle:
                raise RuntimeError(f"tj3Init failed in {self.path}")
        return self._handle

    def header(self, data: bytes) -> tuple[int, int, int, int] | None:
        """(height, width, subsampling id, colour space id) of a JPEG, or None when its header does not parse."""
        handle, get = self.handle, self.library.tj3Get
        if self.library.tj3DecompressHeader(handle, data, len(data)) != 0:
            return None
        return (get(handle, _PARAM_HEIGHT), get(handle, _PARAM_WIDTH), get(handle, _PARAM_SUBSAMP),
                get(handle, _PARAM_COLORSPACE))

    def decode_rgb(self, data: bytes, top: int, left: int, height: int, width: int) -> torch.Tensor:
        """uint8 (height, width, 3) RGB pixels of the region, whose left edge must be on an iMCU boundary; raises
        RuntimeError on any error or warning."""
        lib, handle = self.library, self.handle
        pixels = torch.empty((height, width, 3), dtype=torch.uint8)
        if (lib.tj3DecompressHeader(handle, data, len(data)) != 0
                or lib.tj3SetCroppingRegion(handle, _Region(left, top, width, height)) != 0
                or lib.tj3Decompress8(handle, data, len(data), pixels.data_ptr(), 0, _PIXEL_RGB) != 0):
            raise RuntimeError(lib.tj3GetErrorStr(handle).decode(errors="replace"))
        return pixels


@functools.cache
def turbojpeg() -> TurboJPEG | None:
    """The TurboJPEG >= 3 library of this process (the first found of `_library_candidates`), or None."""
    for path in _library_candidates():
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        if hasattr(library, "tj3SetCroppingRegion"):
            return TurboJPEG(library, path)
    return None


@dataclass(frozen=True)
class JPEGFile:
    """A training JPEG read but not decoded: its bytes, its name (for errors), the mode to decode it in ('RGB' or
    'L') and its size. `RegionResizedCrop` decodes its crop."""

    data: bytes
    name: str
    mode: str
    height: int
    width: int
    mcu_width: int


def read_jpeg(data: bytes, name: str, mode: str) -> JPEGFile | None:
    """The JPEG to crop-decode later, or None when it should decode whole now: no TurboJPEG 3, not a JPEG, a
    header that does not parse, a CMYK / YCCK colour space, or no end marker (a truncated file: the full decode
    rejects it, and the loader skips it)."""
    library = turbojpeg()
    if library is None or not data.startswith(b"\xff\xd8"):
        return None
    if not data.endswith(_EOI) and not data.rstrip(b"\x00").endswith(_EOI):  # copies only a zero-padded file
        return None
    header = library.header(data)
    if header is None or header[3] not in _COLORSPACES_TO_RGB:
        return None
    height, width, subsampling, _ = header
    mcu_width = _MCU_WIDTH[subsampling] if 0 <= subsampling < len(_MCU_WIDTH) else 32
    return JPEGFile(data, name, mode, height, width, mcu_width)


class CropDecoder(TensorDecoder):
    """`TensorDecoder` that leaves the JPEGs it can to a `RegionResizedCrop` (`read_jpeg`)."""

    def __call__(self, data: bytes, name: str) -> JPEGFile | torch.Tensor:
        return read_jpeg(data, name, self.mode) or super().__call__(data, name)


def decode_crop(jpeg: JPEGFile, top: int, left: int, height: int, width: int) -> torch.Tensor:
    """uint8 (C, height, width): the crop of the decoded image, in `jpeg.mode`, equal to `decode_to_tensor` of
    the whole file cropped afterwards. Raises `UnreadableImage` when the file does not decode."""
    x0, x1 = max(0, left - CONTEXT) // jpeg.mcu_width * jpeg.mcu_width, min(jpeg.width, left + width + CONTEXT)
    y0, y1 = max(0, top - CONTEXT), min(jpeg.height, top + height + CONTEXT)
    try:
        region = turbojpeg().decode_rgb(jpeg.data, y0, x0, y1 - y0, x1 - x0).permute(2, 0, 1)
        crop = region[:, top - y0:top - y0 + height, left - x0:left - x0 + width]
        return crop if jpeg.mode == "RGB" else pil_luma(crop)
    except RuntimeError:  # a warning or an error: decode whole, as without crop decoding
        try:
            return decode_to_tensor(jpeg.data, jpeg.mode)[:, top:top + height, left:left + width]
        except ValueError as exc:
            raise UnreadableImage(jpeg.name, str(exc)) from exc


class RegionResizedCrop(v2.RandomResizedCrop):
    """torchvision's RandomResizedCrop that also takes a `JPEGFile`: the same draws (its `make_params` on the
    file's size), then only the crop decoded (`decode_crop`) and resized: the same view as a full decode would
    give. Any other input goes to RandomResizedCrop."""

    def forward(self, *inputs: Any) -> Any:
        if len(inputs) != 1 or not isinstance(inputs[0], JPEGFile):
            return super().forward(*inputs)
        return F.resize(self.crop(inputs[0]), self.size, interpolation=self.interpolation, antialias=self.antialias)

    def crop(self, jpeg: JPEGFile) -> torch.Tensor:
        """The crop drawn for the file (its size stands in for the image), decoded: uint8 (C, h, w)."""
        params = self.make_params([torch.empty((0, jpeg.height, jpeg.width), dtype=torch.uint8)])
        return decode_crop(jpeg, params["top"], params["left"], params["height"], params["width"])


def decodes_crop_region(transform: Any) -> bool:
    """Whether `transform` (nested Composes allowed) takes a `JPEGFile`: its first step that changes an image,
    after mode and tensor conversions (which pass a JPEGFile on), is a `RegionResizedCrop`."""
    for step in getattr(transform, "transforms", [transform]):
        if isinstance(step, (v2.PILToTensor, ToMode)):
            continue
        return isinstance(step, RegionResizedCrop) or (hasattr(step, "transforms") and decodes_crop_region(step))
    return False
