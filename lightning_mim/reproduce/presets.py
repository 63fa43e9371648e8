"""How a table row is pre-trained and evaluated at each scale: the `lightning-mim fit` and `evaluate` arguments of
PRESET=smoke (synthetic images, a few steps: seconds per row), demo (Fashion-MNIST on the CPU with the micro demo
recipes: minutes per row), gpu (the demo recipes on one GPU, three seeds, at budgets meant for the losses and
evaluations to flatten: the pre-training's measured on the CPU, the fine-tuning's not yet) and paper (ImageNet with
the paper's recipe at the paper's effective batch, on GPUS x NODES GPUs through torchrun or SLURM)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from lightning_mim.eval.batch import BatchSplitError, split_batch
from lightning_mim.methods.base import OptimConfig
from lightning_mim.reproduce.slurm import DEFAULT_CPUS_PER_GPU

REPO = Path(__file__).resolve().parents[2]
PRESETS = ("smoke", "demo", "gpu", "paper")

# Appended to a demo recipe: 6 steps of batch 16 on 64 synthetic images, no validation, throughput logged every 2
# steps so that the img/s column has a value.
SMOKE_FIT = (
    "--data.source", "synthetic", "--data.synthetic_size", "64", "--data.batch_size", "16",
    "--data.num_workers", "0", "--trainer.max_steps", "6", "--trainer.limit_val_batches", "0",
    "--trainer.log_every_n_steps", "1", "--trainer.enable_model_summary", "false",
    "--knn.every_n_epochs", "1000", "--reconstruction.every_n_epochs", "1000",
    "--throughput.log_every_n_steps", "2", "--throughput.warmup_steps", "1",
)
# The synthetic images are colour; pre-training converted them to the demo encoders' one channel, and so does
# --adapt-images here.
SMOKE_EVALUATE = (
    "--data-source", "synthetic", "--synthetic-size", "64", "--batch-size", "16", "--epochs", "1",
    "--num-workers", "0", "--knn-bank", "64", "--accelerator", "cpu", "--adapt-images",
)
# PRESET=demo pre-trains every row for this many steps of batch 256 (STEPS= sets another): minutes per row on a
# CPU core, and every method on the same budget.
DEMO_STEPS = 300
# The demo evaluates with the two protocols that converge on the CPU in minutes: k-NN (a 10,000-image bank) and the
# logistic-regression probe trained to convergence on the cached features of all 60,000 training images (its L2 chosen
# on a held-out tenth). MAE's 10-epoch LARS probe and a 2-epoch fine-tune do not converge at this budget (issue 28:
# both read far below a linear classifier on raw pixels), so the CPU demo does not publish them.
DEMO_EVALUATE = ("--accelerator", "cpu")
# The small scales' robustness stage: every row's k-NN and logistic-regression classifiers (and at the gpu preset its
# fine-tuned one) on the 15 ImageNet-C corruptions x 5 severities of a seeded subset of the test images (the seed is
# the run's, so each seed scores its own subset): corrupting costs far more than a micro encoder's forward pass
# (about 7 CPU-minutes per 1,000 images, once per subset: `eval.corruptions.CorruptionCache`), and each row's 76
# passes over the images and its logistic-regression refit take 2-4 CPU-minutes more, so the CPU demo runs it at the
# first seed only (n = 1); the gpu preset at every seed.
DEMO_ROBUSTNESS_IMAGES = 500
GPU_ROBUSTNESS_IMAGES = 1000
# `analyze` (feature spectrum, attention distance and entropy) of every pre-trained row and its random initialisation:
# the same seeded validation images for every run and seed, so runs differ only by their encoder.
ANALYZE_IMAGES = 512
# The fine-tuning recipe of the small scale (crop with padding + flip + random erasing, every epoch validated), for a
# pre-trained encoder and for the supervised-from-scratch reference (`--ckpt random:<recipe>`) alike.
SMALL_FINETUNE = "configs/eval/finetune_demo_fmnist.yaml"

# PRESET=gpu: the demo recipes (micro ViT, 32 px, one channel) on one GPU in bf16 (configs/trainer/gpu.yaml), three
# seeds. Not yet run on a GPU (none was available). The pre-training budget is measured on the CPU (docs/results.md,
# "The pre-training budget"): at the demo's 300 steps the losses still fall steeply; at 3,000 (13 epochs of
# Fashion-MNIST) MAE's has flattened (under 4 % of its fall in the last fifth of the steps, three seeds; SimMIM's too,
# one seed) and MAE's k-NN / logistic-regression top-1 rose from 70.95 / 81.04 to 81.69 / 85.46. The fine-tuning's
# 30 epochs of 60,000 images are an estimate (the CPU managed 2 epochs of a 5,120-image subset, still rising
# steeply): the tables withhold a fine-tuning column whose curve still rises (reproduce.convergence).
GPU_STEPS = 3000
GPU_FINETUNE_EPOCHS = 30
GPU_SEEDS = 3


class ReproduceError(ValueError):
    """Bad input to `reproduce` / `compare`: the message names the problem and the fix."""


def shown(path: Path | str) -> str:
    """A path as commands show it: relative to the current folder when inside it."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def config(relative: str) -> str:
    """A file of this checkout (`configs/...`) as commands show it."""
    return shown(REPO / relative)


@dataclass(frozen=True)
class Setup:
    """What the user asked for: preset, data, devices, launcher, and extra arguments for every fit / evaluate."""

    preset: str
    data: str | None = None
    gpus: int = 8
    nodes: int = 1
    slurm: bool = False
    fit_args: tuple[str, ...] = ()
    eval_args: tuple[str, ...] = ()
    steps: int | None = None  # demo / gpu: pre-training steps (default DEMO_STEPS / GPU_STEPS)
    cpus_per_gpu: int = DEFAULT_CPUS_PER_GPU  # SLURM: --cpus-per-task of every job
    # SHIFT_DATA (paper): distribution-shift ImageFolders (name, folder) the fine-tuned rows are also scored on
    shift: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ReproduceError(f"unknown preset {self.preset!r}: choose PRESET={', '.join(PRESETS)}")
        if self.gpus < 1 or self.nodes < 1 or self.cpus_per_gpu < 1:
            raise ReproduceError(f"GPUS, NODES and CPUS_PER_GPU must be at least 1, got GPUS={self.gpus} NODES="
                                 f"{self.nodes} CPUS_PER_GPU={self.cpus_per_gpu}")
        if self.preset == "paper" and not self.data:
            raise ReproduceError("PRESET=paper needs DATA=<ImageNet ImageFolder with train/ and val/, or a folder of "
                                 "make-shards WebDataset shards train-*.tar / val-*.tar>")
        if self.slurm and self.preset != "paper":
            raise ReproduceError(f"SLURM=1 applies to PRESET=paper only (PRESET={self.preset} runs on this machine)")
        if self.steps is not None and (self.preset not in ("demo", "gpu") or self.steps < 1):
            raise ReproduceError(f"STEPS sets the demo budget (and the gpu one): a positive number with PRESET=demo "
                                 f"or gpu (got STEPS={self.steps} with PRESET={self.preset}; the paper preset runs "
                                 f"each recipe's epochs)")
        if self.shift and self.preset != "paper":
            raise ReproduceError(f"SHIFT_DATA scores the paper-scale fine-tuned rows: use it with PRESET=paper (got "
                                 f"PRESET={self.preset})")
        if self.preset == "gpu" and self.data and Path(self.data).is_dir() and not small_data(self.data)[0]:
            raise ReproduceError(f"DATA={self.data} holds neither the Fashion-MNIST idx files nor train/ and val/ (an "
                                 f"ImageFolder): point DATA at one of those, or leave it out for Fashion-MNIST")

    @property
    def demo_steps(self) -> int:
        """Pre-training steps of every row at the demo or gpu preset (STEPS, else the preset's budget)."""
        return self.steps or (GPU_STEPS if self.preset == "gpu" else DEMO_STEPS)

    @property
    def default_seeds(self) -> int:
        """SEEDS when the user gives none: three at the gpu preset (mean, std and verdicts), one elsewhere."""
        return GPU_SEEDS if self.preset == "gpu" else 1

    @property
    def devices(self) -> int:
        """Devices of one pre-training run: GPUS x NODES at paper scale, one CPU process otherwise."""
        return self.gpus * self.nodes if self.preset == "paper" else 1


@dataclass(frozen=True)
class EvalSpec:
    """One `lightning-mim evaluate` stage: its protocols, arguments, and the devices it trains on."""

    protocols: str
    args: tuple[str, ...]
    devices: int = 1
    columns: tuple[str, ...] | None = None  # its results.csv protocols, where `plan.result_protocols` cannot tell
    first_seed_only: bool = False  # run at a table's first seed only (n = 1), where every seed costs too much


def small_data(data: str | None) -> tuple[bool, list[str], list[str]]:
    """DATA at the demo / gpu preset: (recognised, fit arguments, evaluate arguments) for a folder of Fashion-MNIST
    idx files (the default when DATA is not given) or an ImageFolder (`train/<class>/...`, `val/<class>/...`), whose
    images the one-channel 32-px demo recipes read as grey 32-px images. A folder that does not exist here is taken
    as Fashion-MNIST (a dry run on another machine)."""
    if not data:
        return True, [], []
    folder = Path(data)
    if (folder / "train").is_dir() and (folder / "val").is_dir():
        return True, ["--data.source", "imagefolder", "--data.data_dir", data], \
            ["--data-source", "imagefolder", "--data-dir", data]
    recognised = not folder.exists() or any(folder.glob("train-images-idx3-ubyte*"))
    return recognised, ["--data.data_dir", data], ["--data-dir", data]


def paper_data(data: str) -> tuple[str, list[str], list[str]]:
    """DATA at paper scale: (data config, fit arguments, evaluate arguments) for an ImageFolder (`train/`, `val/`)
    or a folder of make-shards WebDataset shards (`train-000000.tar`, ... and `val-...`). A folder that does not
    exist here is taken as an ImageFolder (a dry run on another machine)."""
    folder = Path(data)
    shards = {split: sorted(folder.glob(f"{split}-*.tar")) for split in ("train", "val")}
    if shards["train"]:
        if not shards["val"]:
            raise ReproduceError(f"DATA={data} holds train-*.tar shards but no val-*.tar: write them with "
                                 f"`lightning-mim make-shards <ImageFolder>/val '{data}/val-%06d.tar'`")
        patterns = {split: brace_range(files) for split, files in shards.items()}
        return (config("configs/data/imagenet_wds.yaml"),
                ["--data.train_shards", patterns["train"], "--data.val_shards", patterns["val"]],
                ["--train-shards", patterns["train"], "--val-shards", patterns["val"]])
    if folder.exists() and not (folder / "train").is_dir():
        raise ReproduceError(f"DATA={data} holds neither train/ and val/ (an ImageFolder) nor train-*.tar shards: "
                             f"point DATA at one of those")
    return config("configs/data/imagenet_folder.yaml"), ["--data.data_dir", data], ["--data-dir", data]


def brace_range(files: list[Path]) -> str:
    """`dir/train-{000000..000041}.tar` for the numbered shards `files` (make-shards numbers them from 0)."""
    first, last = files[0].name, files[-1].name
    stem, number = first[:first.rindex("-") + 1], first[first.rindex("-") + 1:-len(".tar")]
    span = f"{{{number}..{last[len(stem):-len('.tar')]}}}" if len(files) > 1 else number
    return str(files[0].parent / f"{stem}{span}.tar")


def paper_batch(recipe: str, effective_batch: int, devices: int) -> tuple[int, int, float]:
    """(per-device batch, gradient accumulation, peak lr) that keep a paper recipe's effective batch on `devices`
    GPUs: the recipe's per-device batch, or the largest divisor below it, and the lr its scaling rule gives at
    that effective batch (the same `OptimConfig.peak_lr` the method uses)."""
    settings = yaml.safe_load((REPO / recipe).read_text())
    per_device_most = int(settings["data"]["batch_size"])
    if effective_batch % devices:
        raise ReproduceError(f"the effective batch {effective_batch} of {recipe} does not split over {devices} GPUs: "
                             f"choose GPUS x NODES dividing {effective_batch} (e.g. GPUS=8 NODES=1)")
    per_rank = effective_batch // devices
    per_device = next(size for size in range(min(per_device_most, per_rank), 0, -1) if per_rank % size == 0)
    peak_lr = OptimConfig(**settings["model"]["init_args"]["optim"]).peak_lr(effective_batch)
    return per_device, per_rank // per_device, peak_lr


def pretrain_args(setup: Setup, recipe: str, effective_batch: int | None) -> tuple[list[str], str]:
    """`lightning-mim fit` arguments of one pre-training (without its output folders) and a line describing its
    batch and lr."""
    if setup.preset == "smoke":
        return [*["--config", config("configs/trainer/cpu.yaml"), "--config", config(recipe)], *SMOKE_FIT], \
            "synthetic images, 6 steps of batch 16 on the CPU"
    if setup.preset == "demo":
        data_dir = ["--data.data_dir", setup.data] if setup.data else []
        return ["--config", config("configs/trainer/cpu.yaml"), "--config", config("configs/data/fashion_mnist.yaml"),
                "--config", config(recipe), *data_dir, "--trainer.max_steps", str(setup.demo_steps)], \
            f"Fashion-MNIST on the CPU, {setup.demo_steps} steps"
    if setup.preset == "gpu":
        _, data_args, _ = small_data(setup.data)
        return ["--config", config("configs/trainer/gpu.yaml"), "--config", config("configs/data/fashion_mnist.yaml"),
                "--config", config(recipe), *data_args, "--trainer.max_steps", str(setup.demo_steps)], \
            f"{'DATA=' + setup.data if setup.data else 'Fashion-MNIST'} on one GPU (bf16), {setup.demo_steps} steps"
    assert effective_batch is not None, "paper rows state their effective batch"
    data_config, data_args, _ = paper_data(setup.data)
    trainer = "configs/trainer/multinode.yaml" if setup.nodes > 1 else "configs/trainer/ddp.yaml"
    per_device, accumulation, peak_lr = paper_batch(recipe, effective_batch, setup.devices)
    return (["--config", config(trainer), "--config", data_config, "--config", config(recipe), *data_args,
             "--data.batch_size", str(per_device), "--trainer.accumulate_grad_batches", str(accumulation),
             "--model.optim.lr", f"{peak_lr:.6g}"],
            f"effective batch {effective_batch} = {per_device} per GPU x {setup.gpus} GPUs x {setup.nodes} nodes x "
            f"accumulation {accumulation}; peak lr {peak_lr:.6g} (the recipe's rule at {effective_batch})")


def evaluations(setup: Setup, finetune_recipe: str | None, linear_recipe: str | None = None) -> list[EvalSpec]:
    """The evaluation stages of one row: k-NN and the linear probe at smoke scale; k-NN and the converged
    logistic-regression probe at demo scale, and their robustness under corruption (a stage of its own); at gpu scale
    those and the small-scale fine-tuning recipe for GPU_FINETUNE_EPOCHS epochs on the GPU with its robustness; at
    paper scale k-NN and the logistic-regression probe on the frozen features, MAE's linear probe when a recipe is
    given, and fine-tuning with the row's recipe on GPUS GPUs of one node, its model also scored on SHIFT_DATA's
    sets when given (ImageNet-A, -R, -Sketch, or the released ImageNet-C folders)."""
    if setup.preset == "smoke":
        return [EvalSpec("knn,linear", SMOKE_EVALUATE)]
    if setup.preset == "demo":
        common = (*DEMO_EVALUATE, *(("--data-dir", setup.data) if setup.data else ()))
        return [EvalSpec("knn,logreg", common),
                EvalSpec("robustness", (*common, "--robustness-images", str(DEMO_ROBUSTNESS_IMAGES)),
                         first_seed_only=True)]
    if setup.preset == "gpu":
        common = gpu_evaluate_args(setup)
        robustness = ("--robustness-images", str(GPU_ROBUSTNESS_IMAGES))
        return [EvalSpec("knn,logreg", common), EvalSpec("robustness", (*common, *robustness)),
                EvalSpec("finetune,robustness", (*common, *small_finetune_args(), *robustness))]
    data_config, _, data_args = paper_data(setup.data)
    common = ("--data-config", data_config, *data_args, "--accelerator", "gpu")
    trained = ("--devices", str(setup.gpus), "--strategy", "ddp")
    specs = [EvalSpec("knn,logreg", common)]
    if linear_recipe is not None:
        specs.append(EvalSpec("linear", (*common, "--linear-config", config(linear_recipe), *trained,
                                         *recipe_batch_args(linear_recipe, setup.gpus)), setup.gpus))
    if finetune_recipe is not None:
        finetune = (*common, "--finetune-config", config(finetune_recipe), *trained,
                    *recipe_batch_args(finetune_recipe, setup.gpus))
        if not setup.shift:
            specs.append(EvalSpec("finetune", finetune, setup.gpus))
        else:  # the fine-tuned model on each shift set; a finished fine-tuning is reused, not trained again
            shift_dirs = tuple(word for name, folder in setup.shift for word in ("--shift-dir", f"{name}={folder}"))
            specs.append(EvalSpec("finetune,robustness", (*finetune, "--corruptions", "none", *shift_dirs),
                                  setup.gpus, ("finetune", *(f"shift-{name}-finetune" for name, _ in setup.shift))))
    return specs


def analyze_args(setup: Setup) -> tuple[str, ...] | None:
    """`lightning-mim analyze` arguments (besides --ckpt and --out) of every row of a preset: its validation data
    and device, ANALYZE_IMAGES images; None at the smoke preset (a pipeline check: one more interpreter start-up
    per run would double its time, and its synthetic encoders have nothing to show)."""
    if setup.preset == "smoke":
        return None
    if setup.preset == "demo":
        data = (*(("--data-dir", setup.data) if setup.data else ()), "--accelerator", "cpu")
    elif setup.preset == "gpu":
        data = (*small_data(setup.data)[2], "--accelerator", "gpu")
    else:
        data_config, _, data_args = paper_data(setup.data)
        if "--train-shards" in data_args:  # analyze reads the validation split only
            data_args = data_args[data_args.index("--val-shards"):]
        data = ("--data-config", data_config, *data_args, "--accelerator", "gpu")
    return ("--images", str(ANALYZE_IMAGES), *data)


def gpu_evaluate_args(setup: Setup) -> tuple[str, ...]:
    """`evaluate` arguments shared by every gpu-preset evaluation: the data and the GPU."""
    return (*small_data(setup.data)[2], "--accelerator", "gpu", "--devices", "1")


def small_finetune_args() -> tuple[str, ...]:
    return "--finetune-config", config(SMALL_FINETUNE), "--finetune-epochs", str(GPU_FINETUNE_EPOCHS)


def supervised_evaluation(setup: Setup) -> EvalSpec | None:
    """The supervised-from-scratch reference row: `lightning-mim evaluate --ckpt random:<recipe> <these arguments>`,
    the row's random initialisation fine-tuned with the same recipe, epochs and data as the pre-trained rows; None
    where the preset cannot afford a converged fine-tuning (smoke; demo: a CPU core fine-tunes at 0.3 steps/s or
    less, so the 7,000 steps of 30 epochs of 60,000 images take 6 h or more, and the CPU demo publishes no
    fine-tuning column; paper: a fine-tuning recipe is no supervised ImageNet recipe, whose numbers the specs
    quote). The encoder must be at the rows' image size (32 px): `random:<a demo row's run folder>/config.yaml`
    (the config its `fit` saved), or a recipe with `--model.backbone.img_size 32` baked in; `--adapt-images` lets
    a random encoder, which records no pre-training data, read Fashion-MNIST resized to 32 px as the rows do."""
    if setup.preset == "gpu":
        return EvalSpec("finetune,robustness", (*gpu_evaluate_args(setup), *small_finetune_args(),
                                                "--robustness-images", str(GPU_ROBUSTNESS_IMAGES), "--adapt-images"))
    return None


def recipe_batch_args(recipe: str, gpus: int) -> tuple[str, ...]:
    """`--batch-size` / `--accumulate-grad-batches` keeping an evaluation recipe's `effective_batch` on `gpus` GPUs
    (evaluate derives the same on its own; printed so the command shows it); none for a recipe without one."""
    settings = yaml.safe_load((REPO / recipe).read_text())
    if "effective_batch" not in settings:
        return ()
    try:
        per_device, accumulation = split_batch(int(settings["effective_batch"]), int(settings["data"]["batch_size"]),
                                               gpus)
    except BatchSplitError as error:
        raise ReproduceError(f"{recipe}: {error} (the evaluations run on the GPUS of one node)") from None
    return "--batch-size", str(per_device), "--accumulate-grad-batches", str(accumulation)
