"""`lightning-mim tokenizer {fit,encode}`: fit a k-means codebook; precompute ids into WebDataset shards.

    lightning-mim tokenizer fit codebooks/fmnist_p4_v512.safetensors --features pixels --patch-size 4 \
        --input-size 32 --vocab-size 512 --source fashion_mnist
    lightning-mim tokenizer fit codebooks/kclip.safetensors --features open_clip:RN50x64 --weights RN50x64.pt \
        --vocab-size 8192 --source imagefolder --data-dir /data/imagenet --max-points 4194304 --nredo 5 \
        --max-points-per-centroid 512 --compute-dtype float16
    lightning-mim tokenizer encode --kind kmeans --path codebooks/kclip.safetensors --features open_clip:RN50x64 \
        --weights RN50x64.pt '/data/in1k-wds/train-{000000..001023}.tar' /data/in1k-tok/train-%06d.tar
"""
from __future__ import annotations

import argparse

from lightning_mim.data.shards import default_workers
from lightning_mim.targets.base import COMPUTE_DTYPES


def _fit(args: argparse.Namespace) -> None:
    from lightning_mim.targets.fit import fit_codebook
    result = fit_codebook(args.output, args.features, args.vocab_size, weights=args.weights,
                          patch_size=args.patch_size, input_size=args.input_size, in_chans=args.in_chans,
                          source=args.source, data_dir=args.data_dir, train_shards=args.train_shards,
                          max_images=args.max_images, max_points=args.max_points, niter=args.niter, nredo=args.nredo,
                          max_points_per_centroid=args.max_points_per_centroid, seed=args.seed,
                          batch_size=args.batch_size, num_workers=args.num_workers, device=args.device,
                          compute_dtype=args.compute_dtype)
    print(f"wrote {args.output}: {result['vocab_size']} centroids of {result['dim']}-d {result['features']} features, "
          f"{result['grid'][0]} x {result['grid'][1]} ids at {result['input_size']} px, fitted on {result['points']} "
          f"patches of {result['source']['images']} images (features {result['sample_s']:.1f} s, k-means "
          f"{result['kmeans_s']:.1f} s, total {result['total_s']:.1f} s). Use it with tokenizer: "
          f"{{kind: kmeans, path: {args.output}, features: {result['features']}}}")


def _encode(args: argparse.Namespace) -> None:
    from lightning_mim.targets.encode import encode_shards
    config = {"kind": args.kind, "path": args.path, "features": args.features, "weights": args.weights,
              "input_size": args.input_size, "compute_dtype": args.compute_dtype}
    result = encode_shards(config, args.input_pattern, args.output_pattern, batch_size=args.batch_size,
                           device=args.device)
    print(f"wrote {result['written']} samples with ids in {result['shards']} shards ({result['reused']} were already "
          f"complete) in {result['seconds']:.1f} s; train on them with --data.source webdataset --data.train_shards "
          f"'{result['pattern']}' --data.token_ids_key tokens.npy (manifest {result['manifest']})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-mim tokenizer", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    dtypes = [key for key in COMPUTE_DTYPES if key]

    fit = commands.add_parser("fit", help="fit a k-means codebook (faiss) on per-patch features of a data source")
    fit.add_argument("output", help="codebook file to write, *.safetensors")
    fit.add_argument("--features", default="pixels",
                     help="pixels | timm:<model> | timm (an exported encoder) | open_clip:<arch> (default pixels)")
    fit.add_argument("--weights", help="local weights file of the timm / open_clip extractor (nothing is downloaded)")
    fit.add_argument("--vocab-size", type=int, default=512, help="number of centroids V (default 512)")
    fit.add_argument("--patch-size", type=int, default=16, help="pixels features: patch side (default 16)")
    fit.add_argument("--input-size", type=int, help="view side in px (default: 448 for CLIP RN50x64, the extractor's "
                                                    "own size, else the source's native size)")
    fit.add_argument("--in-chans", type=int, choices=(1, 3), help="pixels features: channels (default: the source's)")
    fit.add_argument("--source", default="fashion_mnist", choices=("fashion_mnist", "imagefolder", "webdataset",
                                                                   "synthetic"))
    fit.add_argument("--data-dir", help="fashion_mnist / imagefolder folder (as --data.data_dir)")
    fit.add_argument("--train-shards", help="webdataset shard pattern (as --data.train_shards)")
    fit.add_argument("--max-images", type=int, help="use a seeded subset of this many training images")
    fit.add_argument("--max-points", type=int,
                     help="patch features kept for k-means (default V x max-points-per-centroid)")
    fit.add_argument("--niter", type=int, default=20, help="k-means iterations (default 20, as k-CLIP)")
    fit.add_argument("--nredo", type=int, default=1, help="k-means restarts, best kept (k-CLIP: 5; default 1)")
    fit.add_argument("--max-points-per-centroid", type=int, default=256,
                     help="faiss sub-samples beyond V x this (k-CLIP: 512; default 256)")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--batch-size", type=int, default=256)
    fit.add_argument("--num-workers", type=int, default=min(4, default_workers()))
    fit.add_argument("--device", default="auto", help="extractor device: auto (cuda when present), cpu, cuda:N")
    fit.add_argument("--compute-dtype", choices=dtypes, help="extractor autocast dtype (default float32)")
    fit.set_defaults(run=_fit)

    encode = commands.add_parser("encode", help="copy WebDataset shards adding each sample's ids (tokens.npy)")
    encode.add_argument("input_pattern", help="input shards, e.g. '/data/in1k-wds/train-{000000..001023}.tar'")
    encode.add_argument("output_pattern", help="output shards, printf-style, e.g. /data/in1k-tok/train-%%06d.tar")
    encode.add_argument("--kind", default="kmeans", choices=("kmeans", "vqkd"))
    encode.add_argument("--path", required=True, help="k-means codebook (.safetensors) or VQ-KD checkpoint (.pth)")
    encode.add_argument("--features", default="pixels", help="k-means: the codebook's features")
    encode.add_argument("--weights", help="k-means: the extractor's weights file (default: the codebook's record)")
    encode.add_argument("--input-size", type=int, help="the tokenizer's view size (default: the kind's)")
    encode.add_argument("--compute-dtype", choices=dtypes)
    encode.add_argument("--batch-size", type=int, default=256)
    encode.add_argument("--device", default="auto")
    encode.set_defaults(run=_encode)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)


__all__ = ["build_parser", "main"]
