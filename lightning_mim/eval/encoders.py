"""The encoder `evaluate` and `analyze` work on: a checkpoint, an exported or official weights file, or a pre-training
recipe's random initialisation (`random:<recipe.yaml>`), with the identity its results rows carry."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import LightningCLI
import yaml

from lightning_mim.backbone import BackboneConfig
from lightning_mim.eval.features import PIXELS
from lightning_mim.eval.resumable import file_digest
from lightning_mim.eval.weights import (
    backbone_config_of, config_hash, pretraining_identity, read_checkpoint, save_encoder,
)

SAVED_CONFIG_NAME = "config.yaml"  # the file LightningCLI's SaveConfigCallback writes into a run's folder
# `Trainer.fit`'s own arguments (ckpt_path, weights_only): a run's saved config holds them, a model-only CLI does not
FIT_ARGUMENTS = set(inspect.signature(L.Trainer.fit).parameters) - LightningCLI.subcommands()["fit"] - {"self"}


@dataclass
class Encoder:
    """The encoder under evaluation: a weights file readable by `load_encoder_state`, its config and identity."""

    path: Path
    config: BackboneConfig
    run: str
    method: str
    config_hash: str
    pretrained_on: str | None = None  # the data source of the pre-training, where the checkpoint records it

    _digest: str | None = field(default=None, init=False, repr=False)

    def digest(self) -> str:
        """sha256 of the weights file (computed once)."""
        if self._digest is None:
            self._digest = file_digest(self.path)
        return self._digest


def random_encoder(recipe: Path, workdir: Path) -> Encoder:
    """The model of a pre-training recipe, or of the config.yaml a `fit` run saved in its folder, at its seeded
    initialisation, built by the LightningCLI exactly as `lightning-mim fit --config <recipe>` builds it (same
    hyper-parameters, hence the same config hash). A run's config is named by its run folder
    (`random:mae/version_0`)."""
    from lightning_mim.cli import run_cli  # the CLI module imports this one for its subcommands

    config = {key: value for key, value in (yaml.safe_load(recipe.read_text()) or {}).items()
              if key not in FIT_ARGUMENTS}
    cli = run_cli(["--config", yaml.safe_dump(config), "--trainer.logger", "false"], run=False)
    model = cli.model
    path = save_encoder(model.backbone.state_dict(), model.backbone_config, workdir / "random_init.safetensors")
    return Encoder(path, model.backbone_config, random_run_name(recipe), type(model).__name__,
                   config_hash(dict(model.hparams)))


def random_run_name(recipe: Path) -> str:
    """The `run` of a random initialisation's rows: `random:<recipe stem>`, or `random:<name>/<version>` for the
    config.yaml of a run folder."""
    run = f"{recipe.parent.parent.name}/{recipe.parent.name}" if recipe.name == SAVED_CONFIG_NAME else recipe.stem
    return f"random:{run}"


def resolve_encoder(spec: str, workdir: Path, backbone: BackboneConfig | None = None) -> Encoder:
    """`random:<recipe.yaml>`, or a checkpoint / safetensors file (its backbone config is read from the file unless
    `backbone` is given)."""
    if spec.startswith("random:"):
        return random_encoder(Path(spec[len("random:"):]), workdir)
    path = Path(spec)
    config = backbone or backbone_config_of(path)
    identity = pretraining_identity(path, config)
    data = {} if path.suffix == ".safetensors" else read_checkpoint(path).get("datamodule_hyper_parameters") or {}
    return Encoder(path, config, run_name(path, identity), identity["method"], identity["config_hash"],
                   data.get("source"))


def run_name(checkpoint: Path, identity: dict[str, str] | None = None) -> str:
    """The `run` of a weights file's rows in results.csv: `<logger name>/<version>/<file>`, from the run recorded in
    the file (`pretraining_identity`) or, for an older checkpoint at `<save_dir>/<name>/<version>/checkpoints/<file>`,
    from its path; else the file name."""
    identity = identity if identity is not None else pretraining_identity(checkpoint, backbone_config_of(checkpoint))
    if "run" in identity:
        return f"{identity['run']}/{checkpoint.name}"
    if checkpoint.parent.name == "checkpoints":
        return "/".join([*(part.name for part in checkpoint.parents[2:0:-1]), checkpoint.name])
    return checkpoint.name


def row_identity(encoder: Encoder | None) -> dict[str, str]:
    """The run, method and config hash of an encoder's rows; "pixels" for the raw-pixel reference."""
    if encoder is None:
        return {"run": PIXELS, "method": PIXELS, "config_hash": ""}
    return {"run": encoder.run, "method": encoder.method, "config_hash": encoder.config_hash}


__all__ = ["Encoder", "SAVED_CONFIG_NAME", "random_encoder", "random_run_name", "resolve_encoder", "row_identity",
           "run_name"]
