"""Shared settings for the reliability tests: the micro MAE on the synthetic source (see tests/test_cli.py)."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MICRO = [
    "--config", str(ROOT / "configs/trainer/cpu.yaml"),
    "--model", "MAE",
    "--model.backbone.size", "micro", "--model.backbone.img_size", "32", "--model.backbone.patch_size", "4",
    "--model.decoder_dim", "32", "--model.decoder_depth", "1", "--model.decoder_heads", "2",
    "--model.optim.lr", "2e-3", "--model.optim.warmup_steps", "2",
    "--data.source", "synthetic", "--data.synthetic_size", "128", "--data.batch_size", "16",
    "--data.num_workers", "0", "--data.knn_bank_size", "32", "--data.val_subset", "32",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    "--trainer.log_every_n_steps", "1", "--trainer.logger", "false",
    "--knn.every_n_epochs", "1000", "--reconstruction.every_n_epochs", "1000", "--trainer.limit_val_batches", "0",
]


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "lightning_mim.cli", *args]
