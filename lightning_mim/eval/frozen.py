"""The protocols of `lightning-mim evaluate` on cached frozen features (`FrozenFeatures`): `knn` and `logreg`, their
command-line options, and logreg's details file."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch.nn.functional as F

from lightning_mim.eval.features import FrozenFeatures
from lightning_mim.eval.knn import knn_accuracy
from lightning_mim.eval.logreg import DEFAULT_L2_GRID, DEFAULT_MAX_ITER, linear_probe

FROZEN_PROTOCOLS = ("knn", "logreg")  # the protocols that also take the pixel pseudo encoder


def l2_grid(text: str) -> list[float]:
    """`--logreg-l2`: comma-separated positive floats."""
    try:
        values = [float(value) for value in text.split(",") if value.strip()]
    except ValueError:
        values = []
    if not values or any(value <= 0 for value in values):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of positive L2 strengths, e.g. "
                                         f"1e-6,1e-4,1e-2")
    return values


def add_frozen_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the feature cache and of the logreg protocol."""
    parser.add_argument("--feature-cache", default=None,
                        help="folder of the cached frozen features of knn and logreg (default: <results>/features; "
                             "'none': no cache)")
    parser.add_argument("--logreg-l2", type=l2_grid, default=list(DEFAULT_L2_GRID),
                        help="logreg: comma-separated L2 strengths to choose from (default: "
                             f"{','.join(f'{l2:g}' for l2 in DEFAULT_L2_GRID)})")
    parser.add_argument("--logreg-holdout", type=float, default=0.1,
                        help="logreg: fraction of the training split held out to choose the L2 strength")
    parser.add_argument("--logreg-max-iter", type=int, default=DEFAULT_MAX_ITER,
                        help=f"logreg: L-BFGS iteration cap per fit (default {DEFAULT_MAX_ITER})")


def run_frozen(protocol: str, features: FrozenFeatures, options: argparse.Namespace) -> dict[str, Any]:
    """`knn`: weighted k-NN of the validation features against a `--knn-bank` subset of the training split.
    `logreg`: the converged logistic-regression probe (`lightning_mim.eval.logreg.linear_probe`) trained on the
    training split (or its `--train-subset`), on the features' device."""
    test, test_labels = features.val()
    num_classes = features.datamodule.num_classes
    if protocol == "knn":
        bank, bank_labels = features.train(features.datamodule.hparams.knn_bank_size)
        return knn_accuracy(F.normalize(bank, dim=1), bank_labels, F.normalize(test, dim=1), test_labels,
                            num_classes, k=options.k, temperature=options.temperature)
    if protocol == "logreg":
        train, train_labels = features.train(options.train_subset)
        return linear_probe(train, train_labels, test, test_labels, num_classes, l2_grid=tuple(options.logreg_l2),
                            holdout=options.logreg_holdout, seed=options.seed, max_iter=options.logreg_max_iter,
                            device=features.device, log=lambda line: print(line, flush=True))
    raise ValueError(f"unknown frozen-feature protocol {protocol!r}: choose from {', '.join(FROZEN_PROTOCOLS)}")


def append_logreg_details(results_dir: Path, row: dict[str, Any], metrics: dict[str, Any]) -> None:
    """One JSON line per logreg row in `<results>/logreg.jsonl`: its results.csv key, the chosen L2, the held-out
    top-1 per strength and how the final fit stopped."""
    details = {key: row[key] for key in ("run", "method", "config_hash", "timestamp")} | {
        "l2": metrics["l2"], "heldout_top1": {f"{l2:g}": top1 for l2, top1 in metrics["heldout_top1"].items()},
        "sweep": metrics["sweep"], "iterations": metrics["iterations"], "stop": metrics["stop"],
        "gradient": metrics["gradient"]}
    results_dir.mkdir(parents=True, exist_ok=True)
    with (results_dir / "logreg.jsonl").open("a") as handle:
        handle.write(json.dumps(details) + "\n")


def recorded_l2(results_dir: Path, identity: dict[str, Any], grid: tuple[float, ...]) -> float | None:
    """The L2 strength that the latest logreg row of this encoder (same run and config hash) chose, from
    `<results>/logreg.jsonl`, when it is one of `grid`; None without one. A robustness-only call refits at it instead
    of sweeping again (the sweep of a poorly conditioned encoder costs minutes on the CPU). The record does not hold
    evaluate's --seed (the held-out split): a call with another seed reuses the first seed's choice."""
    path = results_dir / "logreg.jsonl"
    if not path.is_file():
        return None
    chosen = None
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if (record["run"], record["config_hash"]) == (identity["run"], identity["config_hash"]):
            chosen = record["l2"]
    return chosen if chosen is not None and any(math.isclose(chosen, l2) for l2 in grid) else None


__all__ = ["FROZEN_PROTOCOLS", "add_frozen_arguments", "append_logreg_details", "l2_grid", "recorded_l2",
           "run_frozen"]
