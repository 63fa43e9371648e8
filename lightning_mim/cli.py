"""`lightning-mim`: the LightningCLI (`fit`, `validate`, `test`, `predict`) plus the suite's own subcommands.

    lightning-mim fit --config configs/trainer/cpu.yaml --config configs/data/fashion_mnist.yaml \
        --config configs/mae/vit_micro_p4_demo_fmnist.yaml
    lightning-mim fit --print_config --model MAE
    lightning-mim make-shards /data/imagenet/train /data/in1k-wds/train-%06d.tar
    lightning-mim tokenizer fit codebook.safetensors --features pixels --patch-size 4 --input-size 32
    lightning-mim demo
    lightning-mim reproduce lut --preset smoke
    lightning-mim compare --dry-run
"""
from __future__ import annotations

import importlib
import os
import pickle
import shutil
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import jsonargparse
import yaml
from jsonargparse import Namespace, lazy_instance
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerStatus
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_mim.callbacks import (
    CompileLosses, KNNMonitor, MIMCheckpoint, ReconstructionImages, RequeueAtStepBoundary, TextProgress, Throughput,
)
from lightning_mim.data import MIMDataModule
from lightning_mim.methods import MIMMethod
from lightning_mim.reliability import (
    AtomicCheckpointIO, ResumeLoaderPosition, RNGState, UnsafeCheckpointError, fit_to_launcher, launcher_layout,
)
from lightning_mim.targets.base import MissingExtraError


PLACEHOLDER_LOGGER_NAME = "lightning_logs"  # the default name of Lightning's TensorBoard and CSV loggers


def run_name(config: Namespace) -> str:
    """`<method>_<recipe>`: the method's name in lower case and the stem of the last `--config` file that sets the
    model (configs/lut/vit_b16_1600ep_in1k.yaml: lut_vit_b16_1600ep_in1k; mae_flowers.yaml: mae_flowers); the
    method's name alone when no file sets the model."""
    method = config.model.class_path.rpartition(".")[2].lower()
    # os.fspath: jsonargparse 4 gives the files as its Path objects, 5 as strings (its `get_content` is deprecated)
    recipes = [Path(os.fspath(path)).stem for path in config.get("config") or []
               if "model" in (yaml.safe_load(Path(os.fspath(path)).read_text()) or {})]
    if not recipes:
        return method
    return recipes[-1] if recipes[-1].startswith(f"{method}_") else f"{method}_{recipes[-1]}"


class MIMCLI(LightningCLI):
    """Method chosen with `--model <Name>` (or `class_path` in YAML); one DataModule; the monitoring callbacks and
    checkpointing are top-level groups (`--knn.*`, `--throughput.*`, `--reconstruction.*`, `--checkpoint.*`,
    `--compile.*`, `--progress.*`). Where stdout is not a terminal the progress bar is off unless
    `--trainer.enable_progress_bar` is typed, and `TextProgress` prints a line every `--progress.every_n_steps`."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(MIMCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.filename": "{epoch}-{step}"})
        parser.add_lightning_class_args(KNNMonitor, "knn")
        parser.add_lightning_class_args(Throughput, "throughput")
        parser.add_lightning_class_args(ReconstructionImages, "reconstruction")
        parser.add_lightning_class_args(CompileLosses, "compile")
        parser.add_lightning_class_args(TextProgress, "progress")
        # no hp_metric: with it Lightning writes an HParams experiment summary into the run, and one such summary in
        # a folder hides every other run's hyper-parameters in TensorBoard's HParams tab (see reproduce/hparams.py)
        parser.set_defaults({"trainer.logger": lazy_instance(TensorBoardLogger, save_dir="runs",
                                                             default_hp_metric=False)})

    def before_instantiate_classes(self) -> None:
        """Settings that depend on the recipe and on how the processes were launched: logger names, the trainer's
        devices and nodes, SLURM's per-job folder."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        self._name_loggers(config)
        self._follow_launcher(config.trainer)
        self._give_slurm_job_its_folder(config.trainer)
        if not sys.stdout.isatty() and "enable_progress_bar" not in self.typed_trainer_keys:
            config.trainer.enable_progress_bar = False

    @staticmethod
    def _name_loggers(config: Namespace) -> None:
        """A logger left with Lightning's placeholder name is named after the run's recipe (`run_name`), so logs go
        to `runs/<recipe>/version_N`."""
        loggers = config.trainer.logger if isinstance(config.trainer.logger, list) else [config.trainer.logger]
        for logger in loggers:
            init_args = logger.get("init_args") if isinstance(logger, Namespace) else None
            if init_args is not None and init_args.get("name") == PLACEHOLDER_LOGGER_NAME:
                init_args.name = run_name(config)

    def _run_subcommand(self, subcommand: str) -> None:
        """A run that stops with an error before its first optimiser step leaves no log folder behind: the logger
        creates `version_N` before the data and the model are set up."""
        new_log_dirs = [Path(logger.log_dir) for logger in self.trainer.loggers
                        if isinstance(getattr(logger, "log_dir", None), str) and not Path(logger.log_dir).exists()]
        try:
            super()._run_subcommand(subcommand)
        except Exception:
            if self.trainer.global_step == 0 and self.trainer.is_global_zero:
                for log_dir in new_log_dirs:
                    shutil.rmtree(log_dir, ignore_errors=True)
            raise

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        """Checkpoints are written atomically and loaded weights-only unless `--trainer.plugins` names another
        CheckpointIO; RNG states travel in every checkpoint; a resume continues the loader's position (see
        `ResumeLoaderPosition`). Under SLURM the time-limit signal requeues the job at a
        step boundary (`RequeueAtStepBoundary`) instead of Lightning's mid-step handler."""
        plugins = config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            plugins.append(AtomicCheckpointIO())
        if SLURMEnvironment.detect() and not any(isinstance(plugin, ClusterEnvironment) for plugin in plugins):
            plugins.append(SLURMEnvironment(auto_requeue=False))
        config["plugins"] = plugins
        return super()._instantiate_trainer(config, [*callbacks, RNGState(), ResumeLoaderPosition(),
                                                    RequeueAtStepBoundary()])

    def _parse_ckpt_path(self) -> None:
        """`fit` keeps this command line's configuration and checks it against the checkpoint's when resuming
        (`MIMMethod.on_load_checkpoint`) instead of silently taking the checkpoint's hyper-parameters, as
        LightningCLI would; validate / test / predict read them from the checkpoint as usual."""
        if self.config.get("subcommand") != "fit":
            super()._parse_ckpt_path()

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Also notes which of trainer.devices / trainer.num_nodes / trainer.enable_progress_bar the command line
        itself sets (see `_follow_launcher`, `before_instantiate_classes`)."""
        words = sys.argv[1:] if args is None else args
        words = words if isinstance(words, (list, tuple)) else []
        self.typed_trainer_keys = frozenset(key for key in ("devices", "num_nodes", "enable_progress_bar") if any(
            word == f"--trainer.{key}" or str(word).startswith(f"--trainer.{key}=") for word in words))
        super().parse_arguments(parser, args)

    def _follow_launcher(self, trainer: Namespace) -> None:
        """Under torchrun or SLURM, trainer.devices and trainer.num_nodes are the launcher's; a value typed on the
        command line that disagrees stops the run (see `reliability.fit_to_launcher`)."""
        layout = launcher_layout()
        if layout is None:
            return
        devices, num_nodes = fit_to_launcher(trainer.devices, trainer.num_nodes, layout, self.typed_trainer_keys)
        if (devices, num_nodes) != (trainer.devices, trainer.num_nodes):
            rank_zero_info(f"trainer.devices {trainer.devices} -> {devices}, trainer.num_nodes {trainer.num_nodes} -> "
                           f"{num_nodes} to match the processes {layout.launcher} started ({layout.origin})")
        trainer.devices, trainer.num_nodes = devices, num_nodes

    @staticmethod
    def _give_slurm_job_its_folder(trainer: Namespace) -> None:
        """Under SLURM, default_root_dir becomes `<default_root_dir>/slurm-<job id>`: Lightning writes the requeue
        checkpoint (`hpc_ckpt_<n>.ckpt`) there and resumes from it when the job is requeued (it keeps its id), so
        another job started from the same folder never resumes this one's state. TensorBoard and CSV loggers
        without a version log to `version_<job id>`, as Lightning's default logger does under SLURM, so the
        requeued job continues the same run's logs."""
        job_id = SLURMEnvironment.job_id() if SLURMEnvironment.detect() else None
        if job_id is None:
            return
        trainer.default_root_dir = str(Path(trainer.default_root_dir or os.getcwd()) / f"slurm-{job_id}")
        for logger in trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]:
            if not isinstance(logger, Namespace) or logger.init_args.get("version") is not None:
                continue
            module, _, name = logger.class_path.rpartition(".")
            if issubclass(getattr(importlib.import_module(module), name), (TensorBoardLogger, CSVLogger)):
                logger.init_args.version = job_id

    def before_fit(self) -> None:
        """Resume automatically when `--checkpoint.dirpath` already holds `last.ckpt` and no ckpt_path is given
        (a requeued SLURM job with an `hpc_ckpt_*.ckpt` in its job folder resumes from that, as Lightning does)."""
        config = self.config_init[self.subcommand]
        dirpath = config["checkpoint"].dirpath
        requeued = SLURMEnvironment.detect() and any(Path(self.trainer.default_root_dir).glob("hpc_ckpt_*.ckpt"))
        if (config.get("ckpt_path") is None and not requeued and dirpath is not None
                and (Path(dirpath) / "last.ckpt").is_file()):
            config["ckpt_path"] = str(Path(dirpath) / "last.ckpt")
            print(f"resuming from {config['ckpt_path']} (found in --checkpoint.dirpath)", flush=True)

    def after_fit(self) -> None:
        """A SLURM run that reached its end (`RequeueAtStepBoundary` has removed its requeue checkpoints) removes its
        job folder if that is left empty: only an interrupted run is resumed from it."""
        if not (SLURMEnvironment.detect() and self.trainer.is_global_zero
                and self.trainer.state.status == TrainerStatus.FINISHED):
            return
        job_folder = Path(self.trainer.default_root_dir)
        if job_folder.is_dir() and not any(job_folder.iterdir()):
            job_folder.rmdir()


# subcommand -> ("module" or "module:function" taking the remaining words, default function `main`; help text)
EXTRA_COMMANDS = {
    "make-shards": ("lightning_mim.data.shards", "write an ImageFolder split as WebDataset tar shards"),
    "demo": ("lightning_mim.demo", "pre-train MAE on Fashion-MNIST on the CPU and compare k-NN with random init"),
    "tokenizer": ("lightning_mim.targets.commands", "fit a k-means codebook; precompute token ids into shards"),
    "export": ("lightning_mim.eval.weights", "write a checkpoint's encoder as a timm-compatible safetensors file"),
    "evaluate": ("lightning_mim.eval.evaluate", "run k-NN / linear probe / fine-tuning on a checkpoint"),
    "analyze": ("lightning_mim.eval.analyze", "feature spectrum and attention distance / entropy of encoders"),
    "reproduce": ("lightning_mim.reproduce.driver", "a paper's table rows (pre-train, evaluate) and its results table"),
    "compare": ("lightning_mim.reproduce.driver:main_compare", "every method under one budget: table and plot"),
}


def run_cli(args: list[str] | None = None, run: bool = True) -> MIMCLI:
    # called with explicit args from `demo` and tests while sys.argv holds other words: that is intended here
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    return MIMCLI(
        MIMMethod, MIMDataModule, subclass_mode_model=True,
        save_config_kwargs={"overwrite": True},
        args=args, run=run,
    )


# Errors of bad input: configuration checks, missing files, refused checkpoints, a missing optional extra.
CONFIGURATION_ERRORS = (ValueError, FileNotFoundError, UnsafeCheckpointError, pickle.UnpicklingError,
                        MissingExtraError)
DEBUG_VARIABLE = "LIGHTNING_MIM_DEBUG"


def configuration_error_message(error: BaseException) -> str:
    """The message of the check that failed. jsonargparse reports an error raised while it builds a class as
    'Does not validate against any of the Union subtypes' with every alternative it tried; the check's own error is
    the first cause raised outside jsonargparse."""
    jsonargparse_dir = str(Path(jsonargparse.__file__).parent)
    while error.__cause__ is not None and \
            traceback.extract_tb(error.__traceback__)[-1].filename.startswith(jsonargparse_dir):
        error = error.__cause__
    return str(error)


def run_command(words: list[str]) -> None:
    """Run `lightning-mim <words>`: a LightningCLI subcommand or one of EXTRA_COMMANDS."""
    if words and words[0] in EXTRA_COMMANDS:
        module, _, function = EXTRA_COMMANDS[words[0]][0].partition(":")
        getattr(importlib.import_module(module), function or "main")(words[1:])
        return
    if words and words[0] in ("-h", "--help"):
        print("extra subcommands: " + "; ".join(f"{name}: {text}" for name, (_, text) in EXTRA_COMMANDS.items()))
    run_cli(words)


def main(argv: list[str] | None = None) -> None:
    """`lightning-mim`. A configuration error ends it with the error's message, which names the fix, on one line;
    with LIGHTNING_MIM_DEBUG=1 the error is raised with its traceback."""
    try:
        run_command(sys.argv[1:] if argv is None else argv)
    except CONFIGURATION_ERRORS as error:
        if os.environ.get(DEBUG_VARIABLE) == "1":
            raise
        print(f"lightning-mim: error: {configuration_error_message(error)}\n({DEBUG_VARIABLE}=1 shows the traceback)",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
