"""`lightning-mim tokenizer encode`: copy WebDataset shards (e.g. from `make-shards`) adding each sample's tokenizer ids
(`tokens.npy`, an integer (h, w) array of the centre-square view), for runs where tokenising on the fly would cost
more than the training step. The DataModule delivers them as views[1] with `--data.token_ids_key tokens.npy`.

Output shard i holds input shard i's samples unchanged plus the ids; it is written atomically and recorded in a
make-shards manifest (so `train_samples` is read from it) that also records the tokenizer; running the same command
again keeps complete shards. The ids are valid only for a deterministic crop, the centred largest square at the
tokenizer's input size (MaPeT's scale-1 pre-training crop): a method that crops or flips at random must tokenise
on the fly.
"""
from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from tqdm import tqdm

from lightning_mim.data.shard_files import MANIFEST_FORMAT, expand_shards
from lightning_mim.data.shard_pipeline import decode_sample
from lightning_mim.data.shards import brace_pattern, manifest_path
from lightning_mim.reliability import atomic_write
from lightning_mim.targets import Tokenizer, TokenizerConfig, build_tokenizer, centre_square_view
from lightning_mim.targets.fit import resolve_device

TOKEN_IDS_KEY = "tokens.npy"


def ids_bytes(ids: torch.Tensor, vocab_size: int) -> bytes:
    """An (h, w) id grid as .npy bytes, int16 when the vocabulary fits (V <= 32768), else int32."""
    buffer = io.BytesIO()
    np.save(buffer, ids.cpu().numpy().astype(np.int16 if vocab_size <= 2 ** 15 else np.int32))
    return buffer.getvalue()


def file_sha256(path: str | None) -> str | None:
    """The file's sha256 (a re-fitted codebook at the same path must not resume into older shards)."""
    if path is None:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def encode_shard(url: str, target: Path, tokenizer: Tokenizer, batch_size: int, device: torch.device) -> int:
    """Write `target`: `url`'s samples with their ids added (tokenised on `device`). Returns the sample count."""
    view = centre_square_view(tokenizer.input_size, "L" if tokenizer.in_chans == 1 else "RGB")
    samples = [{key: value for key, value in sample.items() if key == "__key__" or not key.startswith("__")}
               for sample in wds.WebDataset([url], shardshuffle=False, empty_check=False)]
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        images = torch.stack([view(decode_sample({**sample, "__url__": url})[0]) for sample in chunk])
        ids = tokenizer(images.to(device))
        for sample, grid in zip(chunk, ids):
            sample[TOKEN_IDS_KEY] = ids_bytes(grid, tokenizer.vocab_size)

    def write(handle: io.BufferedIOBase) -> None:
        with wds.TarWriter(handle, mtime=0) as sink:
            for sample in samples:
                sink.write(sample)

    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        stale.unlink()
    atomic_write(target, write)
    return len(samples)


def encode_shards(config: TokenizerConfig | dict[str, Any], input_pattern: str, output_pattern: str,
                  batch_size: int = 256, device: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Tokenise every sample of the shards `input_pattern` into shards `output_pattern` (printf-style, e.g.
    out/train-%06d.tar). Returns written, shards, reused, pattern and manifest."""
    config = TokenizerConfig.coerce(config)
    brace_pattern(Path(output_pattern).name, 1)  # fails clearly without a %d shard number
    urls = expand_shards(input_pattern)
    tokenizer = build_tokenizer(config)
    run_device = resolve_device(device)
    tokenizer.to(run_device)
    settings = {"source": input_pattern, "pattern": Path(output_pattern).name, "token_ids_key": TOKEN_IDS_KEY,
                "tokenizer": json.loads(json.dumps(config.to_dict())), "vocab_size": tokenizer.vocab_size,
                "tokenizer_sha256": file_sha256(config.path), "grid": list(tokenizer.grid_size),
                "input_size": tokenizer.input_size, "view": "centre square",
                "input_bytes": [Path(url).stat().st_size for url in urls]}
    out_dir, manifest_file = Path(output_pattern).parent, manifest_path(output_pattern)
    out_dir.mkdir(parents=True, exist_ok=True)
    recorded: dict[str, Any] = {}
    if manifest_file.is_file():
        previous = json.loads(manifest_file.read_text())
        differences = [key for key, value in settings.items() if previous.get(key) != value]
        if differences:
            raise ValueError(f"{manifest_file} records shards encoded with other settings ({', '.join(differences)}); "
                             f"write to another OUT_PATTERN, or delete that manifest and its shards to start over")
        recorded = {name: entry for name, entry in previous["shards"].items()
                    if (out_dir / name).is_file() and (out_dir / name).stat().st_size == entry["bytes"]}
    classes = Path(urls[0]).parent / "classes.json"
    manifest = {"format": MANIFEST_FORMAT, **settings, "shards": dict(recorded)}
    if classes.is_file():
        manifest["classes"] = json.loads(classes.read_text())
        atomic_write(out_dir / "classes.json", lambda handle: handle.write(classes.read_bytes()))

    def save_manifest() -> None:
        manifest["samples"] = sum(entry["samples"] for entry in manifest["shards"].values())
        manifest["complete"] = len(manifest["shards"]) == len(urls)
        text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
        atomic_write(manifest_file, lambda handle: handle.write(text.encode()))

    save_manifest()
    started = time.perf_counter()
    todo = [(index, url) for index, url in enumerate(urls) if Path(output_pattern % index).name not in recorded]
    with tqdm(total=len(todo), unit="shard", desc="tokenizer encode", disable=not progress) as bar:
        for index, url in todo:
            target = Path(output_pattern % index)
            count = encode_shard(url, target, tokenizer, batch_size, run_device)
            manifest["shards"][target.name] = {"samples": count, "bytes": target.stat().st_size, "skipped": []}
            save_manifest()
            bar.update(1)
    return {"written": manifest["samples"], "shards": len(urls), "reused": len(recorded),
            "pattern": brace_pattern(output_pattern, len(urls)), "manifest": str(manifest_file),
            "seconds": time.perf_counter() - started}
