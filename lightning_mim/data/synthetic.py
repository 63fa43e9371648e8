"""The `synthetic` source: deterministic striped images generated on access, for tests and smoke runs."""
from __future__ import annotations

import numpy as np
from PIL import Image
from torch.utils.data import Dataset


class SyntheticImages(Dataset):
    """Deterministic RGB images whose class sets the stripe orientation, frequency and colour; noise on top.

    Image i depends only on (seed, stream, i), so it is generated on access and costs no memory.
    The label of image i is i % num_classes.
    """

    def __init__(self, size: int, image_size: int, num_classes: int, seed: int, stream: int) -> None:
        if size <= 0 or image_size <= 0 or num_classes <= 0:
            raise ValueError(f"synthetic data needs positive sizes, got size={size}, "
                             f"image_size={image_size}, num_classes={num_classes}")
        self.size, self.image_size, self.num_classes = size, image_size, num_classes
        self.seed, self.stream = seed, stream
        grid = np.arange(image_size, dtype=np.float32) / image_size
        self._yy, self._xx = np.meshgrid(grid, grid, indexing="ij")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        if not 0 <= index < self.size:
            raise IndexError(index)
        label = index % self.num_classes
        rng = np.random.default_rng([self.seed, self.stream, index])
        angle = np.pi * label / self.num_classes
        cycles = 2 + label % 3
        along = np.cos(angle) * self._xx + np.sin(angle) * self._yy
        stripes = 0.5 + 0.5 * np.sin(2 * np.pi * cycles * along + rng.uniform(0, 2 * np.pi))
        colour = 0.6 + 0.4 * np.cos(2 * np.pi * (label / self.num_classes + np.array([0.0, 1 / 3, 2 / 3])))
        image = stripes[..., None] * colour + rng.normal(0.0, 0.1, (*stripes.shape, 3))
        return Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)), label
