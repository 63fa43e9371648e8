"""Fashion-MNIST from the idx files of the Debian package `dataset-fashion-mnist`."""
from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# where `make data` unpacks the Debian package when it cannot install it system-wide (no root)
LOCAL_FASHION_MNIST_DIR = ".data/fashion-mnist/usr/share/datasets/fashion-mnist"


def default_fashion_mnist_dir() -> str:
    """The Debian package's folder, or the copy `make data` unpacked without root, whichever exists."""
    for candidate in (FASHION_MNIST_DIR, LOCAL_FASHION_MNIST_DIR):
        if Path(candidate, "train-images-idx3-ubyte.gz").is_file():
            return candidate
    return FASHION_MNIST_DIR
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
_UINT8_CODE = 0x08


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (gzip-compressed when the name ends in .gz) holding uint8 data.

    Layout: two zero bytes, a type code (0x08 = uint8), the number of dimensions, one big-endian uint32 per
    dimension, then the data in C order.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"{path}: cannot read idx file ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an idx file (bad magic number {raw[:4].hex() or 'empty'})")
    if raw[2] != _UINT8_CODE:
        raise ValueError(f"{path}: idx type code 0x{raw[2]:02x} is not supported (only 0x08 = uint8)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise ValueError(f"{path}: truncated idx header ({ndim} dimensions, {len(raw)} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise ValueError(f"{path}: idx header declares shape {shape} ({expected} bytes of data) "
                         f"but the file holds {len(raw) - header} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def fashion_mnist_files(data_dir: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """Paths of the images and labels files of a split ('train' or 'test')."""
    prefix = _SPLIT_PREFIX[split]
    root = Path(data_dir)
    return root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"


def load_fashion_mnist(data_dir: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Load a split as (images uint8 [N, 28, 28], labels uint8 [N])."""
    images_path, labels_path = fashion_mnist_files(data_dir, split)
    for path in (images_path, labels_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"Fashion-MNIST file {path} not found. Install the data with "
                f"`sudo apt-get install dataset-fashion-mnist` (Debian package; puts the files under "
                f"{FASHION_MNIST_DIR}) or pass `--data.data_dir DIR` with a directory holding "
                f"{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte.gz."
            )
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3:
        raise ValueError(f"{images_path}: expected 3 dimensions (N, H, W), got shape {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"{labels_path}: expected {len(images)} labels, got shape {labels.shape}")
    return images, labels


class ArrayImages(Dataset):
    """Images held in memory as a uint8 array ([N, H, W] grey or [N, H, W, 3] RGB); PIL images made on access."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index]), int(self.labels[index])
