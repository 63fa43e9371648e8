"""Visual tokenizers for token-prediction methods (BEiT-style, MaPeT): k-means codebooks and VQ-KD.

    from lightning_mim.targets import TokenizerConfig, build_tokenizer
    tokenizer = build_tokenizer({"kind": "kmeans", "path": "codebooks/fmnist_p4_v512.safetensors"})
    ids = tokenizer(views)  # (B, C, S, S) in [0, 1] -> (B, h, w) int64 in [0, tokenizer.vocab_size)

`lightning-mim tokenizer fit` writes k-means codebooks; `lightning-mim tokenizer encode` writes WebDataset shards with
precomputed ids that the DataModule delivers as views[1] (`--data.token_ids_key`).
"""
from __future__ import annotations

from typing import Any

from lightning_mim.targets.base import (
    MissingExtraError, Tokenizer, TokenizerConfig, centre_square_view, nearest_code, require,
)


def build_tokenizer(config: TokenizerConfig | dict[str, Any]) -> Tokenizer:
    """The frozen tokenizer a config describes (k-means: from its codebook file; vqkd: from the released .pth)."""
    config = TokenizerConfig.coerce(config)
    if config.kind == "vqkd":
        from lightning_mim.targets.vqkd import build_vqkd_tokenizer
        tokenizer: Tokenizer = build_vqkd_tokenizer(config)
    else:
        from lightning_mim.targets.kmeans import build_kmeans_tokenizer
        tokenizer = build_kmeans_tokenizer(config)
    if config.vocab_size is not None and config.vocab_size != tokenizer.vocab_size:
        raise ValueError(f"tokenizer {config.path} has a vocabulary of {tokenizer.vocab_size} but tokenizer.vocab_size "
                         f"is {config.vocab_size}; use a tokenizer with V = {config.vocab_size} or set vocab_size to "
                         f"{tokenizer.vocab_size}")
    return tokenizer


__all__ = ["MissingExtraError", "Tokenizer", "TokenizerConfig", "build_tokenizer", "centre_square_view",
           "nearest_code", "require"]
