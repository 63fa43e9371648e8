"""Beyond Masking (Tian et al., arXiv 2203.14313): MAE's encoder / decoder pre-trained to restore the undegraded image
from a degraded one. Spec: shared/methods/beyond_masking.md.

One `objective` per run, with the paper's letters:
  masking (m)          random masking at 0.75, loss on removed tokens (MAE-pytorch);
  zoom_in (a)          the encoder sees the central S of an (S + 2M) view; the decoder renders the whole view at S;
                       0.8 x centre loss (every token; the published code crashes without masking, so this path is
                       the intended one, assumed) + 0.2 x the sum of four border-band losses;
  zoom_out (b)         a smaller crop placed in an S canvas mirrored around it, one offset per batch; loss on the canvas
                       grid (mask ratio 0: the published code only runs at 0.75, a `mask_ratio` option);
  distortion (c)       a per-sample fisheye warp; loss on every token against the unwarped image;
  blur (d)             a per-sample random conv, weights N(1/k^2, .02^2), bias fixed for the run; the published
                       Conv2d(3, 7, 1) crashes, so a C -> C k x k conv is used (assumed); full mean (assumed);
  decolorize (e)       a grey mix sum_c w_c I_c, w_c ~ U(0, .667) once per batch, into a 1-channel encoder
                       (backbone.in_chans 1; the data and the target stay colour); crop of the torchvision RRC
                       defaults (assumed: the published HSV path cannot run);
  zoom_in_masking (a)+(m)  zoom-in with 0.75 masking, the centre loss on removed tokens (the published zoomed-in/).
Masked counts: (m) masks int(r L) (MAE-pytorch's generator, 6 of 9 at r = 0.75), the other objectives keep
int(L (1 - r)) (the zoomed folders' MAE-style `random_masking`, 7 of 9 masked); both 147 of 196.
The target is always the undegraded image, un-normalised to [0, 1] pixels with the data's mean and std (as the
official code does), normalised per patch AND channel (unbiased std, eps 1e-6 on the std); sizes scale with the
image: zoom-in margin S / 7 (32 at 224), zoom-out crop 5 S / 7 (160 at 224). Degradations run in the
step on the device (lightning_mim/degradations.py); only the zoom views' sizes come from the train transform.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms import v2

from lightning_mim import degradations as deg
from lightning_mim.backbone import BackboneConfig, patchify, unpatchify
from lightning_mim.data.jpeg_crop import RegionResizedCrop
from lightning_mim.heads import MAEDecoder
from lightning_mim.losses import denormalize_patches_per_channel, masked_mse, normalize_patches_per_channel
from lightning_mim.masking import check_mask_ratio, random_masking
from lightning_mim.methods.base import MIMMethod, OptimConfig

OBJECTIVES = ("masking", "zoom_in", "zoom_out", "distortion", "blur", "decolorize", "zoom_in_masking")
PAPER_LETTERS = {"masking": "(m)", "zoom_in": "(a)", "zoom_out": "(b)", "distortion": "(c)", "blur": "(d)",
                 "decolorize": "(e)", "zoom_in_masking": "(a)+(m)"}
MASK_COUNT_RULES = {"masking": "mask"}  # every other objective: "keep" (see `masking.random_masking`)
Objective = Literal["masking", "zoom_in", "zoom_out", "distortion", "blur", "decolorize", "zoom_in_masking"]


@dataclass
class BeyondMaskingOptimConfig(OptimConfig):
    """The official pre-training optimiser: cosine to min_lr 1e-5; no decay for 1-D parameters, biases and tokens."""

    min_lr: float = 1e-5
    no_weight_decay: tuple[str, ...] = ("decoder.mask_token", "backbone.cls_token", "backbone.pos_embed")


class BeyondMasking(MIMMethod):
    """Beyond Masking pre-training; decoder defaults are MAE-pytorch's 384 x 4 (6 heads). Loss terms: `mim`, or for
    the zoom-in objectives `centre` and `edge` (weights 0.8 and 0.2)."""

    default_loss_weights = {"centre": 0.8, "edge": 0.2}
    norm_pix_target = True
    # `val/reconstruction` as every method's (encoder input and prediction, with the target it predicts) and the
    # degradation alone in `val/degradation`
    image_grids = {"val/reconstruction": ("input", "degraded", "reconstruction", "target"),
                   "val/degradation": ("input", "degraded_view", "target")}

    def __init__(self, backbone: BackboneConfig | dict | None = None,
                 optim: BeyondMaskingOptimConfig | dict | None = None, loss_weights: dict[str, float] | None = None,
                 feature_pool: Literal["avg", "cls"] = "avg", objective: Objective = "zoom_in_masking",
                 mask_ratio: float | None = None, zoom_in_margin: int | None = None,
                 zoom_out_size: int | None = None, blur_kernel_size: int = 7, blur_groups: int = 1,
                 train_crop: Literal["mae", "torchvision"] | None = None, decoder_dim: int = 384,
                 decoder_depth: int = 4, decoder_heads: int = 6) -> None:
        """mask_ratio: None = 0.75 for masking / zoom_in_masking, else 0. zoom_in_margin / zoom_out_size: None =
        round(S / 7) / round(5 S / 7). train_crop: None = "torchvision" (RRC 0.08-1, bilinear, no flip) for
        decolorize, else "mae" (RRC 0.2-1, bicubic, flip). The target's pixel mean and std are ImageNet's (the
        official code's constants) until `setup` reads the attached DataModule's (`set_pixel_stats`)."""
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}: choose one of {OBJECTIVES}")
        optim = optim if isinstance(optim, OptimConfig) else BeyondMaskingOptimConfig(**(optim or {}))
        super().__init__(backbone, optim, loss_weights, feature_pool)
        self.objective = objective
        size = self.image_size
        self.mask_ratio = (0.75 if objective in ("masking", "zoom_in_masking") else 0.0) if mask_ratio is None \
            else mask_ratio
        if self.mask_ratio or objective in ("masking", "zoom_in_masking"):
            check_mask_ratio(self.mask_ratio)
        self.zoom_in_margin = round(size / 7) if zoom_in_margin is None else zoom_in_margin
        self.zoom_out_size = round(5 * size / 7) if zoom_out_size is None else zoom_out_size
        if self.zoom_in_margin < 1:
            raise ValueError(f"zoom_in_margin must be >= 1 pixel, got {self.zoom_in_margin}")
        if not size / 2 <= self.zoom_out_size < size:
            raise ValueError(f"zoom_out_size must lie in [{size / 2}, {size}) for image size {size} (the mirrored "
                             f"border is at most the crop), got {self.zoom_out_size}")
        self.train_crop = train_crop or ("torchvision" if objective == "decolorize" else "mae")
        if self.train_crop not in ("mae", "torchvision"):
            raise ValueError(f"unknown train_crop {self.train_crop!r}: choose 'mae' or 'torchvision'")
        channels = self.in_chans
        if objective == "decolorize" and self.backbone_config.in_chans != 1:
            raise ValueError("objective 'decolorize' feeds the encoder the 1-channel grey mix of colour images: set "
                             f"backbone.in_chans to 1 (got {self.backbone_config.in_chans}); the data and the target "
                             "stay 3-channel colour")
        self.register_buffer("pixel_mean", torch.zeros(channels), persistent=False)
        self.register_buffer("pixel_std", torch.ones(channels), persistent=False)
        grey = channels == 1  # the channel mean of ImageNet's statistics, as the DataModule expands them
        self.set_pixel_stats((sum(IMAGENET_DEFAULT_MEAN) / 3,) if grey else IMAGENET_DEFAULT_MEAN,
                             (sum(IMAGENET_DEFAULT_STD) / 3,) if grey else IMAGENET_DEFAULT_STD)
        self.blur_groups, self.blur_kernel_size = blur_groups, blur_kernel_size
        if objective == "blur":
            if channels % blur_groups or blur_kernel_size % 2 == 0:
                raise ValueError(f"blur needs an odd blur_kernel_size (7: the image keeps its size) and blur_groups "
                                 f"dividing the {channels} channels (1 or {channels}), got {blur_kernel_size}, "
                                 f"{blur_groups}")
            bound = deg.blur_bias_bound(channels, blur_kernel_size, blur_groups)
            self.register_buffer("blur_bias", (torch.rand(channels) * 2.0 - 1.0) * bound)  # fixed for the run
        self.decoder = MAEDecoder(self.backbone.embed_dim, self.backbone.grid_size,
                                  self.backbone.patch_size ** 2 * channels, decoder_dim, decoder_depth, decoder_heads,
                                  num_prefix_tokens=self.backbone.num_prefix_tokens, embed_bias=False,
                                  pos_embed="sincos_1d", qkv_bias="qv", init="clipped_normal")

    @property
    def in_chans(self) -> int:
        """Channels of the data and the target (3 for decolorize, whose encoder takes 1)."""
        return 3 if self.objective == "decolorize" else self.backbone_config.in_chans

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        native = datamodule.native_format() if hasattr(datamodule, "native_format") else None
        if hasattr(datamodule, "mean_for"):
            self.set_pixel_stats(datamodule.mean_for(self.in_chans), datamodule.std_for(self.in_chans))
        if self.objective == "decolorize" and native is not None and native[1] == 1:
            raise ValueError("objective 'decolorize' needs colour data: on 1-channel images (e.g. Fashion-MNIST) the "
                             "grey mix is only a rescaling; pre-train it on RGB data (imagefolder / webdataset)")

    def set_pixel_stats(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        """The data's normalisation per channel, which the target undoes to get [0, 1] pixels before N(.)."""
        channels = self.in_chans
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"the target needs the data's mean and std for its {channels} channel(s), got {mean} "
                             f"and {std}: pass one value per channel")
        self.pixel_mean.copy_(torch.tensor(mean, dtype=torch.float32))
        self.pixel_std.copy_(torch.tensor(std, dtype=torch.float32))

    def view_size(self) -> int:
        """Size of the training view: S + 2 x margin for zoom-in, the zoom-out crop, else S."""
        if self.objective.startswith("zoom_in"):
            return self.image_size + 2 * self.zoom_in_margin
        return self.zoom_out_size if self.objective == "zoom_out" else self.image_size

    def loader_views(self) -> v2.Compose:
        """The view at `view_size`: MAE's crop + flip, or the official code's RandomResizedCrop (bilinear) alone."""
        if self.train_crop == "mae":
            crop = [RegionResizedCrop(self.view_size(), scale=(0.2, 1.0), interpolation=v2.InterpolationMode.BICUBIC,
                                      antialias=True),
                    v2.RandomHorizontalFlip()]
        else:
            crop = [RegionResizedCrop(self.view_size(), antialias=True)]
        return v2.Compose([v2.PILToTensor(), *crop])

    def validation_views(self, images: torch.Tensor) -> torch.Tensor:
        """The training view from an S-sized eval image: area-resized to the zoom views' sizes."""
        size = self.view_size()
        return images if size == self.image_size else deg.area_resize(images, size)

    def draw_degradation(self, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
        """The objective's random parameters, drawn on `device`: zoom-out `offset` (left, top) per batch, fisheye
        `centres` / `magnitudes` and blur `kernels` per sample, `grey_weights` per batch."""
        if self.objective == "zoom_out":
            return {"offset": deg.draw_zoom_out_offset(self.image_size - self.zoom_out_size, device)}
        if self.objective == "distortion":
            centres, magnitudes = deg.draw_fisheye(batch_size, device)
            return {"centres": centres, "magnitudes": magnitudes}
        if self.objective == "blur":
            return {"kernels": deg.draw_blur_kernels(batch_size, self.in_chans, self.blur_kernel_size,
                                                     self.blur_groups, device)}
        if self.objective == "decolorize":
            return {"grey_weights": deg.draw_grey_weights(device)}
        return {}

    def degrade(self, views: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The encoder input (B, backbone.in_chans, S, S) from a batch of training views."""
        objective = self.objective
        if objective.startswith("zoom_in"):
            return deg.centre_crop(views, self.zoom_in_margin)
        if objective == "zoom_out":
            return deg.symmetric_pad(views, self.image_size, params["offset"])
        if objective == "distortion":
            return deg.fisheye(views, params["centres"], params["magnitudes"])
        if objective == "blur":
            return deg.blur(views, params["kernels"], self.blur_bias, self.blur_groups)
        if objective == "decolorize":
            return deg.decolorize(views, params["grey_weights"])
        return views

    def forward(self, inputs: torch.Tensor, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token prediction (B, L, p*p*C) on the decoder grid and the mask (B, L), 1 = removed."""
        batch, num_patches = inputs.shape[0], self.backbone.num_patches
        if self.mask_ratio > 0:
            draw = random_masking(batch, num_patches, self.mask_ratio, noise=noise, device=inputs.device,
                                  count_rule=MASK_COUNT_RULES.get(self.objective, "keep"))
            latent, restore, mask = self.backbone.forward_kept(inputs, draw.keep_idx), draw.restore_idx, draw.mask
        else:
            latent = self.backbone.forward_full(inputs)
            restore = torch.arange(num_patches, device=inputs.device).expand(batch, -1)
            mask = torch.zeros(batch, num_patches, device=inputs.device)
        return self.decoder(latent, restore), mask

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        return patchify(images, self.backbone.patch_size)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, L, p*p*C) -> (B, C, S, S) with the data's channels (the encoder may take another count)."""
        return unpatchify(patches, self.backbone.patch_size, self.backbone.grid_size, self.in_chans)

    def normalized_target(self, images: torch.Tensor) -> torch.Tensor:
        """N(.) of data-normalised images, computed on their [0, 1] pixels (a constant patch gives exactly 0)."""
        shape = (1, -1, 1, 1)
        pixels = images.float() * self.pixel_std.view(shape) + self.pixel_mean.view(shape)
        return normalize_patches_per_channel(self.patchify(pixels), self.in_chans)

    def target_image(self, views: torch.Tensor) -> torch.Tensor:
        """The undegraded image on the decoder grid: the whole zoom view at S, or the view itself."""
        return deg.area_resize(views, self.image_size) if views.shape[-1] != self.image_size else views

    def aligned_losses(self, pred: torch.Tensor, mask: torch.Tensor, views: torch.Tensor,
                       params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The objective's loss terms: the prediction grid mapped onto the loss grid (identity, zoom-in, zoom-out)."""
        weights = mask if self.mask_ratio > 0 else torch.ones_like(mask)
        if self.objective.startswith("zoom_in"):
            margin = self.zoom_in_margin
            field = deg.area_resize(self.unpatchify(pred), views.shape[-1])
            centre = masked_mse(self.patchify(deg.centre_crop(field, margin)),
                                self.normalized_target(deg.centre_crop(views, margin)), weights)
            field_target = deg.area_resize(self.unpatchify(self.normalized_target(self.target_image(views))),
                                           views.shape[-1])
            return {"centre": centre, "edge": deg.border_bands_mse(field, field_target, margin)}
        if self.objective == "zoom_out":
            canvas = self.image_size

            def to_canvas(image: torch.Tensor) -> torch.Tensor:
                return self.patchify(deg.symmetric_pad(deg.area_resize(image, views.shape[-1]), canvas,
                                                                params["offset"]))

            target = to_canvas(self.unpatchify(self.normalized_target(self.target_image(views))))
            return {"mim": masked_mse(to_canvas(self.unpatchify(pred)), target, weights)}
        return {"mim": masked_mse(pred, self.normalized_target(views), weights)}

    def compute_losses(self, views: torch.Tensor, noise: torch.Tensor | None = None,
                       params: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """noise: the masking draw (B, L); params: the degradation's (`draw_degradation`), drawn when None."""
        params = self.draw_degradation(views.shape[0], views.device) if params is None else params
        pred, mask = self(self.degrade(views, params), noise)
        return self.aligned_losses(pred, mask, views, params)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The grid rows: the image, the degraded view whole (`degraded_view`) and as the encoder gets it (`degraded`:
        masked patches blanked; grey shown in every channel), the target on the decoder grid, and the prediction with
        the target's patch statistics put back."""
        views = self.validation_views(images)
        params = self.draw_degradation(images.shape[0], images.device)
        inputs = self.degrade(views, params)
        pred, mask = self(inputs, None)
        keep = 1.0 - mask.unsqueeze(-1)
        degraded = self.backbone.unpatchify(self.patchify(inputs.float()) * keep)
        target = self.target_image(views).float()
        reconstruction = denormalize_patches_per_channel(pred, self.patchify(target), self.in_chans)
        return {"input": images, "degraded": degraded.expand(-1, self.in_chans, -1, -1),
                "degraded_view": inputs.float().expand(-1, self.in_chans, -1, -1), "target": target,
                "reconstruction": self.unpatchify(reconstruction)}

    @torch.no_grad()
    def extract_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled encoder features (the k-NN monitor); de-colourisation's grey encoder gets the colour images' grey
        mix at the mean of the training weights (each U(0, 0.667): 1/3)."""
        if self.objective == "decolorize":
            images = deg.decolorize(images, images.new_full((self.in_chans,), deg.GREY_WEIGHT_HIGH / 2))
        return super().extract_features(images)
