"""The shared ViT backbone."""
from lightning_mim.backbone.pos_embed import sincos_1d, sincos_1d_interleaved, sincos_2d
from lightning_mim.backbone.vit import (
    VIT_SIZES, BackboneConfig, MIMViT, build_backbone, init_mae_weights, patchify, timm_model_name, unpatchify,
)

__all__ = ["VIT_SIZES", "BackboneConfig", "MIMViT", "build_backbone", "init_mae_weights", "patchify", "unpatchify",
           "sincos_1d", "sincos_1d_interleaved", "sincos_2d", "timm_model_name"]
