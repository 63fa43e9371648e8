"""The visual tokenizer interface: [0, 1] images -> a (B, h, w) grid of integer ids in [0, V).

A tokenizer is a frozen module: every weight, codebook and normalisation constant is a buffer or a frozen parameter,
so it is saved in the checkpoint of the method that holds it, and a resumed or re-loaded run tokenises with the
checkpoint's copy. It always runs in eval mode, under `torch.no_grad`, and its forward makes no host-device sync.
"""
from __future__ import annotations

import abc
import importlib
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
from PIL import Image
from torchvision.transforms import v2

from lightning_mim.reliability import check_vocabulary

TokenizerKind = Literal["kmeans", "vqkd"]
# Rows of features compared with the codebook at once: bounds the (rows, V) distance matrix (16384 x 8192 fp32 is
# 512 MiB) on the accelerator.
NEAREST_CHUNK = 16384
COMPUTE_DTYPES = {None: None, "float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the pip extra that brings it."""


def require(module: str, purpose: str) -> Any:
    """Import `module` or fail naming the `tokenizers` extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = {"faiss": "faiss-cpu", "open_clip": "open-clip-torch"}.get(module, module)
        raise MissingExtraError(
            f"{purpose} needs the Python package {package!r}, which is not installed: "
            f"pip install 'lightning_mim[tokenizers]' (or `make install`, which installs it)") from error


@dataclass
class TokenizerConfig:
    """What a method's YAML holds under `tokenizer:`.

    kind: "kmeans" (nearest centroid of per-patch features) or "vqkd" (BEiT v2's VQ-KD tokenizer).
    path: k-means: the codebook .safetensors written by `lightning-mim tokenizer fit`; vqkd: the released .pth.
    features: k-means only, and must equal the codebook's: "pixels" (per-patch normalised pixels), "timm:<model>"
        (a timm model's last feature map), "timm" (an encoder written by `lightning-mim export`, architecture read
        from the file) or "open_clip:<arch>" (e.g. "open_clip:RN50x64", the ModifiedResNet's layer-4 map, k-CLIP).
    weights: the extractor's local weights file (timm / open_clip features); the codebook records the one it was
        fitted with, used when this is None. Nothing is downloaded.
    input_size: side of the [0, 1] view the tokenizer takes; None = the kind's default (vqkd 224, k-means: the
        codebook's recorded size, 448 for k-CLIP).
    compute_dtype: the extractor's autocast dtype: None / "float32" (exact, autocast off), "bfloat16", "float16" (the
        official k-CLIP casts RN50x64 to fp16). The nearest-code search always runs in float32.
    vocab_size, patch_size: when set, the V and (k-means) patch size the tokenizer must have: checked when it is
        built, and written into the `tokenizer fit` command printed when a codebook is missing.
    nredo, max_points_per_centroid: k-means only; when set, the restarts and faiss points per centroid the codebook
        must have been fitted with (k-CLIP: 5 and 512, where `tokenizer fit` defaults to 1 and 256): a codebook
        recording other settings is refused with the `tokenizer fit` command that fits the recipe's.
    vqkd_*: the VQ-KD architecture; the defaults are `vqkd_encoder_base_decoder_3x768x12_clip` (ViT-B/16, 8192 x 32
        codebook). A checkpoint of another shape fails with a message naming the differing key.
    """

    kind: TokenizerKind = "kmeans"
    path: str | None = None
    features: str = "pixels"
    weights: str | None = None
    input_size: int | None = None
    compute_dtype: str | None = None
    vocab_size: int | None = None
    patch_size: int | None = None
    nredo: int | None = None
    max_points_per_centroid: int | None = None
    vqkd_embed_dim: int = 768
    vqkd_depth: int = 12
    vqkd_heads: int = 12
    vqkd_patch_size: int = 16
    vqkd_vocab_size: int = 8192
    vqkd_code_dim: int = 32

    def __post_init__(self) -> None:
        if self.kind not in ("kmeans", "vqkd"):
            raise ValueError(f"unknown tokenizer kind {self.kind!r}: choose 'kmeans' or 'vqkd'")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"unknown compute_dtype {self.compute_dtype!r}: choose one of "
                             f"{', '.join(str(key) for key in COMPUTE_DTYPES)}")
        if self.input_size is not None and self.input_size <= 0:
            raise ValueError(f"tokenizer input_size must be positive, got {self.input_size}")

    @classmethod
    def coerce(cls, value: TokenizerConfig | dict[str, Any]) -> TokenizerConfig:
        return value if isinstance(value, cls) else cls(**value)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Tokenizer(nn.Module, abc.ABC):
    """Base class: frozen, always in eval mode. Subclasses set `vocab_size`, `input_size`, `grid_size`, `in_chans`
    and implement `encode` ((B, in_chans, S, S) in [0, 1] -> (B, h, w) int64)."""

    vocab_size: int
    input_size: int
    grid_size: tuple[int, int]
    in_chans: int

    def __init__(self, compute_dtype: str | None = None) -> None:
        super().__init__()
        self.compute_dtype = COMPUTE_DTYPES[compute_dtype]

    def freeze(self) -> Tokenizer:
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> Tokenizer:
        """A tokenizer never leaves eval mode (batch-norm statistics and the codebook stay fixed)."""
        return super().train(False)

    def check_input(self, images: torch.Tensor) -> None:
        expected = (self.in_chans, self.input_size, self.input_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"{type(self).__name__} takes [0, 1] images of shape (B, {expected[0]}, {expected[1]}, "
                             f"{expected[2]}), got {tuple(images.shape)}: give it the tokenizer view (its own size "
                             f"and channels, not ImageNet-normalised)")

    def check_matches(self, vocab_size: int, grid_size: tuple[int, int]) -> None:
        """Fail clearly unless this tokenizer's vocabulary is the head's and its grid is the backbone's patch grid."""
        check_vocabulary(self.vocab_size, vocab_size)
        if tuple(grid_size) != tuple(self.grid_size):
            raise ValueError(f"the tokenizer gives a {self.grid_size[0]} x {self.grid_size[1]} id grid at "
                             f"{self.input_size} px but the backbone's patch grid is {grid_size[0]} x {grid_size[1]}; "
                             f"choose a tokenizer input_size / patch size whose grid equals the backbone's")

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.check_input(images)
        return self.encode(images.float())

    @abc.abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, h, w) int64 ids of checked float [0, 1] images, under no_grad."""

    def autocast(self, device_type: str) -> torch.autocast:
        """The extractor's precision: autocast to `compute_dtype`, or autocast off (float32)."""
        dtype = self.compute_dtype
        return torch.autocast(device_type, dtype=dtype, enabled=dtype is not None)


def nearest_code(features: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the codebook row nearest in L2 to each feature row: argmin ||f||^2 - 2 f.c + ||c||^2 (the ||f||^2
    term is the same for every row), in float32, in fixed-size chunks.
    features (N, d), codebook (V, d) -> (N,) int64."""
    codebook = codebook.float()
    squared_norms = codebook.pow(2).sum(dim=1)
    ids = [torch.addmm(squared_norms, chunk.float(), codebook.T, alpha=-2.0).argmin(dim=1)
           for chunk in features.split(NEAREST_CHUNK)]
    return torch.cat(ids)


def centre_square_view(size: int, mode: Literal["L", "RGB"]) -> v2.Compose:
    """The tokenizer view used by `tokenizer fit` / `tokenizer encode`: the centred largest square of the image,
    resized to `size` (bicubic, antialiased), as a float [0, 1] tensor. This is the region of MaPeT's pre-training
    crop (timm RandomResizedCrop with scale (1, 1) and ratio (1, 1)); precomputed ids are valid only for it."""
    return v2.Compose([CentreSquare(mode), v2.PILToTensor(),
                       v2.Resize((size, size), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                       v2.ToDtype(torch.float32, scale=True)])


class CentreSquare:
    """PIL image -> its centred largest square, converted to `mode` ('L' or 'RGB')."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, image: Image.Image) -> Image.Image:
        image = image if image.mode == self.mode else image.convert(self.mode)
        width, height = image.size
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return image.crop((left, top, left + side, top + side))
