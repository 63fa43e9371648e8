"""The CLI's agreement with a cluster launcher, without subprocesses: trainer.devices / trainer.num_nodes follow torchrun
or SLURM over any config, and a value typed on the command line that disagrees stops the run."""
from pathlib import Path

import pytest

from lightning_mim.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
MULTINODE = str(ROOT / "configs/trainer/multinode.yaml")
# appended to a header's command: the micro MAE on synthetic data, two steps on the CPU
CPU_MICRO = [
    "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
    "--model.backbone.size", "micro", "--model.backbone.img_size", "32", "--model.backbone.patch_size", "4",
    "--model.backbone.in_chans", "1",
    "--model.decoder_dim", "32", "--model.decoder_depth", "1", "--model.decoder_heads", "2",
    "--model.optim.warmup_steps", "1",
    "--data.source", "synthetic", "--data.synthetic_size", "64", "--data.batch_size", "8", "--data.num_workers", "0",
    "--data.knn_bank_size", "16", "--data.val_subset", "16",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    "--knn.every_n_epochs", "1000", "--reconstruction.every_n_epochs", "1000", "--trainer.limit_val_batches", "0",
    "--trainer.max_steps", "2",
]
LAUNCHER_VARIABLES = ("TORCHELASTIC_RUN_ID", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "LOCAL_RANK", "GROUP_RANK",
                      "SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_NNODES",
                      "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_NODELIST", "SLURM_ARRAY_JOB_ID")


TORCHRUN_TWO_NODES = {"TORCHELASTIC_RUN_ID": "none", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "RANK": "0",
                      "LOCAL_RANK": "0", "GROUP_RANK": "0"}
SLURM_TWO_NODES = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "lightning-mim", "SLURM_NTASKS": "2",
                   "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                   "SLURM_NODEID": "0", "SLURM_NODELIST": "127.0.0.1"}
LAUNCHERS = {"torchrun": TORCHRUN_TWO_NODES, "SLURM": SLURM_TWO_NODES}


@pytest.fixture
def launcher(request, monkeypatch, tmp_path):
    """The environment torchrun or srun gives the first of two processes, one per node."""
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in {**LAUNCHERS[request.param], "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    return request.param


def micro_cli(*args: str):
    return run_cli(["--config", str(ROOT / "configs/trainer/cpu.yaml"), "--model", "MAE", *CPU_MICRO, *args],
                   run=False)


@pytest.mark.parametrize("launcher", LAUNCHERS, indirect=True)
def test_launcher_layout_overrides_the_config(launcher):
    trainer = micro_cli("--config", MULTINODE, "--trainer.accelerator", "cpu").trainer
    assert (trainer.num_devices, trainer.num_nodes, trainer.world_size) == (1, 2, 2)


@pytest.mark.parametrize("launcher", LAUNCHERS, indirect=True)
def test_forgotten_num_nodes_comes_from_the_launcher(launcher):
    trainer = micro_cli().trainer
    assert (trainer.num_nodes, trainer.world_size) == (2, 2)


@pytest.mark.parametrize("launcher", LAUNCHERS, indirect=True)
@pytest.mark.parametrize("typed,needle", [(["--trainer.devices", "2"], "--trainer.devices 1"),
                                          (["--trainer.num_nodes=3"], "--trainer.num_nodes 2")])
def test_typed_value_that_disagrees_with_the_launcher_is_refused(launcher, typed, needle):
    with pytest.raises(ValueError, match=needle) as error:
        micro_cli(*typed)
    assert launcher in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("launcher", ["torchrun"], indirect=True)
def test_typed_value_that_agrees_with_the_launcher_is_kept(launcher):
    trainer = micro_cli("--trainer.num_nodes", "2", "--trainer.devices", "1").trainer
    assert (trainer.num_devices, trainer.num_nodes) == (1, 2)
