"""`make demo`: pre-train MAE on Fashion-MNIST on the CPU, then compare the k-NN accuracy of the pre-trained encoder
with the same encoder at its random initialisation.

Training runs through the ordinary CLI with the three composed configs it prints, so the run can be repeated or
changed by hand. It stops after a number of steps (a wall-clock cap only guards against a busy machine).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning as L

from lightning_mim.data import MIMDataModule
from lightning_mim.eval.knn import extract_features, knn_accuracy
from lightning_mim.methods import MIMMethod

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEMO_CONFIGS = ("trainer/cpu.yaml", "data/fashion_mnist.yaml", "mae/vit_micro_p4_demo_fmnist.yaml")


def knn_top1(model: MIMMethod, datamodule: MIMDataModule, k: int, temperature: float) -> float:
    model.eval()
    bank, bank_labels = extract_features(model.extract_features, datamodule.knn_bank_dataloader(), model.device)
    test, test_labels = extract_features(model.extract_features, datamodule.val_dataloader(), model.device)
    return knn_accuracy(bank, bank_labels, test, test_labels, datamodule.num_classes, k=k,
                        temperature=temperature)["top1"]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="lightning-mim demo", description=__doc__)
    parser.add_argument("--steps", type=int, default=1000, help="optimiser steps of pre-training (batch 256)")
    parser.add_argument("--max-minutes", type=float, default=7.0, help="wall-clock cap on pre-training")
    parser.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST .gz files")
    parser.add_argument("--bank", type=int, default=10000, help="k-NN bank: training images")
    parser.add_argument("--test", type=int, default=None, help="k-NN test images (default: all 10,000)")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more CLI arguments for `fit`")
    options = parser.parse_args(argv)

    from lightning_mim.cli import run_cli

    fit_args = ["fit"]
    for name in DEMO_CONFIGS:
        fit_args += ["--config", str(CONFIG_DIR / name)]
    fit_args += ["--trainer.max_steps", str(options.steps),
                 "--trainer.max_time", time.strftime("00:%H:%M:%S", time.gmtime(options.max_minutes * 60))]
    if options.data_dir:
        fit_args += ["--data.data_dir", options.data_dir]
    fit_args += options.extra
    print("pre-training: lightning-mim " + " ".join(fit_args), flush=True)
    start = time.perf_counter()
    cli = run_cli(fit_args)
    train_seconds = time.perf_counter() - start
    trained, trainer = cli.model, cli.trainer
    images_seen = trainer.global_step * cli.datamodule.batch_size * trainer.accumulate_grad_batches

    evaluation = MIMDataModule(source="fashion_mnist", data_dir=cli.datamodule.hparams.data_dir, batch_size=500,
                               num_workers=0, knn_bank_size=options.bank, val_subset=options.test)
    evaluation.bind(trained.image_size, trained.in_chans, None)
    evaluation.setup("fit")
    L.seed_everything(cli.config["fit"]["seed_everything"], verbose=False)
    random_init = type(trained)(**{k: v for k, v in trained.hparams.items() if not k.startswith("_")})
    start = time.perf_counter()
    scores = {"random init": knn_top1(random_init, evaluation, options.k, options.temperature),
              "MAE pre-trained": knn_top1(trained, evaluation, options.k, options.temperature)}
    eval_seconds = time.perf_counter() - start

    rows = [("encoder", "k-NN top-1 (%)"), ("---", "---")]
    rows += [(name, f"{value:.2f}") for name, value in scores.items()]
    print()
    print(f"Fashion-MNIST, ViT micro (128 x 4, patch 4), k-NN k={options.k} T={options.temperature} on mean-pooled "
          f"patch tokens; bank {len(evaluation.knn_bank_dataloader().dataset)} train images, "
          f"test {len(evaluation.val_dataloader().dataset)} images")
    for name, value in rows:
        print(f"| {name:<16} | {value:>14} |")
    print(f"\npre-training: {trainer.global_step} steps, {images_seen} images seen, {train_seconds / 60:.1f} min "
          f"({images_seen / train_seconds:.0f} img/s including validation); evaluation {eval_seconds:.0f} s")
    print(f"TensorBoard logs: {trainer.logger.log_dir}  (make tensorboard, or tensorboard --logdir runs)")
    print(f"checkpoint: {trainer.checkpoint_callback.last_model_path}")
    gain = scores["MAE pre-trained"] - scores["random init"]
    print(f"pre-training {'improved' if gain > 0 else 'did NOT improve'} k-NN top-1 by {gain:+.2f} points")
    return scores


if __name__ == "__main__":
    main()
