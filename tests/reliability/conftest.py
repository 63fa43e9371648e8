"""Shared settings for the reliability tests: the micro MAE on the synthetic source (see tests/test_cli.py)."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))  # micro_methods, shared with the tests above
from micro_methods import micro_cli_model  # noqa: E402

COMMON = [
    "--data.source", "synthetic", "--data.synthetic_size", "128", "--data.batch_size", "16",
    "--data.num_workers", "0", "--data.knn_bank_size", "32", "--data.val_subset", "32",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    "--trainer.log_every_n_steps", "1", "--trainer.logger", "false",
    "--knn.every_n_epochs", "1000", "--reconstruction.every_n_epochs", "1000", "--trainer.limit_val_batches", "0",
]


def micro_args(method: str = "MAE") -> list[str]:
    """CLI arguments of a micro run of `method` on the synthetic source."""
    return ["--config", str(ROOT / "configs/trainer/cpu.yaml"), *micro_cli_model(method), *COMMON]


MICRO = micro_args("MAE")


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "lightning_mim.cli", *args]
