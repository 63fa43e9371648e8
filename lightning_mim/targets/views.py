"""The views a token-predicting method (BEiT, MaPeT) trains on: the model's view and the tokenizer's view of one
crop. Both come from the same geometric crop; only the model's view is colour-jittered and normalised, and the
tokenizer's view is a [0, 1] tensor at the tokenizer's own size and channel count (VQ-KD: 224 px, k-CLIP: 448 px),
which the tokenizer normalises itself."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from lightning_mim.augment import grayscale
from lightning_mim.reliability import check_vocabulary
from lightning_mim.targets import TokenizerConfig, build_tokenizer

Crop = Literal["center_square", "random_resized"]


class TokenizerViews:
    """PIL image -> (model view, tokenizer view).

    crop="center_square": the centred square of the shorter side (MaPeT's RandomResizedCrop with scale = ratio = 1,
    which always falls back to that square, so precomputed token ids stay aligned); "random_resized":
    RandomResizedCrop(`scale`, 3/4-4/3) with a horizontal flip (BEiT's own recipe). The model view is resized to
    `image_size` (bicubic) and gets ColorJitter(`colour_jitter` x3: brightness, contrast, saturation) when > 0; the
    tokenizer view is resized to `tokenizer_size` from the same crop, unjittered, exactly as `tokenizer fit` /
    `tokenizer encode` see images (`targets.centre_square_view`). With precomputed ids (`data.token_ids_key`) the
    data replaces the tokenizer view by the stored ids."""

    def __init__(self, image_size: int, tokenizer_size: int, mean: tuple[float, ...], std: tuple[float, ...],
                 tokenizer_chans: int = 3, crop: Crop = "center_square", scale: tuple[float, float] = (0.08, 1.0),
                 colour_jitter: float = 0.4) -> None:
        if crop not in ("center_square", "random_resized"):
            raise ValueError(f"unknown crop {crop!r}: choose 'center_square' or 'random_resized'")
        if tokenizer_chans not in (1, 3):
            raise ValueError(f"tokenizer_chans must be 1 or 3, got {tokenizer_chans}")
        self.image_size, self.tokenizer_size, self.crop, self.scale = image_size, tokenizer_size, crop, scale
        self.tokenizer_mode = "L" if tokenizer_chans == 1 else "RGB"
        self.jitter = v2.ColorJitter(colour_jitter, colour_jitter, colour_jitter) if colour_jitter > 0 else None
        self.to_model = v2.Compose([v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])

    def crop_box(self, image: Image.Image) -> tuple[int, int, int, int, bool]:
        """(top, left, height, width, flip) of the crop shared by both views."""
        width, height = image.size
        if self.crop == "center_square":
            side = min(width, height)
            return (height - side) // 2, (width - side) // 2, side, side, False
        top, left, crop_h, crop_w = v2.RandomResizedCrop.get_params(image, list(self.scale), [3 / 4, 4 / 3])
        return top, left, crop_h, crop_w, bool(torch.rand(()) < 0.5)

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        top, left, crop_h, crop_w, flip = self.crop_box(image)
        region = image.crop((left, top, left + crop_w, top + crop_h))
        if flip:
            region = F.horizontal_flip(region)
        model_view = region.resize((self.image_size,) * 2, Image.BICUBIC)
        if self.jitter is not None:
            model_view = self.jitter(model_view)
        # resized as `centre_square_view` does, so ids computed here equal those `tokenizer encode` stored
        tokenizer_view = F.resize(F.pil_to_tensor(region.convert(self.tokenizer_mode)), [self.tokenizer_size] * 2,
                                  interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
        return self.to_model(model_view), F.to_dtype(tokenizer_view, torch.float32, scale=True)


class TokenTargets(nn.Module):
    """The ids a token-predicting method learns: a frozen tokenizer (kept in eval mode, saved in the method's
    checkpoints so a resumed run tokenises identically) applied in the step to the tokenizer view, or ids the data
    precomputed (an integer views[1]; then `tokenizer` may be None and `vocab_size` must be given)."""

    def __init__(self, tokenizer: TokenizerConfig | dict | nn.Module | None, vocab_size: int | None,
                 grid_size: tuple[int, int]) -> None:
        super().__init__()
        if tokenizer is None:
            if vocab_size is None:
                raise ValueError("a token-predicting method needs a `tokenizer` (e.g. {kind: kmeans, path: "
                                 "codebook.safetensors}) or, for precomputed ids, `vocab_size`")
            self.tokenizer = None
        else:
            self.tokenizer = tokenizer if isinstance(tokenizer, nn.Module) else build_tokenizer(tokenizer)
            self.tokenizer.requires_grad_(False).eval()
            if vocab_size is not None:
                check_vocabulary(self.tokenizer.vocab_size, vocab_size)
            vocab_size = self.tokenizer.vocab_size
            self.tokenizer.check_matches(vocab_size, grid_size)
        self.vocab_size, self.grid_size = int(vocab_size), tuple(grid_size)
        self.mean: tuple[float, ...] | None = None
        self.std: tuple[float, ...] | None = None

    def bind(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        """The data's normalisation (the method's `train_transform` receives it), to recover pixels from views."""
        self.mean, self.std = tuple(mean), tuple(std)

    @property
    def input_size(self) -> int | None:
        return None if self.tokenizer is None else self.tokenizer.input_size

    @property
    def in_chans(self) -> int:
        return 3 if self.tokenizer is None else self.tokenizer.in_chans

    def forward(self, tokenizer_input: torch.Tensor) -> torch.Tensor:
        """(B, h * w) int64 ids in raster order from a [0, 1] tokenizer view (B, C, S, S) or precomputed ids."""
        if tokenizer_input.is_floating_point():
            if self.tokenizer is None:
                raise ValueError("got a tokenizer view but no tokenizer: set the method's `tokenizer`, or train on "
                                 "precomputed ids (`lightning-mim tokenizer encode`)")
            with torch.no_grad():
                tokenizer_input = self.tokenizer(tokenizer_input)
        ids = tokenizer_input.long().flatten(1)
        if ids.shape[1] != self.grid_size[0] * self.grid_size[1]:
            raise ValueError(f"got {ids.shape[1]} token ids per image, the backbone's patch grid has "
                             f"{self.grid_size[0]} x {self.grid_size[1]}: tokenise at the backbone's grid")
        return ids

    def stats(self, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The bound normalisation, or ImageNet's (its channel mean for grey images) before a DataModule binds."""
        if self.mean is not None:
            return self.mean, self.std
        if channels == 1:
            return (sum(IMAGENET_DEFAULT_MEAN) / 3,), (sum(IMAGENET_DEFAULT_STD) / 3,)
        return IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    def view_of(self, images: torch.Tensor) -> torch.Tensor | None:
        """The tokenizer view of a normalised model view (validation: the eval crop, resized; indicative only);
        None without a tokenizer."""
        if self.tokenizer is None:
            return None
        shape = (1, -1, 1, 1)
        mean, std = self.stats(images.shape[1])
        pixels = images.float() * images.new_tensor(std).view(shape) + images.new_tensor(mean).view(shape)
        if pixels.shape[1] != self.in_chans:  # luma, as PIL's "L" conversion of the training views
            pixels = grayscale(pixels, self.in_chans)
        size = self.input_size
        if size != pixels.shape[-1]:
            pixels = nn.functional.interpolate(pixels, size=(size, size), mode="bicubic", align_corners=False)
        return pixels.clamp(0.0, 1.0)


def token_hit_rows(backbone: nn.Module, images: torch.Tensor, predicted: torch.Tensor, hit: torch.Tensor,
                   mean: tuple[float, ...], std: tuple[float, ...]) -> dict[str, torch.Tensor]:
    """`val/reconstruction` rows of a token-predicting method: the input, the input with the predicted patches
    (B, L mask, 1 = predicted) blanked, and those patches white where the top-1 token is right (`hit` 1) and black
    where wrong, in the normalised space the grid un-normalises."""
    patches = backbone.patchify(images).float()
    per_value = (1, 1, -1)  # patchify's order: channels fastest
    mean_t = patches.new_tensor(mean).repeat(backbone.patch_size ** 2).view(per_value)
    std_t = patches.new_tensor(std).repeat(backbone.patch_size ** 2).view(per_value)
    black, white = -mean_t / std_t, (1.0 - mean_t) / std_t
    chosen, hit = predicted.float()[..., None], hit.float()[..., None]
    context = patches * (1.0 - chosen)
    return {"input": images, "masked": backbone.unpatchify(context),
            "reconstruction": backbone.unpatchify(context + chosen * (black + hit * (white - black)))}
