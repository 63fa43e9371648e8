"""`lightning-mim`: the LightningCLI (`fit`, `validate`, `test`, `predict`) plus the suite's own subcommands.

    lightning-mim fit --config configs/trainer/cpu.yaml --config configs/data/fashion_mnist.yaml \
        --config configs/mae/vit_micro_p4_demo_fmnist.yaml
    lightning-mim fit --print_config --model MAE
    lightning-mim make-shards /data/imagenet/train /data/in1k-wds/train-%06d.tar
    lightning-mim demo
"""
from __future__ import annotations

import importlib
import sys
import warnings

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_mim.callbacks import KNNMonitor, ReconstructionImages, Throughput
from lightning_mim.data import MIMDataModule
from lightning_mim.methods import MIMMethod


class MIMCLI(LightningCLI):
    """Method chosen with `--model <Name>` (or `class_path` in YAML); one DataModule; the monitoring callbacks and
    checkpointing are top-level groups (`--knn.*`, `--throughput.*`, `--reconstruction.*`, `--checkpoint.*`)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.filename": "{epoch}-{step}"})
        parser.add_lightning_class_args(KNNMonitor, "knn")
        parser.add_lightning_class_args(Throughput, "throughput")
        parser.add_lightning_class_args(ReconstructionImages, "reconstruction")


EXTRA_COMMANDS = {
    "make-shards": ("lightning_mim.data.shards", "write an ImageFolder split as WebDataset tar shards"),
    "demo": ("lightning_mim.demo", "pre-train MAE on Fashion-MNIST on the CPU and compare k-NN with random init"),
    "export": ("lightning_mim.eval.weights", "write a checkpoint's encoder as a timm-compatible safetensors file"),
    "evaluate": ("lightning_mim.eval.evaluate", "run k-NN / linear probe / fine-tuning on a checkpoint"),
}


def run_cli(args: list[str] | None = None, run: bool = True) -> MIMCLI:
    # called with explicit args from `demo` and tests while sys.argv holds other words: that is intended here
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    return MIMCLI(
        MIMMethod, MIMDataModule, subclass_mode_model=True,
        save_config_kwargs={"overwrite": True},
        args=args, run=run,
    )


def main(argv: list[str] | None = None) -> None:
    words = sys.argv[1:] if argv is None else argv
    if words and words[0] in EXTRA_COMMANDS:
        module = importlib.import_module(EXTRA_COMMANDS[words[0]][0])
        module.main(words[1:])
        return
    if words and words[0] in ("-h", "--help"):
        print("extra subcommands: " + "; ".join(f"{name}: {text}" for name, (_, text) in EXTRA_COMMANDS.items()))
    run_cli(argv)


if __name__ == "__main__":
    main()
