"""`lightning-mim analyze`: representation analyses of one or more encoders on a fixed, seeded set of validation
images, without training: the singular-value spectrum of the patch tokens and of the pooled feature (normalised log
singular values, effective rank, values above a threshold) and, per layer and head, the mean attention distance
(pixels) and the attention entropy (`lightning_mim.eval.representation`).

    lightning-mim analyze --ckpt runs/mae_vit_micro_p4_demo_fmnist/version_0/checkpoints/last.ckpt \
        --ckpt random:configs/mae/vit_micro_p4_demo_fmnist.yaml --out analysis

`--ckpt` takes what `evaluate --ckpt` takes. Writes into `--out`: `analysis.csv` (one line per encoder, quantity,
layer and head), `spectrum.csv` (every singular value), one PNG per quantity with a line per encoder, and
`tensorboard/<encoder>/` where the same quantities are scalars under `analysis/*` (the spectra and the per-layer
curves with the index or layer as the step), so that the encoders overlay in TensorBoard, plus the PNGs as images.
"""
from __future__ import annotations

import argparse
import csv
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lightning_mim.backbone import MIMViT
from lightning_mim.eval.encoders import Encoder, resolve_encoder
from lightning_mim.eval.evaluate import CONFIG_DIR, build_datamodule, data_arguments, eval_device
from lightning_mim.eval.representation import (
    Spectrum, attention_distance, attention_entropy, capture_attention, feature_spectrum,
)
from lightning_mim.eval.weights import load_encoder_state, load_into

@dataclass
class Analysis:
    """One encoder's results: spectra by feature kind ("patch", "pooled") and per-layer, per-head attention."""

    run: str
    spectra: dict[str, Spectrum]
    distance: list[torch.Tensor] = field(default_factory=list)  # per layer, (heads,) pixels
    entropy: list[torch.Tensor] = field(default_factory=list)  # per layer, (heads,) nats

    def rows(self) -> list[dict[str, Any]]:
        rows = []
        for kind, spectrum in self.spectra.items():
            for quantity, value in (("effective_rank", spectrum.effective_rank),
                                    ("spectrum_entropy", spectrum.entropy),
                                    ("above_threshold", spectrum.above_threshold)):
                rows.append({"run": self.run, "quantity": f"{quantity}_{kind}", "layer": "", "head": "",
                             "value": f"{value:.6g}"})
        for quantity, per_layer in (("attention_distance_px", self.distance), ("attention_entropy", self.entropy)):
            for layer, heads in enumerate(per_layer):
                for head, value in enumerate(heads.tolist()):
                    rows.append({"run": self.run, "quantity": quantity, "layer": layer, "head": head,
                                 "value": f"{value:.6g}"})
                rows.append({"run": self.run, "quantity": quantity, "layer": layer, "head": "mean",
                             "value": f"{float(heads.mean()):.6g}"})
        return rows


def analyse(encoder: Encoder, loader: Any, device: torch.device, pool: str, threshold: float) -> Analysis:
    """Encode every batch of `loader` once, keeping the patch tokens, the pooled features and the attention maps'
    per-head distance and entropy (averaged over images)."""
    model = MIMViT(encoder.config)
    state, report = load_encoder_state(encoder.path, encoder.config)
    load_into(model, state, report)
    model.to(device).eval()
    prefix, grid, patch = model.num_prefix_tokens, model.grid_size, model.patch_size
    patch_tokens, pooled, distance_sums, entropy_sums, images_seen = [], [], None, None, 0
    with torch.no_grad(), capture_attention(model) as maps:
        for images, _ in loader:
            maps.clear()
            tokens = model.forward_full(images.to(device))
            patches = tokens[:, prefix:].float()
            patch_tokens.append(patches.reshape(-1, patches.shape[-1]).cpu())
            pooled.append((tokens[:, 0] if pool == "cls" else patches.mean(dim=1)).float().cpu())
            weight = images.shape[0]
            distances = [attention_distance(m, grid, patch, prefix) * weight for m in maps]
            entropies = [attention_entropy(m, prefix) * weight for m in maps]
            distance_sums = distances if distance_sums is None else [a + b for a, b in zip(distance_sums, distances)]
            entropy_sums = entropies if entropy_sums is None else [a + b for a, b in zip(entropy_sums, entropies)]
            images_seen += weight
    if not images_seen:
        raise ValueError("analyze: the validation data gave no images: check --data-* and --images")
    spectra = {"patch": feature_spectrum(torch.cat(patch_tokens), threshold),
               "pooled": feature_spectrum(torch.cat(pooled), threshold)}
    return Analysis(encoder.run, spectra, [d.cpu() / images_seen for d in distance_sums],
                    [e.cpu() / images_seen for e in entropy_sums])


def label_runs(encoders: list[Encoder]) -> list[str]:
    """A distinct label per encoder: its run name, with the method where two share a name (two recipes' random
    initialisations), and a counter where that is not enough."""
    names = [encoder.run for encoder in encoders]
    names = [f"{name} ({encoder.method})" if names.count(name) > 1 else name for name, encoder in zip(names, encoders)]
    return [f"{name} #{index}" if names.count(name) > 1 else name for index, name in enumerate(names)]


def write_tables(analyses: list[Analysis], out: Path) -> None:
    with (out / "analysis.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["run", "quantity", "layer", "head", "value"])
        writer.writeheader()
        for analysis in analyses:
            writer.writerows(analysis.rows())
    with (out / "spectrum.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["run", "features", "index", "singular_value", "normalised_log"])
        for analysis in analyses:
            for kind, spectrum in analysis.spectra.items():
                for index, (value, log) in enumerate(zip(spectrum.singular_values.tolist(),
                                                         spectrum.normalised_log.tolist())):
                    writer.writerow([analysis.run, kind, index, f"{value:.6g}", f"{log:.6g}"])


def read_analysis(folder: Path, run: str, threshold: float = 1e-2) -> Analysis:
    """The analysis of the first encoder `write_tables` wrote into `folder`, labelled `run` (`threshold`: the one it
    was computed with, for `Spectrum.above_threshold`)."""
    with (folder / "analysis.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    with (folder / "spectrum.csv").open() as handle:
        values = list(csv.DictReader(handle))
    first = rows[0]["run"]
    spectra = {kind: Spectrum(torch.tensor([float(row["singular_value"]) for row in values
                                            if row["run"] == first and row["features"] == kind]), threshold)
               for kind in ("patch", "pooled")}
    per_layer: dict[str, dict[int, list[float]]] = {"attention_distance_px": {}, "attention_entropy": {}}
    for row in rows:
        if row["run"] == first and row["quantity"] in per_layer and row["head"] != "mean":
            per_layer[row["quantity"]].setdefault(int(row["layer"]), []).append(float(row["value"]))
    distance, entropy = ([torch.tensor(heads) for _, heads in sorted(per_layer[quantity].items())]
                         for quantity in per_layer)
    return Analysis(run, spectra, distance, entropy)


def figures(analyses: list[Analysis], title: str) -> dict[str, Any]:
    """One matplotlib figure per quantity, a line per encoder (heads as dots on the attention figures)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    made = {}
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for axis, kind in zip(axes, ("patch", "pooled")):
        for analysis in analyses:
            spectrum = analysis.spectra[kind]
            axis.plot(spectrum.normalised_log.numpy(),
                      label=f"{analysis.run} (effective rank {spectrum.effective_rank:.1f})")
        axis.set(title=f"{kind} features", xlabel="singular value index", ylabel="log(s_i / s_1)")
        axis.legend(fontsize=7)
    figure.suptitle(f"Singular-value spectrum: {title}")
    made["spectrum"] = figure
    for name, label, attribute in (("attention_distance", "mean attention distance (px)", "distance"),
                                   ("attention_entropy", "attention entropy (nats)", "entropy")):
        figure, axis = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
        for index, analysis in enumerate(analyses):
            per_layer = getattr(analysis, attribute)
            colour = f"C{index % 10}"
            for layer, heads in enumerate(per_layer):
                axis.scatter([layer] * len(heads), heads.numpy(), s=10, color=colour, alpha=0.4)
            axis.plot([float(heads.mean()) for heads in per_layer], color=colour, marker="o",
                      label=f"{analysis.run} (mean over heads; dots: heads)")
        axis.set(title=f"{label.capitalize()} per layer: {title}", xlabel="layer", ylabel=label)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.legend(fontsize=7)
        made[name] = figure
    return made


def write_tensorboard(analyses: list[Analysis], made: dict[str, Any], out: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    for analysis in analyses:
        with SummaryWriter(str(out / "tensorboard" / re.sub(r"[^\w.-]+", "_", analysis.run))) as writer:
            for kind, spectrum in analysis.spectra.items():
                writer.add_scalar(f"analysis/effective_rank_{kind}", spectrum.effective_rank, 0)
                writer.add_scalar(f"analysis/above_threshold_{kind}", spectrum.above_threshold, 0)
                for index, value in enumerate(spectrum.normalised_log.tolist()):
                    writer.add_scalar(f"analysis/spectrum_{kind}_log_sv", value, index)
            for layer, (distance, entropy) in enumerate(zip(analysis.distance, analysis.entropy)):
                writer.add_scalar("analysis/attention_distance_px", float(distance.mean()), layer)
                writer.add_scalar("analysis/attention_entropy", float(entropy.mean()), layer)
            for name, figure in made.items():
                writer.add_figure(f"analysis/{name}", figure, 0, close=False)


def main(argv: list[str] | None = None) -> list[Analysis]:
    parser = argparse.ArgumentParser(prog="lightning-mim analyze", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", action="append", required=True, help="an encoder (repeat for several)")
    parser.add_argument("--out", required=True, help="folder for the CSVs, PNGs and TensorBoard runs")
    parser.add_argument("--images", type=int, default=512, help="validation images analysed (a seeded subset)")
    parser.add_argument("--threshold", type=float, default=1e-2, help="count singular values above this x s_1")
    parser.add_argument("--pool", default="avg", choices=("avg", "cls"), help="the pooled feature")
    parser.add_argument("--data-config", default=str(CONFIG_DIR / "data" / "fashion_mnist.yaml"))
    parser.add_argument("--data-source", default=None, choices=("fashion_mnist", "imagefolder", "webdataset",
                                                                 "synthetic"))
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--val-shards", default=None, help="WebDataset validation shards (brace pattern)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--synthetic-size", type=int, default=None)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--adapt-images", action="store_true", help="resize / convert images to the encoder's format")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--seed", type=int, default=0, help="seed of the image subset")
    options = parser.parse_args(argv)
    # the data flags `evaluate` has and this command does not take
    data_options = argparse.Namespace(**vars(options), train_shards=None, train_subset=None,
                                      val_subset=options.images, knn_bank=None)
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    device = eval_device(options)
    analyses = []
    with tempfile.TemporaryDirectory() as workdir:
        encoders = [resolve_encoder(spec, Path(workdir) / str(index)) for index, spec in enumerate(options.ckpt)]
        for encoder, label in zip(encoders, label_runs(encoders)):
            datamodule = build_datamodule(data_arguments(data_options, None, encoder.config), encoder,
                                          options.adapt_images)
            analyses.append(analyse(encoder, datamodule.val_dataloader(), device, options.pool, options.threshold))
            analyses[-1].run = label
            print(f"{label}: effective rank {analyses[-1].spectra['patch'].effective_rank:.2f} (patch), "
                  f"{analyses[-1].spectra['pooled'].effective_rank:.2f} (pooled); mean attention distance "
                  f"{float(torch.stack(analyses[-1].distance).mean()):.2f} px", flush=True)
    write_tables(analyses, out)
    made = figures(analyses, f"{options.images} validation images")
    for name, figure in made.items():
        figure.savefig(out / f"{name}.png", dpi=120)
    write_tensorboard(analyses, made, out)
    return analyses


__all__ = ["Analysis", "analyse", "figures", "main", "read_analysis"]
