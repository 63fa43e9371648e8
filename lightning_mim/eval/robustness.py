"""`evaluate --protocols robustness`: top-1 under the ImageNet-C corruptions (`eval.corruptions`) of a seeded subset of
the validation split, and on distribution-shift folders (`eval.shift`), for the classifiers of the same call.

Classifiers: those of the protocols that ran before it in the same `evaluate` call, `finetune` (the fine-tuned model
of its working folder's `last.ckpt`, the final epoch), `knn` (the same bank, k and temperature) and `logreg` (refitted
once on the cached training features at the L2 strength that protocol chose: the same fit, so the same clean top-1);
with none of them, `knn` and `logreg` (logreg then chooses its L2 as its protocol does). `linear` (the SGD probe) is
not scored.

Rows of `<results>/results.csv`: one per classifier with protocol `robustness-<classifier>`, `top1` the mean
corruption accuracy (mCA: top-1 averaged over the corruptions and severities 1-5), `clean_top1` the top-1 of the same
images uncorrupted and `val_images` their number; one per classifier and shift set with protocol
`shift-<set>-<classifier>`. `<results>/robustness.csv` holds every (classifier, corruption, severity) top-1, the
per-corruption means (severity `mean`), the clean top-1 (corruption `clean`) and the shift sets.
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_mim.eval.corruptions import SEVERITIES, corrupt_batch, load_imagecorruptions, parse_corruptions
from lightning_mim.eval.features import FrozenFeatures
from lightning_mim.eval.knn import knn_classify
from lightning_mim.eval.logreg import fit_logistic_regression, linear_probe, standardiser
from lightning_mim.eval.resumable import LAST_NAME
from lightning_mim.eval.shift import ShiftSet, parse_shift_dir, shift_sets, shift_top1

Scorer = Callable[[Tensor], Tensor]  # normalised images (B, C, H, W) -> class scores (B, K)
DETAIL_COLUMNS = ("run", "method", "config_hash", "timestamp", "classifier", "corruption", "severity", "top1",
                  "images")


def add_robustness_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--robustness-images", type=int, default=None,
                        help="robustness: corrupt a seeded subset of N validation images (default: all of them)")
    parser.add_argument("--corruptions", default=None,
                        help="robustness: comma-separated ImageNet-C corruptions or families (noise, blur, weather, "
                             "digital); default: all 15")
    parser.add_argument("--shift-dir", action="append", type=parse_shift_dir, default=[], metavar="NAME=PATH",
                        help="robustness: a distribution-shift ImageFolder whose class folders are training-class "
                             "wnids (e.g. imagenet-r=/data/imagenet-r); repeatable")


def feature_scorer(feature_fn: Callable[[Tensor], Tensor], classify: Callable[[Tensor], Tensor],
                   device: torch.device) -> Scorer:
    return lambda images: classify(feature_fn(images.to(device)).float())


def frozen_scorers(features: FrozenFeatures, options: argparse.Namespace, earlier: dict[str, dict[str, Any]],
                   names: Iterable[str]) -> dict[str, Scorer]:
    """The k-NN and logistic-regression classifiers of `features`, as their protocols build them."""
    scorers: dict[str, Scorer] = {}
    num_classes, device = features.datamodule.num_classes, features.device
    if "knn" in names:
        bank, bank_labels = features.train(features.datamodule.hparams.knn_bank_size)
        bank, bank_labels = F.normalize(bank, dim=1).to(device), bank_labels.to(device)
        scorers["knn"] = feature_scorer(features.feature_fn, lambda x: knn_classify(
            bank, bank_labels, F.normalize(x, dim=1), num_classes, k=options.k, temperature=options.temperature), device)
    if "logreg" in names:
        train, train_labels = features.train(options.train_subset)
        l2 = earlier.get("logreg", {}).get("l2")
        if l2 is None:
            test, test_labels = features.val()
            l2 = linear_probe(train, train_labels, test, test_labels, num_classes, tuple(options.logreg_l2),
                              options.logreg_holdout, options.seed, options.logreg_max_iter, device=device)["l2"]
        train = train.to(device, torch.float32)
        mean, std = standardiser(train)
        fit = fit_logistic_regression((train - mean) / std, train_labels.to(device), num_classes, l2,
                                      options.logreg_max_iter)
        scorers["logreg"] = feature_scorer(features.feature_fn, lambda x: fit.logits((x - mean) / std), device)
    return scorers


def finetuned_scorer(folder: Path, device: torch.device) -> Scorer:
    """The fine-tuned classifier of a finished `finetune` working folder (its final epoch)."""
    from lightning_mim.eval.finetune import FineTune  # imports timm's training stack: only when fine-tuning ran

    model = FineTune.load_from_checkpoint(folder / LAST_NAME, map_location=device, pretrained=None).to(device).eval()
    return lambda images: model(images.to(device))


def subset_indices(total: int, size: int | None, seed: int) -> Tensor:
    """The sorted validation indices scored: a seeded subset of `size` of `total` (all when size is None)."""
    if size is None or size >= total:
        return torch.arange(total)
    if size < 1:
        raise ValueError(f"--robustness-images must be positive, got {size}")
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:size].sort().values


@torch.no_grad()
def corruption_top1(scorers: dict[str, Scorer], loader: Iterable, chosen: Tensor, corruptions: tuple[str, ...],
                    seed: int, mean: tuple[float, ...], std: tuple[float, ...],
                    log: Callable[[str], None]) -> dict[tuple[str, str, int], float]:
    """Top-1 (%) per (classifier, corruption, severity) over the `chosen` indices of the (unshuffled) `loader`, plus
    (classifier, "clean", 0). Each image is corrupted once per corruption and severity, for every classifier."""
    correct: dict[tuple[str, str, int], int] = {}
    settings = [("clean", 0), *((name, severity) for name in corruptions for severity in SEVERITIES)]
    seen, position, start = 0, 0, time.perf_counter()
    for images, labels in loader:
        index = torch.arange(position, position + len(labels))
        position += len(labels)
        mask = torch.isin(index, chosen)
        if not mask.any():
            continue
        images, labels, index = images[mask], torch.as_tensor(labels)[mask], index[mask]
        for name, severity in settings:
            batch = images if name == "clean" else corrupt_batch(images, index, name, severity, seed, mean, std)
            for classifier, scorer in scorers.items():
                hits = int((scorer(batch).argmax(dim=1).cpu() == labels).sum())
                correct[classifier, name, severity] = correct.get((classifier, name, severity), 0) + hits
        seen += len(labels)
        log(f"robustness: {seen}/{len(chosen)} images ({time.perf_counter() - start:.0f} s)")
    return {key: 100.0 * hits / max(seen, 1) for key, hits in correct.items()}


def summarise(top1: dict[tuple[str, str, int], float], corruptions: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Per classifier: `clean`, `mca` (mean over corruptions and severities) and `per_corruption` means."""
    summary: dict[str, dict[str, Any]] = {}
    for classifier in dict.fromkeys(key[0] for key in top1):
        per = {name: sum(top1[classifier, name, s] for s in SEVERITIES) / len(SEVERITIES) for name in corruptions}
        summary[classifier] = {"clean": top1[classifier, "clean", 0], "per_corruption": per,
                               "mca": sum(per.values()) / len(per) if per else float("nan")}
    return summary


def run_robustness(features: FrozenFeatures, options: argparse.Namespace, earlier: dict[str, dict[str, Any]],
                   log: Callable[[str], None] = print) -> tuple[list[tuple[str, dict[str, Any]]], list[dict[str, Any]]]:
    """Score the classifiers (see the module docstring) under the corruptions and on the shift sets. Returns the
    results rows as (protocol, metrics) and the detail rows of robustness.csv (without the row identity)."""
    corruptions = parse_corruptions(options.corruptions)
    load_imagecorruptions()  # a missing package fails here, before any classifier is fitted
    datamodule, device = features.datamodule, features.device
    shifts = shift_sets(options.shift_dir, datamodule)
    if "finetune" in earlier:
        scorers = {"finetune": finetuned_scorer(Path(earlier["finetune"]["folder"]), device)}
    else:
        scorers = {}
    frozen = [name for name in ("knn", "logreg") if name in earlier] or ([] if scorers else ["knn", "logreg"])
    scorers |= frozen_scorers(features, options, earlier, frozen)
    total = features.val()[1].shape[0]
    chosen = subset_indices(total, options.robustness_images, options.seed)
    mean, std = datamodule.mean_for(datamodule.in_chans), datamodule.std_for(datamodule.in_chans)
    top1 = corruption_top1(scorers, datamodule.val_dataloader(), chosen, corruptions, options.seed, mean, std,
                           lambda line: log(line) if options.progress else None)
    summary = summarise(top1, corruptions)
    rows: list[tuple[str, dict[str, Any]]] = []
    details: list[dict[str, Any]] = []
    for classifier, result in summary.items():
        rows.append((f"robustness-{classifier}", {"top1": result["mca"], "clean_top1": result["clean"],
                                                   "val_images": len(chosen), "epochs": 0}))
        details.append({"classifier": classifier, "corruption": "clean", "severity": 0, "top1": result["clean"]})
        for name in corruptions:
            details += [{"classifier": classifier, "corruption": name, "severity": severity,
                         "top1": top1[classifier, name, severity]} for severity in SEVERITIES]
            details.append({"classifier": classifier, "corruption": name, "severity": "mean",
                            "top1": result["per_corruption"][name]})
        details.append({"classifier": classifier, "corruption": "mCA", "severity": "mean", "top1": result["mca"]})
    for detail in details:
        detail["images"] = len(chosen)
    for shift in shifts:
        rows += shift_rows(shift, scorers, details, options)
    return rows, details


def shift_rows(shift: ShiftSet, scorers: dict[str, Scorer], details: list[dict[str, Any]],
               options: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    for classifier, scorer in scorers.items():
        top1 = shift_top1(scorer, shift, options.batch_size or 64, options.num_workers or 0)
        rows.append((f"shift-{shift.name}-{classifier}", {"top1": top1, "val_images": len(shift.dataset),
                                                          "epochs": 0}))
        details.append({"classifier": classifier, "corruption": f"shift:{shift.name}", "severity": "",
                        "top1": top1, "images": len(shift.dataset)})
    return rows


def append_details(results_dir: Path, identity: dict[str, Any], details: list[dict[str, Any]]) -> None:
    """Append the detail rows to `<results>/robustness.csv` (header written when the file is new)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / "robustness.csv"
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=DETAIL_COLUMNS)
        if new:
            writer.writeheader()
        for detail in details:
            top1 = detail["top1"]
            writer.writerow({**identity, **detail, "top1": f"{top1:.2f}"})


__all__ = ["DETAIL_COLUMNS", "add_robustness_arguments", "append_details", "corruption_top1",
           "frozen_scorers", "run_robustness", "subset_indices", "summarise"]
