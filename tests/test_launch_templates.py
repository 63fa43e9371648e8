"""The cluster launch templates started as a user would, on one machine: `experiments/torchrun_pretrain.sh` as two
"nodes" of one process on 127.0.0.1, `experiments/slurm_pretrain.sbatch` run by bash with stand-in `srun` and
`scontrol`, each with the command of its header plus CPU / micro-model overrides (gloo on the CPU). And, without
subprocesses, the CLI's agreement with the launcher: trainer.devices / trainer.num_nodes follow torchrun or SLURM over
any config, and a value typed on the command line that disagrees stops the run."""
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_mim.cli import run_cli
from lightning_mim.reliability import safe_load

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN_TEMPLATE = ROOT / "experiments/torchrun_pretrain.sh"
SLURM_TEMPLATE = ROOT / "experiments/slurm_pretrain.sbatch"
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


def header_command(template: Path) -> tuple[dict[str, str], list[str]]:
    """The example command of a template's header (the comment lines indented by three spaces): its leading
    `NAME=value` assignments and the words that follow."""
    lines = [line[1:].rstrip().removesuffix("\\") for line in template.read_text().splitlines()
             if line.startswith("#   ")]
    words = shlex.split(" ".join(lines))
    assignments = {}
    while "=" in words[0] and not words[0].startswith("-"):
        name, value = words.pop(0).split("=", 1)
        assignments[name] = value
    return assignments, words


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def submit_folder(tmp_path: Path) -> Path:
    """A user's folder to launch from (not the repository): the header's relative config paths resolve through a
    link to the repository's configs."""
    folder = tmp_path / "submit"
    folder.mkdir()
    (folder / "configs").symlink_to(ROOT / "configs")
    return folder


def launched_env(**variables: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name not in LAUNCHER_VARIABLES}
    return {**env, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), **variables}


def test_torchrun_header_command_on_two_local_nodes(tmp_path):
    assignments, words = header_command(TORCHRUN_TEMPLATE)
    assert words[0] == "experiments/torchrun_pretrain.sh" and MULTINODE.endswith(words[2]), words
    assert assignments["NNODES"] == "2"
    folder = submit_folder(tmp_path)
    env = launched_env(**{**assignments, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                          "GPUS_PER_NODE": "1"})
    nodes = [subprocess.Popen(["bash", str(ROOT / words[0]), *words[1:], *CPU_MICRO], cwd=folder,
                              env={**env, "NODE_RANK": str(rank)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    try:
        outputs = [node.communicate(timeout=150)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    print("\n".join(line for line in outputs[0].splitlines() if any(
        needle in line for needle in ("trainer.devices", "MEMBER", "max_steps"))))
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "MEMBER: 2/2" in outputs[1]
    run = folder / "runs/mae_vit_b16_1600ep_in1k/version_0"
    saved = yaml.safe_load((run / "config.yaml").read_text())["trainer"]
    assert (saved["devices"], saved["num_nodes"]) == (1, 2)
    assert safe_load(run / "checkpoints/last.ckpt")["global_step"] == 2


STAND_IN_SRUN = """#!/bin/bash
# stand-in srun: records its options, starts SLURM_NTASKS copies of the command on this machine
echo "$*" >> "$SRUN_LOG"
while [[ $1 == --* ]]; do shift 2; done
pids=()
for ((rank = 0; rank < SLURM_NTASKS; rank++)); do
    SLURM_PROCID=$rank SLURM_LOCALID=$((rank % SLURM_NTASKS_PER_NODE)) \\
        SLURM_NODEID=$((rank / SLURM_NTASKS_PER_NODE)) "$@" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""


def test_slurm_header_command_with_stand_in_srun(tmp_path):
    assignments, words = header_command(SLURM_TEMPLATE)
    assert not assignments and words[:3] == ["sbatch", "--nodes", "8"], words
    template = ROOT / words[3]
    assert template == SLURM_TEMPLATE
    folder = submit_folder(tmp_path)
    # requeue state of other jobs in the submit folder: where Lightning used to put it, and another job's folder
    (folder / "hpc_ckpt_1.ckpt").write_bytes(b"not a checkpoint")
    (folder / "slurm-1000").mkdir()
    (folder / "slurm-1000/hpc_ckpt_1.ckpt").write_bytes(b"not a checkpoint")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(STAND_IN_SRUN)
    (bin_dir / "scontrol").write_text(
        f"#!/bin/bash\n[[ $1 == show ]] && printf '   JobId=%s\\n   Command={template}\\n   WorkDir={folder}\\n' $3\n")
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    # sbatch runs a copy of the script from its spool folder
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "slurm_script").write_text(template.read_text())
    srun_log = tmp_path / "srun.log"
    env = launched_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SRUN_LOG=str(srun_log),
                       SLURM_JOB_ID="4242", SLURM_JOB_NAME="lightning-mim", SLURM_SUBMIT_DIR=str(folder),
                       SLURM_NNODES="2", SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1", SLURM_CPUS_PER_TASK="3",
                       SLURM_NODELIST="127.0.0.1", MASTER_PORT=str(free_port()))
    result = subprocess.run(["bash", str(spool / "slurm_script"), *words[4:], *CPU_MICRO], cwd=folder, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=150)
    print("\n".join(line for line in result.stdout.splitlines() if any(
        needle in line for needle in ("lightning-mim:", "trainer.devices", "MEMBER", "max_steps"))))
    assert result.returncode == 0, result.stdout[-5000:]
    assert f"checkout {ROOT}" in result.stdout
    assert srun_log.read_text().split()[:2] == ["--cpus-per-task", "3"]
    assert "MEMBER: 2/2" in result.stdout
    assert "Restoring states" not in result.stdout
    run = folder / "runs/mae_vit_b16_1600ep_in1k/version_4242"
    saved = yaml.safe_load((run / "config.yaml").read_text())["trainer"]
    assert (saved["devices"], saved["num_nodes"]) == (1, 2)
    assert safe_load(run / "checkpoints/last.ckpt")["global_step"] == 2
    assert not (folder / "slurm-4242").exists()  # no requeue state of this job is left
    assert (folder / "slurm-1000/hpc_ckpt_1.ckpt").is_file()  # another job's state is not this job's to remove


@pytest.mark.parametrize("template", [TORCHRUN_TEMPLATE, SLURM_TEMPLATE], ids=lambda path: path.name)
def test_template_without_python_says_what_to_set(tmp_path, template):
    env = launched_env(SLURM_JOB_ID="4242", LIGHTNING_MIM_ROOT=str(tmp_path))
    del env["PYTHON"]
    result = subprocess.run(["bash", str(template)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    message = result.stderr.strip()
    assert "\n" not in message and f"no Python at {tmp_path}/.venv/bin/python" in message
    assert "LIGHTNING_MIM_ROOT" in message


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
