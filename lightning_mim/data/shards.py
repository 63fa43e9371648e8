"""Write an ImageFolder split as WebDataset tar shards (`lightning-mim make-shards SRC OUT_PATTERN`): whole shards in
parallel worker processes, each written atomically, resumable by shard, with a manifest beside the shards that records
every complete shard's sample count (the DataModule's `train_samples` comes from it)."""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import re
import warnings
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from tqdm import tqdm

from lightning_mim.data.shard_files import MANIFEST_FORMAT
from lightning_mim.data.skipping import LOAD_ERRORS
from lightning_mim.reliability import atomic_write

_SHARD_NUMBER = re.compile(r"%0?(\d*)d")
# What decides the shards' content; a manifest that differs in any of these belongs to other shards.
_SETTINGS = ("source", "pattern", "max_count", "shuffle", "seed", "images", "image_list_sha256")


def brace_pattern(output_pattern: str, shards: int) -> str:
    """The brace pattern that reads back `shards` shards written with a printf-style pattern."""
    match = _SHARD_NUMBER.search(output_pattern)
    if match is None:
        raise ValueError(f"{output_pattern!r} has no %d-style shard number (e.g. out/train-%06d.tar)")
    width = int(match.group(1) or 0)
    span = f"{{{0:0{width}d}..{shards - 1:0{width}d}}}" if shards > 1 else f"{0:0{width}d}"
    return output_pattern[:match.start()] + span + output_pattern[match.end():]


def manifest_path(output_pattern: str) -> Path:
    """The manifest of a shard pattern: its file name up to the shard number + `manifest.json`
    (out/train-%06d.tar -> out/train-manifest.json), so train and val shards in one folder have one each."""
    folder, name = os.path.split(output_pattern)
    return Path(folder) / (name[:_SHARD_NUMBER.search(name).start()] + "manifest.json")


def default_workers() -> int:
    """The CPUs this process may run on (the SLURM / taskset allocation, not the whole machine)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def write_shard(shard_path: str, samples: list[tuple[str, int, int]]) -> tuple[dict[str, Any], list[str]]:
    """Write one shard from (image path, class index, position) triples, atomically; runs in a worker process.

    An image is stored under the key of its position in the (shuffled) image list, so a shard's bytes depend only on
    its samples. Images that PIL cannot decode are left out. Returns the manifest entry (samples, bytes, skipped:
    the paths left out) and a `path: error` line for each image left out.
    """
    skipped: list[str] = []
    errors: list[str] = []
    compress = next((kind for kind in ("gz", "bz2", "xz") if shard_path.endswith(kind)), False)

    def write(handle: io.BufferedIOBase) -> None:
        # a fixed mtime: the same samples give byte-identical shards, whichever worker and run writes them
        with wds.TarWriter(handle, compress=compress, mtime=0) as sink:
            for path, label, position in samples:
                try:
                    data = Path(path).read_bytes()
                    with Image.open(io.BytesIO(data)) as image:
                        image.load()
                except LOAD_ERRORS as exc:
                    skipped.append(path)
                    errors.append(f"{path}: {exc}")
                    continue
                sink.write({"__key__": f"{position:09d}", Path(path).suffix[1:].lower(): data, "cls": label})

    target = Path(shard_path)
    for stale in target.parent.glob(f".{target.name}.*.tmp"):  # left by a killed run's atomic_write
        stale.unlink()
    atomic_write(target, write)
    return {"samples": len(samples) - len(skipped), "bytes": target.stat().st_size, "skipped": skipped}, errors


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode()))


def _image_list_digest(root: Path, samples: Iterable[tuple[str, int]]) -> str:
    digest = hashlib.sha256()
    for path, label in samples:
        digest.update(f"{os.path.relpath(path, root)}\t{label}\n".encode())
    return digest.hexdigest()


def _check_settings(manifest_file: Path, recorded: dict[str, Any], settings: dict[str, Any]) -> None:
    differences = [f"{key}={recorded.get(key)} there, {value} now" for key, value in settings.items()
                   if recorded.get(key) != value]
    if differences:
        raise ValueError(f"{manifest_file} records shards written with other settings ({'; '.join(differences)}); "
                         f"write to another OUT_PATTERN, or delete that manifest and its shards to start over")


def write_shards(image_folder: str, output_pattern: str, max_count: int = 1000, shuffle: bool = True,
                 seed: int = 0, workers: int | None = None, progress: bool = False) -> dict[str, int | str]:
    """Write SRC/<class>/<image> as shards of at most max_count samples, in `workers` processes (default: the CPUs
    this process may use).

    The image list (sorted, then shuffled with `seed`) is cut into consecutive runs of max_count, shard i holding
    run i, so the output does not depend on the number of workers. Each sample holds the original image bytes under
    their extension key (`jpg`, `png`, ...) and `cls`, the class index with classes sorted as torchvision's
    ImageFolder sorts them; classes.json and classes.txt go next to the shards. Images that PIL cannot decode are
    skipped, counted and named in a warning.

    Each shard is written to a temporary file and renamed when complete; then its sample count and size go into the
    manifest (`manifest_path`). Running again with the same arguments keeps the shards the manifest records (same
    size on disk) and writes the others; a manifest from another source folder, image list, shard size or shuffle
    is refused. `progress` shows a tqdm bar (images/s, ETA).
    Returns written, skipped, shards, reused (shards kept from an earlier run), classes (counts), pattern (a brace
    pattern for `--data.train_shards`) and manifest (its path).
    """
    root = Path(image_folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory; expected SRC/<class>/<image>")
    if max_count <= 0:
        raise ValueError(f"max_count must be positive, got {max_count}")
    workers = default_workers() if workers is None else workers
    if workers <= 0:
        raise ValueError(f"workers must be positive, got {workers}")
    brace_pattern(Path(output_pattern).name, 1)
    classes, class_to_idx = find_classes(str(root))
    samples = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    if not samples:
        raise FileNotFoundError(f"{root} has class folders but no images ({', '.join(IMG_EXTENSIONS)})")
    settings = {"source": str(root.resolve()), "pattern": Path(output_pattern).name, "max_count": max_count,
                "shuffle": shuffle, "seed": seed, "images": len(samples),
                "image_list_sha256": _image_list_digest(root, samples)}
    if shuffle:
        random.Random(seed).shuffle(samples)
    positioned = [(path, label, position) for position, (path, label) in enumerate(samples)]
    shard_samples = {output_pattern % (start // max_count): positioned[start:start + max_count]
                     for start in range(0, len(positioned), max_count)}

    out_dir = Path(output_pattern).parent
    manifest_file = manifest_path(output_pattern)
    recorded: dict[str, Any] = {}
    if manifest_file.is_file():
        previous = json.loads(manifest_file.read_text())
        _check_settings(manifest_file, previous, settings)
        # a recorded shard is complete while its file has the recorded size (renamed into place before recording)
        recorded = {name: entry for name, entry in previous["shards"].items()
                    if (out_dir / name).is_file() and (out_dir / name).stat().st_size == entry["bytes"]}
    manifest = {"format": MANIFEST_FORMAT, **settings, "classes": classes, "shards": dict(recorded)}

    def save_manifest() -> None:
        manifest["samples"] = sum(entry["samples"] for entry in manifest["shards"].values())
        manifest["complete"] = len(manifest["shards"]) == len(shard_samples)
        _write_text(manifest_file, json.dumps(manifest, indent=1, sort_keys=True) + "\n")

    _write_text(out_dir / "classes.json", json.dumps(classes, indent=1) + "\n")
    _write_text(out_dir / "classes.txt", "".join(f"{name}\n" for name in classes))
    save_manifest()

    todo = [path for path in shard_samples if Path(path).name not in recorded]
    workers = min(workers, max(1, len(todo)))
    with ProcessPoolExecutor(workers) if workers > 1 else nullcontext() as pool:
        # map submits every shard at once, so the workers are forked before tqdm starts its monitor thread
        results = (pool.map if pool else map)(write_shard, todo, [shard_samples[path] for path in todo])
        with tqdm(total=sum(len(shard_samples[path]) for path in todo), unit="img", desc="make-shards",
                  disable=not progress) as bar:
            for path, (entry, errors) in zip(todo, results):
                manifest["shards"][Path(path).name] = entry
                save_manifest()
                for error in errors:
                    warnings.warn(f"skipped unreadable image {error}", RuntimeWarning, stacklevel=2)
                bar.update(len(shard_samples[path]))
    return {"written": manifest["samples"],
            "skipped": sum(len(entry["skipped"]) for entry in manifest["shards"].values()),
            "shards": len(shard_samples), "reused": len(recorded), "classes": len(classes),
            "pattern": brace_pattern(output_pattern, len(shard_samples)), "manifest": str(manifest_file)}


def main(argv: list[str] | None = None) -> int:
    """Command line: make-shards SRC OUT_PATTERN [--max-count N] [--no-shuffle] [--seed S] [--workers N]."""
    parser = argparse.ArgumentParser(
        prog="lightning-mim make-shards",
        description="Write an ImageFolder split (SRC/<class>/<image>) as WebDataset tar shards, in parallel; "
                    "running the same command again completes an interrupted run (complete shards are kept).")
    parser.add_argument("src", metavar="SRC", help="split folder with one sub-folder per class")
    parser.add_argument("out_pattern", metavar="OUT_PATTERN", help="shard file pattern, e.g. out/train-%%06d.tar")
    parser.add_argument("--max-count", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the folder order instead of shuffling")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle (default 0)")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="processes writing shards (default: the CPUs available, here %(default)s)")
    args = parser.parse_args(argv)
    result = write_shards(args.src, args.out_pattern, max_count=args.max_count, shuffle=not args.no_shuffle,
                          seed=args.seed, workers=args.workers, progress=True)
    print(f"wrote {result['written']} samples of {result['classes']} classes in {result['shards']} shards "
          f"({result['reused']} of {result['shards']} shards were already complete), skipped {result['skipped']} "
          f"unreadable images; read them back with the pattern '{result['pattern']}' (--data.train_shards, whose "
          f"sample count the DataModule reads from {result['manifest']}, or --data.val_shards)")
    return 0
