"""Tokenizer cost per training step: forward time of each tokenizer on one batch of random [0, 1] images, with random
weights (the cost does not depend on them), and a check that the forward makes no host-device sync on CUDA.

    python -m benchmarks.tokenizers --device cuda --batch 256 --out benchmarks/results/tokenizers_h200
    python -m benchmarks.tokenizers --device cpu --kinds pixels --batch 256

Kinds: `pixels` (the demo: 1-channel 32 px, patch 4, V 512), `vqkd` (ViT-B/16 at 224, V 8192) and `kclip`
(open_clip RN50x64 layer 4 at 448, 4096-d, V 8192; needs open-clip-torch). Each runs at every `--dtypes` entry
(the extractor's autocast dtype; the nearest-code search is always float32).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lightning_mim.targets import Tokenizer, TokenizerConfig
from lightning_mim.targets.kmeans import KMeansTokenizer, PatchPixels, open_clip_extractor
from lightning_mim.targets.vqkd import VQKDTokenizer


def build(kind: str, dtype: str | None, device: torch.device) -> Tokenizer:
    if kind == "pixels":
        tokenizer: Tokenizer = KMeansTokenizer(PatchPixels(4, 1), torch.randn(512, 16), 32, dtype)
    elif kind == "vqkd":
        tokenizer = VQKDTokenizer(TokenizerConfig(kind="vqkd", compute_dtype=dtype))
        tokenizer.codebook.copy_(F.normalize(torch.randn_like(tokenizer.codebook), dim=1))
    elif kind == "kclip":
        tokenizer = KMeansTokenizer(open_clip_extractor("RN50x64", None), torch.randn(8192, 4096), 448, dtype)
    else:
        raise ValueError(f"unknown kind {kind!r}: pixels, vqkd or kclip")
    return tokenizer.to(device)


def time_forward(tokenizer: Tokenizer, batch: int, device: torch.device, steps: int, warmup: int) -> dict:
    images = torch.rand(batch, tokenizer.in_chans, tokenizer.input_size, tokenizer.input_size, device=device)
    for _ in range(warmup):
        tokenizer(images)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.set_sync_debug_mode("error")  # any host sync inside the forward raises
    started = time.perf_counter()
    for _ in range(steps):
        ids = tokenizer(images)
    if cuda:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / steps
    return {"ms_per_batch": round(seconds * 1000, 2), "images_per_s": round(batch / seconds, 1),
            "grid": list(ids.shape[1:]), "vocab": tokenizer.vocab_size,
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if cuda else None}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tokenizers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", default="pixels,vqkd,kclip")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", help="folder for tokenizers.json and tokenizers.md")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 rows measure true float32
    rows = []
    for kind in args.kinds.split(","):
        for dtype in args.dtypes.split(","):
            tokenizer = build(kind, None if dtype == "float32" else dtype, device)
            row = {"kind": kind, "dtype": dtype, "batch": args.batch, "device": str(device),
                   **time_forward(tokenizer, args.batch, device, args.steps, args.warmup)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del tokenizer
            if device.type == "cuda":
                torch.cuda.empty_cache()
    table = ["| kind | dtype | batch | ms / batch | images / s | grid | V | peak GiB |",
             "|---|---|---|---|---|---|---|---|"]
    table += [f"| {r['kind']} | {r['dtype']} | {r['batch']} | {r['ms_per_batch']} | {r['images_per_s']} | "
              f"{r['grid'][0]} x {r['grid'][1]} | {r['vocab']} | {r['peak_gib']} |" for r in rows]
    print("\n".join(table))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "tokenizers.json").write_text(json.dumps(rows, indent=1) + "\n")
        (out / "tokenizers.md").write_text("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
