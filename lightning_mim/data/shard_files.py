"""WebDataset shard files: pattern expansion, and what the manifests and classes.json written beside the shards
record (sample counts, class names, stored token ids)."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from webdataset.shardlists import expand_urls

# The `format` of the manifest that `make-shards` writes beside its shards (shards.py writes it, this module reads it).
MANIFEST_FORMAT = "lightning-mim make-shards manifest 1"


def _is_local(url: str) -> bool:
    return urlparse(url).scheme in ("", "file")


def _local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def expand_shards(pattern: str) -> list[str]:
    """Brace-expand a shard pattern; local shards that do not exist are dropped with a warning.

    Raises FileNotFoundError naming the pattern when it names local files and none exists.
    """
    urls = expand_urls(pattern)
    missing = [url for url in urls if _is_local(url) and not os.path.isfile(_local_path(url))]
    if len(missing) == len(urls):
        raise FileNotFoundError(f"no shard file matches {pattern!r} (expanded to {len(urls)} paths, "
                                f"e.g. {urls[0]}); write shards with `lightning-mim make-shards SRC OUT_PATTERN`")
    if missing:
        warnings.warn(f"{len(missing)} of {len(urls)} shards of {pattern!r} do not exist (e.g. {missing[0]}); "
                      f"reading the others", RuntimeWarning, stacklevel=2)
    return [url for url in urls if url not in missing]


def read_classes(urls: list[str]) -> list[str] | None:
    """Class names from the classes.json that the shard writer puts next to local shards, if there is one."""
    if not urls or not _is_local(urls[0]):
        return None
    path = Path(_local_path(urls[0])).parent / "classes.json"
    if not path.is_file():
        return None
    return list(json.loads(path.read_text()))


_TRAIN_SAMPLES_FIX = "pass --data.train_samples N (the number of training samples; it sets the epoch length)"


def _manifest_entries(folder: Path) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Shard file name -> (manifest, entry) for every make-shards manifest in a folder."""
    entries: dict[str, tuple[Path, dict[str, Any]]] = {}
    for manifest_file in sorted(folder.glob("*manifest.json")):
        manifest = json.loads(manifest_file.read_text())
        if isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT:
            entries.update({name: (manifest_file, entry) for name, entry in manifest["shards"].items()})
    return entries


def count_samples(urls: list[str]) -> int:
    """Total samples of the shards `urls`, from the manifests that `make-shards` writes beside them.

    Raises ValueError naming `--data.train_samples` when a shard is remote or in no manifest, or when its size on
    disk differs from the recorded one.
    """
    by_folder: dict[Path, dict[str, tuple[Path, dict[str, Any]]]] = {}
    total = 0
    for url in urls:
        if not _is_local(url):
            raise ValueError(f"{url}: the sample count of remote shards is unknown; {_TRAIN_SAMPLES_FIX}")
        path = Path(_local_path(url))
        if path.parent not in by_folder:
            by_folder[path.parent] = _manifest_entries(path.parent)
        entries = by_folder[path.parent]
        if path.name not in entries:
            raise ValueError(f"{url} is in no make-shards manifest ({path.parent}/*manifest.json), so its sample count "
                             f"is unknown; write the shards with `lightning-mim make-shards`, which records it, or "
                             f"{_TRAIN_SAMPLES_FIX}")
        manifest_file, entry = entries[path.name]
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise ValueError(f"{url} has changed since {manifest_file} recorded it ({size} bytes on disk, "
                             f"{entry['bytes']} recorded); re-run its make-shards command, or {_TRAIN_SAMPLES_FIX}")
        total += entry["samples"]
    return total

def check_token_ids(urls: list[str], key: str) -> None:
    """Fail unless every local shard is recorded in a manifest of `lightning-mim tokenizer encode` that stored the
    ids under `key` (a plain make-shards manifest holds no ids)."""
    by_folder: dict[Path, set[str]] = {}
    for url in urls:
        if _is_local(url):
            path = Path(_local_path(url))
            by_folder.setdefault(path.parent, set()).add(path.name)
    for folder, names in sorted(by_folder.items()):
        recorded: set[str] = set()
        for manifest_file in folder.glob("*manifest.json"):
            manifest = json.loads(manifest_file.read_text())
            if isinstance(manifest, dict) and manifest.get("token_ids_key") == key:
                recorded |= set(manifest.get("shards", {}))
        if not names <= recorded:
            raise ValueError(f"token_ids_key {key!r}: {sorted(names - recorded)[0]} in {folder} holds no ids under "
                             f"that key (no `lightning-mim tokenizer encode` manifest records it); write the shards "
                             f"with `lightning-mim tokenizer encode ... IN_PATTERN OUT_PATTERN` and train on those")
