"""Every method at micro size (ViT 128 wide, 4 deep, patch 4) with small heads, for the tests that run all of them."""
from typing import Any

from lightning_mim.methods import LUT, MAE, BeyondMasking, MIMMethod, SimMIM, SymMIM

MAE_DECODER = {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2}
MICRO_HEADS: dict[type, dict[str, Any]] = {
    MAE: MAE_DECODER,
    LUT: {**MAE_DECODER, "head_hidden_dim": 32},
    SimMIM: {"mask_patch_size": 8},
    SymMIM: {"mask_patch_size": 8, "head_hidden_dim": 32, "head_out_dim": 16},
    BeyondMasking: MAE_DECODER,  # its default objective, zoom_in_masking (a)+(m): 20-px views for a 16-px encoder
}
METHODS = list(MICRO_HEADS)


def micro_cli_model(method: str = "MAE", img_size: int = 32) -> list[str]:
    """The same micro models as LightningCLI arguments (`--model <Name>` and its init args), lr 2e-3."""
    heads = MICRO_HEADS[next(cls for cls in METHODS if cls.__name__ == method)]
    return ["--model", method, "--model.backbone.size", "micro", "--model.backbone.img_size", str(img_size),
            "--model.backbone.patch_size", "4", "--model.optim.lr", "2e-3", "--model.optim.warmup_steps", "2",
            *(word for key, value in heads.items() for word in (f"--model.{key}", str(value)))]


def micro_method(method: type[MIMMethod], img_size: int = 16, **kwargs: Any) -> MIMMethod:
    return method(backbone=dict(size="micro", img_size=img_size, patch_size=4), **{**MICRO_HEADS[method], **kwargs})
