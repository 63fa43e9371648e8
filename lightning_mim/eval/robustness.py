"""`evaluate --protocols robustness`: top-1 under the ImageNet-C corruptions (`eval.corruptions`) of a seeded subset of
the validation split, and on distribution-shift folders (`eval.shift`), for the classifiers of the same call.

Classifiers: those of the protocols that ran before it in the same `evaluate` call, `finetune` (the fine-tuned model
of its working folder's `last.ckpt`, the final epoch), `knn` (the same bank, k and temperature) and `logreg` (refitted
once on the cached training features at the L2 strength that protocol chose: the same fit, so the same clean top-1);
with none of them, `knn` and `logreg` (logreg at the L2 that the encoder's latest logreg row in the same
`--results` chose, from logreg.jsonl, else chosen as its protocol does). `linear` (the SGD probe) is
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_mim.eval.corruptions import (
    SEVERITIES, CorruptionCache, corrupt_pixels, from_pixels, load_imagecorruptions, parse_corruptions, to_pixels,
)
from lightning_mim.eval.features import FrozenFeatures
from lightning_mim.eval.knn import knn_classify
from lightning_mim.eval.logreg import fit_logistic_regression, linear_probe, standardiser
from lightning_mim.eval.resumable import LAST_NAME
from lightning_mim.eval.shift import ShiftSet, parse_shift_dir, shift_sets, shift_top1

DETAIL_COLUMNS = ("run", "method", "config_hash", "timestamp", "classifier", "corruption", "severity", "top1",
                  "images")


@dataclass(frozen=True)
class Classifier:
    """scores = head(extract(normalised images)); classifiers sharing one `extract` (the frozen encoder) run it once
    per batch."""

    extract: Callable[[Tensor], Tensor]
    head: Callable[[Tensor], Tensor]

    def __call__(self, images: Tensor) -> Tensor:
        return self.head(self.extract(images))


def add_robustness_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--robustness-images", type=int, default=None,
                        help="robustness: corrupt a seeded subset of N validation images (default: all of them)")
    parser.add_argument("--corruptions", default=None,
                        help="robustness: comma-separated ImageNet-C corruptions or families (noise, blur, weather, "
                             "digital); default: all 15; none: score the --shift-dir sets only")
    parser.add_argument("--shift-dir", action="append", type=parse_shift_dir, default=[], metavar="NAME=PATH",
                        help="robustness: a distribution-shift ImageFolder whose class folders are training-class "
                             "wnids (e.g. imagenet-r=/data/imagenet-r); repeatable")


def frozen_classifiers(features: FrozenFeatures, options: argparse.Namespace, earlier: dict[str, dict[str, Any]],
                       names: Iterable[str], recorded: float | None = None) -> dict[str, Classifier]:
    """The k-NN and logistic-regression classifiers of `features`, as their protocols build them; logreg at the L2
    of the same call's logreg protocol, else at `recorded` (an earlier call's choice), else chosen as the protocol
    chooses it."""
    num_classes, device = features.datamodule.num_classes, features.device

    def extract(images: Tensor) -> Tensor:
        return features.feature_fn(images.to(device)).float()

    classifiers: dict[str, Classifier] = {}
    if "knn" in names:
        bank, bank_labels = features.train(features.datamodule.hparams.knn_bank_size)
        bank, bank_labels = F.normalize(bank, dim=1).to(device), bank_labels.to(device)
        classifiers["knn"] = Classifier(extract, lambda x: knn_classify(
            bank, bank_labels, F.normalize(x, dim=1), num_classes, k=options.k, temperature=options.temperature))
    if "logreg" in names:
        train, train_labels = features.train(options.train_subset)
        l2 = earlier.get("logreg", {}).get("l2", recorded)
        if l2 is None:
            test, test_labels = features.val()
            l2 = linear_probe(train, train_labels, test, test_labels, num_classes, tuple(options.logreg_l2),
                              options.logreg_holdout, options.seed, options.logreg_max_iter, device=device)["l2"]
        train = train.to(device, torch.float32)
        mean, std = standardiser(train)
        fit = fit_logistic_regression((train - mean) / std, train_labels.to(device), num_classes, l2,
                                      options.logreg_max_iter)
        classifiers["logreg"] = Classifier(extract, lambda x: fit.logits((x - mean) / std))
    return classifiers


def finetuned_classifier(folder: Path, device: torch.device) -> Classifier:
    """The fine-tuned classifier of a finished `finetune` working folder (its final epoch)."""
    from lightning_mim.eval.finetune import FineTune  # imports timm's training stack: only when fine-tuning ran

    model = FineTune.load_from_checkpoint(folder / LAST_NAME, map_location=device, pretrained=None).to(device).eval()
    return Classifier(lambda images: model(images.to(device)), lambda logits: logits)


def predict(classifiers: dict[str, Classifier], images: Tensor) -> dict[str, Tensor]:
    """Each classifier's scores (B, K) on the CPU, each distinct `extract` run once."""
    extracted: dict[int, Tensor] = {}
    scores = {}
    for name, classifier in classifiers.items():
        key = id(classifier.extract)
        if key not in extracted:
            extracted[key] = classifier.extract(images)
        scores[name] = classifier.head(extracted[key]).cpu()
    return scores


def subset_indices(total: int, size: int | None, seed: int) -> Tensor:
    """The sorted validation indices scored: a seeded subset of `size` of `total` (all when size is None)."""
    if size is None or size >= total:
        return torch.arange(total)
    if size < 1:
        raise ValueError(f"--robustness-images must be positive, got {size}")
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:size].sort().values


@torch.no_grad()
def corruption_top1(classifiers: dict[str, Classifier], loader: Iterable, chosen: Tensor,
                    corruptions: tuple[str, ...], seed: int, mean: tuple[float, ...], std: tuple[float, ...],
                    batch_size: int, cache: CorruptionCache | None,
                    log: Callable[[str], None]) -> dict[tuple[str, str, int], float]:
    """Top-1 (%) per (classifier, corruption, severity) over the `chosen` indices of the (unshuffled) `loader`, plus
    (classifier, "clean", 0) on the images as loaded. The chosen images are held as uint8 pixels, each corrupted
    once per corruption and severity (or read from `cache`) and scored by every classifier."""
    correct: dict[tuple[str, str, int], int] = {}

    def count(name: str, severity: int, images: Tensor, labels: Tensor) -> None:
        for classifier, scores in predict(classifiers, images).items():
            hits = int((scores.argmax(dim=1) == labels).sum())
            correct[classifier, name, severity] = correct.get((classifier, name, severity), 0) + hits

    pixels, labels, position = [], [], 0
    for images, batch_labels in loader:
        index = torch.arange(position, position + len(batch_labels))
        position += len(batch_labels)
        keep = torch.isin(index, chosen)
        if keep.any():
            count("clean", 0, images[keep], torch.as_tensor(batch_labels)[keep])
            pixels.append(to_pixels(images[keep], mean, std))
            labels.append(torch.as_tensor(batch_labels)[keep])
    all_pixels, all_labels = torch.cat(pixels), torch.cat(labels)
    for name in corruptions:
        start = time.perf_counter()
        for severity in SEVERITIES:
            corrupted = (cache.corrupted(all_pixels, chosen, name, severity, seed) if cache is not None
                         else corrupt_pixels(all_pixels, chosen, name, severity, seed))
            for first in range(0, len(chosen), batch_size):
                part = slice(first, first + batch_size)
                count(name, severity, from_pixels(corrupted[part], mean, std), all_labels[part])
        log(f"robustness: {name} on {len(chosen)} images x {len(SEVERITIES)} severities "
            f"({time.perf_counter() - start:.1f} s)")
    return {key: 100.0 * hits / len(chosen) for key, hits in correct.items()}


def summarise(top1: dict[tuple[str, str, int], float], corruptions: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Per classifier: `clean`, `mca` (mean over corruptions and severities) and `per_corruption` means."""
    summary: dict[str, dict[str, Any]] = {}
    for classifier in dict.fromkeys(key[0] for key in top1):
        per = {name: sum(top1[classifier, name, s] for s in SEVERITIES) / len(SEVERITIES) for name in corruptions}
        summary[classifier] = {"clean": top1[classifier, "clean", 0], "per_corruption": per,
                               "mca": sum(per.values()) / len(per)}
    return summary


def run_robustness(features: FrozenFeatures, options: argparse.Namespace, earlier: dict[str, dict[str, Any]],
                   log: Callable[[str], None] = print, recorded: float | None = None,
                   ) -> tuple[list[tuple[str, dict[str, Any]]], list[dict[str, Any]]]:
    """Score the classifiers (see the module docstring) under the corruptions and on the shift sets; `recorded`: the
    L2 an earlier logreg row of this encoder chose (`frozen.recorded_l2`). Returns the results rows as (protocol,
    metrics) and the detail rows of robustness.csv (without the row identity)."""
    corruptions = parse_corruptions(options.corruptions)
    if corruptions:
        load_imagecorruptions()  # a missing package fails here, before any classifier is fitted
    datamodule, device = features.datamodule, features.device
    shifts = shift_sets(options.shift_dir, datamodule)
    if not corruptions and not shifts:
        raise ValueError("robustness with --corruptions none needs a --shift-dir NAME=PATH to score")
    if "finetune" in earlier:
        classifiers = {"finetune": finetuned_classifier(Path(earlier["finetune"]["folder"]), device)}
    else:
        classifiers = {}
    frozen = [name for name in ("knn", "logreg") if name in earlier] or ([] if classifiers else ["knn", "logreg"])
    if "logreg" in frozen and "logreg" not in earlier and recorded is not None:
        log(f"robustness: logreg refitted at l2={recorded:g}, the strength this encoder's logreg row chose "
            f"(logreg.jsonl)")
    classifiers |= frozen_classifiers(features, options, earlier, frozen, recorded)
    rows: list[tuple[str, dict[str, Any]]] = []
    details: list[dict[str, Any]] = []
    if corruptions:
        rows, details = corruption_rows(features, options, classifiers, corruptions, log)
    for shift in shifts:
        rows += shift_rows(shift, classifiers, details, options)
    return rows, details


def corruption_rows(features: FrozenFeatures, options: argparse.Namespace, classifiers: dict[str, Classifier],
                    corruptions: tuple[str, ...], log: Callable[[str], None],
                    ) -> tuple[list[tuple[str, dict[str, Any]]], list[dict[str, Any]]]:
    """The mCA row per classifier and the detail rows of the corrupted validation subset."""
    datamodule = features.datamodule
    total = features.val()[1].shape[0]
    chosen = subset_indices(total, options.robustness_images, options.seed)
    mean, std = datamodule.mean_for(datamodule.in_chans), datamodule.std_for(datamodule.in_chans)
    cache = None if features.cache_dir is None else CorruptionCache(
        features.cache_dir / "corrupted", features.data_identity() | {"val_subset": datamodule.hparams.val_subset})
    top1 = corruption_top1(classifiers, datamodule.val_dataloader(), chosen, corruptions, options.seed, mean, std,
                           datamodule.batch_size, cache, log)
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
    return rows, details


def shift_rows(shift: ShiftSet, classifiers: dict[str, Classifier], details: list[dict[str, Any]],
               options: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    for classifier, scorer in classifiers.items():
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


__all__ = ["DETAIL_COLUMNS", "Classifier", "add_robustness_arguments", "append_details", "corruption_top1",
           "frozen_classifiers", "predict", "run_robustness", "subset_indices", "summarise"]
