"""Every method at micro size (ViT 128 wide, 4 deep, patch 4) with small heads, for the tests that run all of them."""
import tempfile
from pathlib import Path
from typing import Any

import torch

from lightning_mim.methods import BEiT, BeyondMasking, LUT, MAE, MaPeT, MIMMethod, SimMIM, SymMIM
from lightning_mim.targets.kmeans import random_pixel_codebook

MAE_DECODER = {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2}
MICRO_HEADS: dict[type, dict[str, Any]] = {
    MAE: MAE_DECODER,
    LUT: {**MAE_DECODER, "head_hidden_dim": 32},
    SimMIM: {"mask_patch_size": 8},
    SymMIM: {"mask_patch_size": 8, "head_hidden_dim": 32, "head_out_dim": 16},
    BeyondMasking: MAE_DECODER,  # its default objective, zoom_in_masking (a)+(m): 20-px views for a 16-px encoder
    BEiT: {"num_masked_patches": 6, "min_masked_per_block": 2},
    MaPeT: {},
}
TOKEN_METHODS = (BEiT, MaPeT)
METHODS = list(MICRO_HEADS)


def micro_cli_model(method: str = "MAE", img_size: int = 32) -> list[str]:
    """The same micro models as LightningCLI arguments (`--model <Name>` and its init args), lr 2e-3; token methods
    tokenise with a random pixel k-means codebook (`micro_codebook`) for the synthetic RGB images."""
    cls = next(cls for cls in METHODS if cls.__name__ == method)
    tokenizer = (["--model.tokenizer.kind", "kmeans", "--model.tokenizer.path", str(micro_codebook(img_size)),
                  "--model.optim.cooldown_epochs", "0"] if cls in TOKEN_METHODS else [])
    return ["--model", method, "--model.backbone.size", "micro", "--model.backbone.img_size", str(img_size),
            "--model.backbone.patch_size", "4", "--model.optim.lr", "2e-3", "--model.optim.warmup_steps", "2",
            *(word for key, value in MICRO_HEADS[cls].items() for word in (f"--model.{key}", str(value))), *tokenizer]


def micro_codebook(img_size: int, in_chans: int = 3, vocab_size: int = 16) -> Path:
    """A k-means codebook over normalised 4-px pixel patches with random centroids, written once per setting."""
    return random_pixel_codebook(Path(tempfile.gettempdir()) / "lightning_mim_tests" /
                                 f"pixels_p4_{img_size}px_c{in_chans}_v{vocab_size}.st", 4, img_size, in_chans,
                                 vocab_size)


def micro_method(method: type[MIMMethod], img_size: int = 16, **kwargs: Any) -> MIMMethod:
    """The micro model of `method`; token-predicting methods get a `PatchColourTokenizer` (3 channels, V = 8)."""
    if method in TOKEN_METHODS:  # MaPeT's optimiser cools down for 10 epochs: none in runs of a few steps
        kwargs.setdefault("tokenizer", PatchColourTokenizer(img_size, 4, in_chans=3, levels=2))
        kwargs["optim"] = {"cooldown_epochs": 0, **kwargs.get("optim", {})}
    return method(backbone=dict(size="micro", img_size=img_size, patch_size=4), **{**MICRO_HEADS[method], **kwargs})


class PatchColourTokenizer(torch.nn.Module):
    """A tokenizer for tests: the id of a patch is its mean intensity per channel quantised to `levels` steps
    (V = levels ** channels), so the targets are a learnable function of the patch (the spec's synthetic targets)."""

    def __init__(self, input_size: int = 16, patch_size: int = 4, in_chans: int = 1, levels: int = 4) -> None:
        super().__init__()
        self.input_size, self.patch_size, self.in_chans, self.levels = input_size, patch_size, in_chans, levels
        self.vocab_size = levels ** in_chans
        self.grid_size = (input_size // patch_size, input_size // patch_size)
        self.register_buffer("place", levels ** torch.arange(in_chans))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        means = torch.nn.functional.avg_pool2d(images.float(), self.patch_size)  # (B, C, h, w)
        levels = (means * self.levels).long().clamp(0, self.levels - 1)
        return (levels * self.place.view(1, -1, 1, 1)).sum(dim=1)

    def check_matches(self, vocab_size: int, grid_size: tuple[int, int]) -> None:
        assert vocab_size == self.vocab_size and tuple(grid_size) == self.grid_size
