"""k-means tokenizer: id = the nearest centroid (plain L2) of a patch's feature, from a frozen extractor.

Extractors (`features`), each mapping [0, 1] images (B, C, S, S) to a feature grid (B, h, w, d):
- "pixels": each p x p patch's pixels, MAE-normalised (`losses.normalize_patches`: zero mean, unit variance per
  patch), so ids describe the patch's structure, not its brightness; fully offline (the demo's choice);
- "timm:<model>": a timm model from a local weights file: a ViT's patch tokens after its final norm, a CNN's last
  feature map; "timm": an encoder written by `lightning-mim export` (architecture read from the file);
- "open_clip:<arch>": an open_clip ModifiedResNet's layer-4 map before the attention pool, CLIP mean/std
  (k-CLIP = "open_clip:RN50x64": 4096-d, 14 x 14 at 448 px).
The codebook (`lightning-mim tokenizer fit`) is a safetensors file: `centroids` (V, d) and metadata recording how it
was made (`CODEBOOK_FORMAT`).
"""
from __future__ import annotations

import abc
import json
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, safe_open, save

from lightning_mim.backbone.vit import patchify
from lightning_mim.losses import normalize_patches
from lightning_mim.reliability import atomic_write
from lightning_mim.targets.base import Tokenizer, TokenizerConfig, nearest_code, require

CODEBOOK_FORMAT = "lightning-mim kmeans codebook 1"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class FeatureExtractor(nn.Module, abc.ABC):
    """[0, 1] images -> (B, h, w, d) features. Normalises its input with `mean` / `std` (buffers) when given."""

    def __init__(self, in_chans: int, dim: int, reduction: int, mean: tuple[float, ...] | None = None,
                 std: tuple[float, ...] | None = None) -> None:
        super().__init__()
        self.in_chans, self.dim, self.reduction = in_chans, dim, reduction
        self.normalise = mean is not None
        if self.normalise:
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def grid(self, input_size: int) -> tuple[int, int]:
        if input_size % self.reduction:
            raise ValueError(f"input size {input_size} is not a multiple of the extractor's stride {self.reduction}")
        return input_size // self.reduction, input_size // self.reduction

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.normalise:
            images = (images - self.mean) / self.std
        return self.features(images)

    @abc.abstractmethod
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, h, w, D) features of the (normalised) [0, 1] images."""


class PatchPixels(FeatureExtractor):
    """Per-patch normalised pixels, flattened in `patchify`'s (row, column, channel) order: d = p * p * C."""

    def __init__(self, patch_size: int, in_chans: int) -> None:
        super().__init__(in_chans, patch_size * patch_size * in_chans, patch_size)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        h, w = self.grid(images.shape[-1])
        return normalize_patches(patchify(images, self.reduction)).view(images.shape[0], h, w, self.dim)


class TimmFeatures(FeatureExtractor):
    """A timm model's `forward_features`: a ViT's patch tokens (prefix tokens dropped) or a CNN's last map."""

    def __init__(self, model: nn.Module, reduction: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__(model.patch_embed.proj.in_channels if hasattr(model, "patch_embed") else 3,
                         model.num_features, reduction, mean, std)
        self.model = model

    def features(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model.forward_features(images)
        h, w = self.grid(images.shape[-1])
        if out.dim() == 4:  # CNN: (B, d, h, w)
            return out.permute(0, 2, 3, 1)
        return out[:, getattr(self.model, "num_prefix_tokens", 0):].reshape(images.shape[0], h, w, -1)


class ModifiedResNetLayer4(FeatureExtractor):
    """open_clip's ModifiedResNet (CLIP RN50...RN50x64) up to layer 4; the attention pool is not kept."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__(3, visual.layer4[-1].conv3.out_channels, 32, CLIP_MEAN, CLIP_STD)
        visual.attnpool = nn.Identity()  # unused: its weights would only weigh on every checkpoint
        self.visual = visual
        self.image_size = int(visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0])

    def features(self, images: torch.Tensor) -> torch.Tensor:
        v = self.visual
        return v.layer4(v.layer3(v.layer2(v.layer1(v.stem(images))))).permute(0, 2, 3, 1)


def open_clip_extractor(arch: str, weights: str | None, device: str | torch.device = "cpu") -> ModifiedResNetLayer4:
    """The visual tower of open_clip model `arch` (a ModifiedResNet, e.g. RN50x64) with weights from a local file
    (an open_clip / OpenAI state dict); random weights when `weights` is None (tests only). Nothing is downloaded."""
    open_clip = require("open_clip", f"features 'open_clip:{arch}'")
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"open_clip weights file not found: {weights} (a local {arch} state dict; nothing is "
                                f"downloaded)")
    model = open_clip.create_model(arch, pretrained=None, device=device)
    if not hasattr(model.visual, "layer4"):
        raise ValueError(f"open_clip model {arch!r} has no ModifiedResNet visual tower (layer4): k-means CLIP "
                         f"features need a ResNet CLIP such as RN50x64")
    if weights is not None:
        try:
            open_clip.load_checkpoint(model, weights)
        except RuntimeError as error:
            raise ValueError(f"{weights} does not hold {arch} weights (or is a TorchScript archive: save "
                             f"torch.jit.load(path).state_dict() to a file and pass that): {error}") from error
    return ModifiedResNetLayer4(model.visual)


def timm_extractor(name: str, weights: str | None, mean: tuple[float, ...] | None,
                   std: tuple[float, ...] | None) -> TimmFeatures:
    """timm model `name` with weights from a local file; name "" = an encoder exported by `lightning-mim export`,
    whose architecture is read from the file's metadata (mean / std: the data's, which that encoder was trained on)."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    from lightning_mim.eval.weights import backbone_config_of, load_into, read_checkpoint

    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"extractor weights file not found: {weights}")
    if not name:
        if weights is None:
            raise ValueError("features 'timm' (an exported encoder) needs `weights`: the file `lightning-mim export` "
                             "wrote")
        config = backbone_config_of(weights)
        model = VisionTransformer(**config.timm_kwargs_full())
    else:
        model = timm.create_model(name, pretrained=False, num_classes=0)
        config = None
    if weights is not None:
        state = read_checkpoint(weights)
        state = state.get("state_dict", state.get("model", state))
        load_into(model, {key: value for key, value in state.items() if not key.startswith(("head.", "fc."))})
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    mean = tuple(mean or cfg.get("mean") or (0.5,) * 3)
    std = tuple(std or cfg.get("std") or (0.5,) * 3)
    reduction = config.patch_size if config is not None else int(
        model.patch_embed.patch_size[0] if hasattr(model, "patch_embed") else model.feature_info[-1]["reduction"])
    in_chans = config.in_chans if config is not None else 3
    return TimmFeatures(model, reduction, mean[:in_chans], std[:in_chans])


def build_extractor(features: str, weights: str | None = None, patch_size: int = 16, in_chans: int = 3,
                    mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None) -> FeatureExtractor:
    """The frozen feature extractor a `features` string names (see the module docstring)."""
    family, _, name = features.partition(":")
    if features == "pixels":
        return PatchPixels(patch_size, in_chans)
    if weights is None and family in ("timm", "open_clip"):
        warnings.warn(f"features {features!r} without a weights file: the extractor keeps its random initial weights "
                      f"(an offline stand-in for tests); pass the pretrained weights with --weights / "
                      f"tokenizer.weights", UserWarning, stacklevel=2)
    if family == "timm":
        return timm_extractor(name, weights, mean, std)
    if family == "open_clip" and name:
        return open_clip_extractor(name, weights)
    raise ValueError(f"unknown k-means features {features!r}: use 'pixels', 'timm:<model>', 'timm' (an exported "
                     f"encoder) or 'open_clip:<arch>' (e.g. open_clip:RN50x64)")


def default_input_size(extractor: FeatureExtractor) -> int | None:
    """k-CLIP's native 448 px for RN50x64 (the ModifiedResNet's own image size); None where the data decides."""
    return getattr(extractor, "image_size", None)


class KMeansTokenizer(Tokenizer):
    """Nearest centroid (L2) of each patch feature. `centroids` (V, d) is a buffer, saved in checkpoints."""

    def __init__(self, extractor: FeatureExtractor, centroids: torch.Tensor, input_size: int,
                 compute_dtype: str | None = None) -> None:
        super().__init__(compute_dtype)
        if centroids.dim() != 2 or centroids.shape[1] != extractor.dim:
            raise ValueError(f"the codebook has shape {tuple(centroids.shape)} but the extractor gives "
                             f"{extractor.dim}-d features: it was fitted on other features")
        self.extractor = extractor
        self.register_buffer("centroids", centroids.float().contiguous())
        self.vocab_size, self.input_size, self.in_chans = int(centroids.shape[0]), int(input_size), extractor.in_chans
        self.grid_size = extractor.grid(self.input_size)
        self.freeze()

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        with self.autocast(images.device.type):
            features = self.extractor(images)
        batch, h, w, dim = features.shape
        return nearest_code(features.reshape(-1, dim), self.centroids).view(batch, h, w)


def save_codebook(centroids: torch.Tensor, path: str | Path, metadata: dict[str, Any]) -> Path:
    """Write a codebook .safetensors atomically: `centroids` (V, d) float32 and the metadata (values JSON-encoded)."""
    path = Path(path)
    text = {"format": CODEBOOK_FORMAT, **{key: json.dumps(value) for key, value in metadata.items()}}
    payload = save({"centroids": centroids.detach().float().cpu().contiguous()}, metadata=text)
    atomic_write(path, lambda handle: handle.write(payload))
    return path


def random_pixel_codebook(path: str | Path, patch_size: int, input_size: int, in_chans: int, vocab_size: int,
                          seed: int = 0) -> Path:
    """A pixel codebook of N(0, 1) centroids (written once per path): a real k-means tokenizer's cost and shapes
    without fitting one, for benchmarks and tests."""
    path = Path(path)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        dim = patch_size * patch_size * in_chans
        centroids = torch.randn(vocab_size, dim, generator=torch.Generator().manual_seed(seed))
        save_codebook(centroids, path, {"kind": "kmeans", "features": "pixels", "weights": None, "dim": dim,
                                        "patch_size": patch_size, "input_size": input_size, "in_chans": in_chans,
                                        "vocab_size": vocab_size})
    return path


def fit_command_hint(config: TokenizerConfig) -> str:
    """The `tokenizer fit` command that writes the codebook `config` asks for: on ImageNet-1k train for CLIP
    features (k-CLIP), else on Fashion-MNIST (the CLI default)."""
    options = {"--features": config.features, "--weights": config.weights, "--patch-size": config.patch_size,
               "--input-size": config.input_size, "--vocab-size": config.vocab_size, "--nredo": config.nredo,
               "--max-points-per-centroid": config.max_points_per_centroid, "--compute-dtype": config.compute_dtype}
    source = ("--source imagefolder --data-dir <ImageNet-1k folder>" if config.features.startswith("open_clip")
              else "--source fashion_mnist")
    return " ".join([f"lightning-mim tokenizer fit {config.path}",
                     *(f"{name} {value}" for name, value in options.items() if value is not None), source])


def check_fit_settings(config: TokenizerConfig, metadata: dict[str, Any]) -> None:
    """Refuse a codebook whose recorded V, restarts or points per centroid differ from those its recipe states
    (e.g. `tokenizer fit`'s defaults V = 512, 1 restart, 256 points per centroid where k-CLIP needs 8192, 5, 512)."""
    differences = [f"{name} {metadata.get(name)} (the recipe: {wanted})"
                   for name in ("vocab_size", "nredo", "max_points_per_centroid")
                   if (wanted := getattr(config, name)) is not None and metadata.get(name) != wanted]
    if differences:
        raise ValueError(f"{config.path} was fitted with {', '.join(differences)}: it is not the codebook the recipe "
                         f"asks for. Fit that one with: {fit_command_hint(config)} (or point tokenizer.path at it)")


def load_codebook(path: str | Path, config: TokenizerConfig | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """(centroids, metadata) of a codebook file; a missing file fails with the `tokenizer fit` command that makes it."""
    path = Path(path)
    if not path.is_file():
        hint = fit_command_hint(config) if config is not None else "lightning-mim tokenizer fit " + str(path)
        raise FileNotFoundError(f"k-means codebook not found: {path}. Create it with: {hint} (other data: --source "
                                f"imagefolder --data-dir DIR or --source webdataset --train-shards PATTERN; "
                                f"`lightning-mim tokenizer fit --help` lists the options)")
    with safe_open(str(path), framework="pt") as handle:
        raw = handle.metadata() or {}
    if raw.get("format") != CODEBOOK_FORMAT:
        raise ValueError(f"{path} is not a codebook written by `lightning-mim tokenizer fit` (format "
                         f"{raw.get('format')!r}, expected {CODEBOOK_FORMAT!r})")
    metadata = {key: json.loads(value) for key, value in raw.items() if key != "format"}
    return load_file(str(path))["centroids"], metadata


def build_kmeans_tokenizer(config: TokenizerConfig) -> KMeansTokenizer:
    if config.path is None:
        raise ValueError("a k-means tokenizer needs `path`: the codebook written by `lightning-mim tokenizer fit`")
    centroids, meta = load_codebook(config.path, config)
    check_fit_settings(config, meta)
    if config.features != meta["features"]:
        raise ValueError(f"{config.path} was fitted on features {meta['features']!r} but the tokenizer config asks "
                         f"for {config.features!r}; set tokenizer.features to {meta['features']!r} or fit a new "
                         f"codebook")
    if config.input_size is not None and config.input_size != meta["input_size"]:
        raise ValueError(f"{config.path} was fitted at {meta['input_size']} px but tokenizer.input_size is "
                         f"{config.input_size}; leave input_size unset or fit a codebook at that size")
    if config.patch_size is not None and config.patch_size != meta["patch_size"]:
        raise ValueError(f"{config.path} was fitted on {meta['patch_size']}-px patches but tokenizer.patch_size is "
                         f"{config.patch_size}; fit a codebook with --patch-size {config.patch_size}")
    extractor = build_extractor(meta["features"], config.weights or meta.get("weights"), meta["patch_size"],
                                meta["in_chans"], meta.get("mean"), meta.get("std"))
    return KMeansTokenizer(extractor, centroids, meta["input_size"], config.compute_dtype)
