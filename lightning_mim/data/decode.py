"""Images in the model's channel mode, and encoded images decoded straight to uint8 tensors in the loader workers
(`lightning_mim.data.device_decode` decodes them on the training device instead)."""
from __future__ import annotations

import io

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2.functional import pil_to_tensor


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
