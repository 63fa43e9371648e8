"""`lightning-mim evaluate`: k-NN, linear probing and fine-tuning of one encoder, results appended to
`<results>/results.csv` and `<results>/results.md`, one row per protocol, keyed by run name and config hash.

    lightning-mim evaluate --ckpt runs/mae_vit_micro_p4_demo_fmnist/version_0/checkpoints/last.ckpt \
        --protocols knn,linear,finetune
    lightning-mim evaluate --ckpt random:configs/mae/vit_micro_p4_demo_fmnist.yaml --protocols knn,linear,finetune

`--ckpt` takes a Lightning checkpoint of this project, an exported `.safetensors` encoder, an official release
(`{"model": ...}` MAE / LUT, `{"state_dict": ...}` MaPeT; give its encoder with `--backbone '{"size": "base"}'`), or
`random:<pre-training recipe.yaml>` (or the config.yaml a run saved): the recipe's model built through the LightningCLI
with the recipe's seed, i.e. the encoder a pre-training run of that recipe starts from, the baseline a pre-trained
encoder must beat; or `pixels`: the flattened normalised images at the data's own size, the raw-pixel reference row
(knn and logreg only).

Protocols on frozen features: `knn` (weighted k-NN on a `--knn-bank` subset of the training split) and `logreg`
(multinomial logistic regression trained to convergence by full-batch L-BFGS on the standardised features of the
training split, or its `--train-subset`; the L2 strength with the best accuracy on a `--logreg-holdout` part of it,
from `--logreg-l2`, is refitted on the whole split; see `lightning_mim.eval.logreg`). Their features are extracted
once per encoder and data and cached in `--feature-cache` (default `<results>/features/`); logreg's chosen L2 and
held-out accuracies go to `<results>/logreg.jsonl`.

Data: `--data-config` (a LightningCLI data YAML, default Fashion-MNIST), then the protocol recipe's `data:` section,
then the `--data-*` / `--batch-size` / `--*-subset` flags. Fashion-MNIST and synthetic data must have the encoder's
image size and channels (`--adapt-images` resizes and converts them instead), except that an encoder pre-trained on
the same source at another size (the SimMIM / SymMIM demos: Fashion-MNIST at 32 px) is evaluated at its size.
Linear / fine-tune recipes (`--linear-config`, `--finetune-config`, YAML with `model:` = LinearProbe / FineTune
keyword arguments, `data:` and `trainer:`) default to the Fashion-MNIST demo recipes; `--epochs` (or `--linear-epochs`,
`--finetune-epochs`) overrides their `trainer.max_epochs`. A recipe's top-level `effective_batch` (the paper's) is kept
on any `--devices` x `--num-nodes` through the per-device batch and gradient accumulation; its
`trainer.check_val_every_n_epoch` (default: the last epoch only) sets how often the val set is scored; each scored
epoch adds a line to `curve.csv` (epoch, val top-1 / top-5 / loss, last train loss and lr) in the protocol's working
folder, whose `tensorboard/` holds the same curves for TensorBoard.

`robustness` (scored last): top-1 under the ImageNet-C corruptions and on `--shift-dir` folders with the classifiers
of the other protocols of the call (`lightning_mim.eval.robustness`).

Results: `top1` / `top5` after the last epoch, `top1_best` the best validated epoch's top-1, `val_images` the number of
images scored (the whole val split unless `--val-subset` or the data config asks for a subset), and for a linear probe
or fine-tuning validated on at least 4 epochs `late_gain`: the points the best top-1 of the last quarter of its
validated epochs adds to the best before them (`eval.curve.late_gain`; a plateau when small).

Resuming: the linear probe and fine-tuning train in a working folder per encoder, protocol, recipe and settings under
`--eval-dir` (default `<results>/eval`), writing `last.ckpt` atomically after every epoch; rerunning the same command
after a kill or a SLURM requeue resumes from it (same data order and lr step), and a finished protocol's
`result.json` is reported without training again.
"""
from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import lightning as L
from lightning.fabric.utilities.rank_zero import rank_zero_only
import torch
import yaml

from lightning_mim.backbone import BackboneConfig
from lightning_mim.data import MIMDataModule
from lightning_mim.eval.batch import trained_batch
from lightning_mim.eval.curve import ValidationCurve, curve_logger, late_gain, read_curve
from lightning_mim.eval.encoders import Encoder, resolve_encoder, row_identity
from lightning_mim.eval.features import (
    PIXELS, FrozenFeatures, encoder_feature_fn, flatten_pixels, pixel_datamodule,
)
from lightning_mim.eval.finetune import FineTune
from lightning_mim.eval.frozen import (
    FROZEN_PROTOCOLS, add_frozen_arguments, append_logreg_details, recorded_l2, run_frozen,
)
from lightning_mim.eval.linear import LinearProbe
from lightning_mim.eval.robustness import add_robustness_arguments, append_details, run_robustness
from lightning_mim.eval.resumable import (
    BestTop1, read_result, resumable_trainer_arguments, resume_path, upgrade_csv, working_folder,
    write_result,
)
from lightning_mim.eval.weights import config_hash

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
# top1 is the final epoch's; top1_best the best validated epoch's (linear / finetune); val_images the images scored
# clean_top1: the robustness rows' top-1 of their images uncorrupted (their top1 is the mean corruption accuracy)
COLUMNS = ("run", "method", "config_hash", "protocol", "top1", "top5", "epochs", "seconds", "timestamp", "top1_best",
           "val_images", "clean_top1", "late_gain")
PROTOCOLS = ("knn", "linear", "finetune", "logreg", "robustness")
def data_arguments(options: argparse.Namespace, recipe_data: dict[str, Any] | None,
                   config: BackboneConfig | None) -> dict[str, Any]:
    """MIMDataModule keyword arguments: data config, then the protocol recipe's `data:`, then the command line."""
    arguments = dict((yaml.safe_load(Path(options.data_config).read_text()) or {}).get("data") or {})
    arguments |= recipe_data or {}
    flags = {"source": options.data_source, "data_dir": options.data_dir, "train_shards": options.train_shards,
             "val_shards": options.val_shards, "batch_size": options.batch_size,
             "train_subset": options.train_subset, "val_subset": options.val_subset,
             "knn_bank_size": options.knn_bank, "synthetic_size": options.synthetic_size,
             "num_workers": options.num_workers}
    arguments |= {key: value for key, value in flags.items() if value is not None}
    if config is not None:
        arguments.setdefault("synthetic_image_size", config.img_size)
    return arguments | {"persistent_workers": False, "seed": options.seed}


def build_datamodule(arguments: dict[str, Any], encoder: Encoder, adapt_images: bool) -> MIMDataModule:
    """The evaluation data at the encoder's image size and channels. A source whose images all have one format
    (Fashion-MNIST, synthetic) must have the encoder's unless `adapt_images` (resize and convert them), or unless
    the encoder was pre-trained on that source at another size (its pre-training resized them the same way)."""
    config = encoder.config
    datamodule = MIMDataModule(**arguments)
    native = datamodule.native_format()
    resized_in_pretraining = (encoder.pretrained_on == datamodule.hparams.source and native is not None
                              and native[1] == config.in_chans)
    if native is not None and native != (config.img_size, config.in_chans) and not (adapt_images
                                                                                     or resized_in_pretraining):
        size, channels = native
        raise ValueError(
            f"the encoder takes {config.img_size}x{config.img_size} images with {config.in_chans} channel(s) but the "
            f"data are {size}x{size} with {channels} channel(s) ({datamodule.hparams.source}): evaluate on the data "
            f"it was pre-trained on (--data-config, --data-source, --data-dir), or pass --adapt-images to resize "
            f"and convert these")
    datamodule.bind(config.img_size, config.in_chans, None)
    datamodule.setup("fit")
    return datamodule


def eval_device(options: argparse.Namespace) -> torch.device:
    wants_gpu = options.accelerator in ("auto", "gpu", "cuda")
    return torch.device("cuda" if wants_gpu and torch.cuda.is_available() else "cpu")


def frozen_features(encoder: Encoder | None, options: argparse.Namespace) -> FrozenFeatures:
    """The cached frozen features of `encoder` (None: the raw pixels) on the evaluation data."""
    device = eval_device(options)
    if encoder is None:
        datamodule, feature_fn = pixel_datamodule(data_arguments(options, None, None)), flatten_pixels
        identity: dict[str, Any] = {"encoder": PIXELS}
    else:
        datamodule = build_datamodule(data_arguments(options, None, encoder.config), encoder, options.adapt_images)
        feature_fn = encoder_feature_fn(encoder.path, encoder.config, options.pool, device)
        identity = {"weights_sha256": encoder.digest(), "backbone": encoder.config.to_dict(),
                    "pool": options.pool}
    cache = Path(options.feature_cache or Path(options.results) / "features")
    return FrozenFeatures(datamodule, feature_fn, identity, None if options.feature_cache == "none" else cache, device)


def run_trained(protocol: str, encoder: Encoder, options: argparse.Namespace,
                callbacks: Sequence[L.Callback] = ()) -> dict[str, Any]:
    """Train a linear probe or a fine-tuned classifier from its recipe in its working folder (see
    `eval.resumable`): resumed from the folder's `last.ckpt` after an interruption, not re-trained once finished.
    Returns the final-epoch metrics (`top1`, `top5`), the best validated epoch's `top1_best` and `best_epoch`,
    `val_images` (images scored) and `epochs`."""
    recipe_path = Path(options.linear_config if protocol == "linear" else options.finetune_config)
    recipe = yaml.safe_load(recipe_path.read_text()) or {}
    trainer_args = dict(recipe.get("trainer") or {})
    recipe_epochs = int(trainer_args.pop("max_epochs", 1))
    protocol_epochs = options.linear_epochs if protocol == "linear" else options.finetune_epochs
    epochs = next(value for value in (protocol_epochs, options.epochs, recipe_epochs) if value is not None)
    validate_every = int(trainer_args.pop("check_val_every_n_epoch", epochs))
    if epochs % validate_every:
        raise ValueError(f"the recipe validates every {validate_every} epochs, which misses the last of {epochs}: "
                         f"choose a number of epochs divisible by {validate_every}")
    per_device, accumulation = trained_batch(recipe, options.devices, options.num_nodes, options.batch_size,
                                             options.accumulate_grad_batches)
    data = data_arguments(options, recipe.get("data"), encoder.config)
    if per_device is not None:
        data["batch_size"] = per_device
    if accumulation is not None:
        trainer_args["accumulate_grad_batches"] = accumulation
    trainer_args |= {"accelerator": options.accelerator, "devices": options.devices, "num_nodes": options.num_nodes,
                     "strategy": options.strategy}
    settings = {"recipe": recipe, "epochs": epochs, "seed": options.seed, **data, **trainer_args}
    root = Path(options.eval_dir) if options.eval_dir is not None else Path(options.results) / "eval"
    folder = working_folder(root, encoder.run, encoder.digest(), protocol, recipe_path, settings)
    finished = read_result(folder)
    if finished is not None:
        print(f"{protocol}: finished earlier, reporting {folder / 'result.json'} (delete that folder to train "
              f"again)", flush=True)
        return finished | {"folder": folder, "late_gain": late_gain(read_curve(folder))}
    datamodule = build_datamodule(data, encoder, options.adapt_images)
    module_class = LinearProbe if protocol == "linear" else FineTune
    L.seed_everything(options.seed, verbose=False)
    model = module_class(backbone=encoder.config, num_classes=datamodule.num_classes, pretrained=str(encoder.path),
                         **(recipe.get("model") or {}))
    resumable = resumable_trainer_arguments(folder)
    best = BestTop1()
    resumable["callbacks"] += [best, ValidationCurve(folder), *callbacks]
    trainer = L.Trainer(max_epochs=epochs, logger=curve_logger(folder), enable_model_summary=False,
                        enable_progress_bar=options.progress, num_sanity_val_steps=0,
                        check_val_every_n_epoch=validate_every, **(trainer_args | resumable))
    ckpt_path = resume_path(folder)
    if ckpt_path is not None:
        print(f"{protocol}: resuming from {ckpt_path}", flush=True)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    if "val/top1" not in trainer.callback_metrics:  # killed after the last epoch's checkpoint: nothing left to train
        trainer.validate(model, datamodule=datamodule, verbose=False)
    metrics = {name: float(trainer.callback_metrics[f"val/{name}"]) * 100.0 for name in ("top1", "top5")}
    result = metrics | {"top1_best": best.best * 100.0, "best_epoch": best.best_epoch, "epochs": epochs,
                        "val_images": int(trainer.callback_metrics["val/images"])}
    if trainer.is_global_zero:
        write_result(folder, result)
    return result | {"folder": folder, "late_gain": late_gain(read_curve(folder))}


def append_results(results_dir: Path, rows: list[dict[str, Any]]) -> None:
    """Append rows to results.csv and results.md (headers written when the files are new). A results.csv written
    with fewer columns (before `top1_best`, `val_images`) is first rewritten with today's, its rows kept (the new
    cells empty); an older results.md gets today's header before the new rows."""
    results_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = results_dir / "results.csv", results_dir / "results.md"
    upgrade_csv(csv_path, COLUMNS)
    new_csv, new_md = not csv_path.exists(), not md_path.exists()
    header = "| " + " | ".join(COLUMNS) + " |"
    if not new_md and header not in md_path.read_text().splitlines():
        with md_path.open("a") as handle:
            handle.write("\n" + header + "\n|" + "---|" * len(COLUMNS) + "\n")
    with csv_path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        if new_csv:
            writer.writeheader()
        writer.writerows(rows)
    with md_path.open("a") as handle:
        if new_md:
            handle.write(header + "\n|" + "---|" * len(COLUMNS) + "\n")
        for row in rows:
            handle.write("| " + " | ".join(str(row[column]) for column in COLUMNS) + " |\n")


def main(argv: list[str] | None = None, callbacks: Sequence[L.Callback] = ()) -> list[dict[str, Any]]:
    """`lightning-mim evaluate`; `callbacks` are added to the linear probe's and fine-tuning's trainers."""
    parser = argparse.ArgumentParser(prog="lightning-mim evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True,
                        help="Lightning checkpoint, exported .safetensors, official release, random:<recipe.yaml>, "
                             "or pixels (the raw-pixel reference: knn and logreg only)")
    parser.add_argument("--protocols", default="knn,linear,finetune",
                        help="comma-separated: knn, linear, finetune, logreg, robustness (scored last, with the "
                             "classifiers of the others: see lightning_mim.eval.robustness)")
    parser.add_argument("--backbone", type=json.loads, default=None,
                        help='BackboneConfig of a checkpoint that does not store one, as JSON: \'{"size": "base"}\'')
    parser.add_argument("--data-config", default=str(CONFIG_DIR / "data" / "fashion_mnist.yaml"),
                        help="LightningCLI data YAML (its `data:` section)")
    parser.add_argument("--data-source", default=None, choices=("fashion_mnist", "imagefolder", "webdataset",
                                                                 "synthetic"))
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--train-shards", default=None, help="WebDataset training shards (brace pattern)")
    parser.add_argument("--val-shards", default=None, help="WebDataset validation shards (brace pattern)")
    parser.add_argument("--linear-config", default=str(CONFIG_DIR / "eval" / "linear_demo_fmnist.yaml"))
    parser.add_argument("--finetune-config", default=str(CONFIG_DIR / "eval" / "finetune_demo_fmnist.yaml"))
    parser.add_argument("--epochs", type=int, default=None, help="epochs of both linear probe and fine-tuning")
    parser.add_argument("--linear-epochs", type=int, default=None, help="default: --epochs, else the recipe's")
    parser.add_argument("--finetune-epochs", type=int, default=None, help="default: --epochs, else the recipe's")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="per-device batch (default: the recipe's data.batch_size); with a recipe's "
                             "effective_batch, the most per device")
    parser.add_argument("--accumulate-grad-batches", type=int, default=None,
                        help="linear probe / fine-tuning gradient accumulation (default: derived from the recipe's "
                             "effective_batch, else the recipe's trainer setting)")
    parser.add_argument("--train-subset", type=int, default=None,
                        help="train (linear, finetune, logreg) on a seeded subset of N images")
    parser.add_argument("--val-subset", type=int, default=None, help="evaluate on a seeded subset of N images")
    parser.add_argument("--knn-bank", type=int, default=None, help="k-NN bank size (training images)")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--pool", default="avg", choices=("avg", "cls"), help="k-NN and logreg feature pooling")
    parser.add_argument("--adapt-images", action="store_true",
                        help="resize / convert Fashion-MNIST or synthetic images to the encoder's size and channels "
                             "when they differ (default: refuse)")
    parser.add_argument("--synthetic-size", type=int, default=None)
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--devices", default="1", help="linear probe / fine-tuning: devices per node (e.g. 8, or -1)")
    parser.add_argument("--num-nodes", type=int, default=1, help="linear probe / fine-tuning: nodes (DDP)")
    parser.add_argument("--strategy", default="auto", help="linear probe / fine-tuning: Lightning strategy, e.g. ddp")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action="store_true", help="show Lightning progress bars")
    parser.add_argument("--results", default="results", help="folder of results.csv and results.md")
    parser.add_argument("--eval-dir", default=None,
                        help="working folders of the linear probe / fine-tuning (last.ckpt each epoch, result.json; "
                             "default <results>/eval): a rerun resumes or reuses them")
    add_frozen_arguments(parser)
    add_robustness_arguments(parser)
    options = parser.parse_args(argv)
    protocols = [name.strip() for name in options.protocols.split(",") if name.strip()]
    unknown = sorted(set(protocols) - set(PROTOCOLS))
    if unknown or not protocols:
        parser.error(f"unknown protocols {unknown}: choose from {', '.join(PROTOCOLS)}")
    protocols.sort(key=lambda name: name == "robustness")  # it scores the classifiers the others build
    trained = [name for name in protocols if name not in (*FROZEN_PROTOCOLS, "robustness")]
    if options.ckpt == PIXELS and trained:
        parser.error(f"--ckpt pixels has no encoder to train with {', '.join(trained)}: use --protocols knn,logreg")

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as workdir:
        backbone = BackboneConfig(**options.backbone) if options.backbone is not None else None
        encoder = None if options.ckpt == PIXELS else resolve_encoder(options.ckpt, Path(workdir), backbone)
        frozen: FrozenFeatures | None = None
        earlier: dict[str, dict[str, Any]] = {}
        for protocol in protocols:
            start = time.perf_counter()
            if protocol == "robustness":
                frozen = frozen or frozen_features(encoder, options)
                results, details = run_robustness(
                    frozen, options, earlier, lambda line: print(line, flush=True),
                    recorded_l2(Path(options.results), row_identity(encoder), tuple(options.logreg_l2)))
                if rank_zero_only.rank == 0:
                    append_details(Path(options.results), row_identity(encoder) | {
                        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds")}, details)
            elif protocol in FROZEN_PROTOCOLS:
                frozen = frozen or frozen_features(encoder, options)
                results = [(protocol, run_frozen(protocol, frozen, options) | {
                    "val_images": frozen.val()[1].shape[0], "epochs": 0})]
            else:
                results = [(protocol, run_trained(protocol, encoder, options, callbacks))]
            for name, metrics in results:
                earlier[name] = metrics
                row = result_row(encoder, name, metrics, time.perf_counter() - start)
                if rank_zero_only.rank == 0:  # every DDP rank runs this loop; one writes
                    append_results(Path(options.results), [row])
                    if name == "logreg":
                        append_logreg_details(Path(options.results), row, metrics)
                rows.append(row)
                print(" | ".join(f"{key}={value}" for key, value in row.items()), flush=True)
    return rows


def result_row(encoder: Encoder | None, protocol: str, metrics: dict[str, Any], seconds: float) -> dict[str, Any]:
    """One results.csv row; percentages with two decimals, absent metrics empty."""
    def percent(name: str) -> str:
        return f"{metrics[name]:.2f}" if name in metrics else ""

    return {**row_identity(encoder), "protocol": protocol, "top1": percent("top1"), "top5": percent("top5"),
            "epochs": metrics["epochs"], "seconds": f"{seconds:.1f}",
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"), "top1_best": percent("top1_best"),
            "val_images": metrics["val_images"], "clean_top1": percent("clean_top1"),
            "late_gain": "" if metrics.get("late_gain") is None else f"{metrics['late_gain']:.2f}"}


__all__ = ["COLUMNS", "PROTOCOLS", "append_results", "build_datamodule", "config_hash", "data_arguments", "main"]
