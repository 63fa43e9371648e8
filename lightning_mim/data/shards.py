"""Write an ImageFolder split as WebDataset tar shards (`lightning-mim make-shards SRC OUT_PATTERN`)."""
from __future__ import annotations

import argparse
import io
import json
import random
import re
import warnings
from pathlib import Path

import webdataset as wds
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from lightning_mim.data.sources import LOAD_ERRORS

_SHARD_NUMBER = re.compile(r"%0?(\d*)d")


def brace_pattern(output_pattern: str, shards: int) -> str:
    """The brace pattern that reads back `shards` shards written with a printf-style pattern."""
    match = _SHARD_NUMBER.search(output_pattern)
    if match is None:
        raise ValueError(f"{output_pattern!r} has no %d-style shard number (e.g. out/train-%06d.tar)")
    width = int(match.group(1) or 0)
    span = f"{{{0:0{width}d}..{shards - 1:0{width}d}}}" if shards > 1 else f"{0:0{width}d}"
    return output_pattern[:match.start()] + span + output_pattern[match.end():]


def write_shards(image_folder: str, output_pattern: str, max_count: int = 1000, shuffle: bool = True,
                 seed: int = 0) -> dict[str, int | str]:
    """Write SRC/<class>/<image> as shards of at most max_count samples.

    Each sample holds the original image bytes under their extension key (`jpg`, `png`, ...) and `cls`, the class
    index with classes sorted as torchvision's ImageFolder sorts them; classes.json and classes.txt go next to the
    shards. Images that PIL cannot decode are skipped, counted and named in a warning.
    Returns written, skipped, shards, classes (counts) and pattern (a brace pattern for `--data.train_shards`).
    """
    root = Path(image_folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory; expected SRC/<class>/<image>")
    if max_count <= 0:
        raise ValueError(f"max_count must be positive, got {max_count}")
    brace_pattern(output_pattern, 1)
    classes, class_to_idx = find_classes(str(root))
    samples = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    if not samples:
        raise FileNotFoundError(f"{root} has class folders but no images ({', '.join(IMG_EXTENSIONS)})")
    if shuffle:
        random.Random(seed).shuffle(samples)

    out_dir = Path(output_pattern).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "classes.json").write_text(json.dumps(classes, indent=1) + "\n")
    (out_dir / "classes.txt").write_text("".join(f"{name}\n" for name in classes))

    written = skipped = 0
    with wds.ShardWriter(output_pattern, maxcount=max_count, verbose=0) as sink:
        for path, label in samples:
            data = Path(path).read_bytes()
            try:
                with Image.open(io.BytesIO(data)) as image:
                    image.load()
            except LOAD_ERRORS as exc:
                skipped += 1
                warnings.warn(f"skipped unreadable image {path}: {exc}", RuntimeWarning, stacklevel=2)
                continue
            sink.write({"__key__": f"{written:09d}", Path(path).suffix[1:].lower(): data, "cls": label})
            written += 1
        shards = sink.shard
    return {"written": written, "skipped": skipped, "shards": shards, "classes": len(classes),
            "pattern": brace_pattern(output_pattern, shards)}


def main(argv: list[str] | None = None) -> int:
    """Command line: make-shards SRC OUT_PATTERN [--max-count N] [--no-shuffle] [--seed S]."""
    parser = argparse.ArgumentParser(
        prog="lightning-mim make-shards",
        description="Write an ImageFolder split (SRC/<class>/<image>) as WebDataset tar shards.")
    parser.add_argument("src", metavar="SRC", help="split folder with one sub-folder per class")
    parser.add_argument("out_pattern", metavar="OUT_PATTERN", help="shard file pattern, e.g. out/train-%%06d.tar")
    parser.add_argument("--max-count", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the folder order instead of shuffling")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle (default 0)")
    args = parser.parse_args(argv)
    result = write_shards(args.src, args.out_pattern, max_count=args.max_count, shuffle=not args.no_shuffle,
                          seed=args.seed)
    print(f"wrote {result['written']} samples of {result['classes']} classes in {result['shards']} shards, "
          f"skipped {result['skipped']} unreadable images; read them back with the pattern "
          f"'{result['pattern']}' (--data.train_shards with --data.train_samples {result['written']}, "
          f"or --data.val_shards)")
    return 0
