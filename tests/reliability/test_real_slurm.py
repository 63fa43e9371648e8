"""`experiments/slurm_pretrain.sbatch` under a real SLURM: munged, slurmctld and slurmd on this machine with a one-node
configuration written into a temporary folder (Debian's `slurm-wlm`, installed when missing and apt-get can). One
job runs a micro MAE with 2 tasks straight through; another gets the time-limit signal (`scancel --signal=USR1`, as
`--signal=USR1@<s>` sends it) in the middle of its run, requeues itself and resumes: each rank's per-step losses and
the final weights equal the straight job's. Skipped, with the reason, where SLURM cannot be installed or started."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT

from lightning_mim.reliability import safe_load

pytestmark = pytest.mark.slurm
DAEMONS = ("munged", "slurmctld", "slurmd")
# the header's recipe, on the CPU with the micro backbone: 64 images in batches of 8 on 2 ranks, 4 steps an epoch
MICRO = [
    "--config", "configs/mae/vit_b16_1600ep_in1k.yaml", "--trainer.accelerator", "cpu",
    "--trainer.precision", "32-true", "--seed_everything", "7",
    "--model.backbone.size", "micro", "--model.backbone.img_size", "32", "--model.backbone.patch_size", "4",
    "--model.backbone.in_chans", "1", "--model.decoder_dim", "32", "--model.decoder_depth", "1",
    "--model.decoder_heads", "2", "--model.optim.warmup_steps", "1",
    "--data.source", "synthetic", "--data.synthetic_size", "64", "--data.batch_size", "8", "--data.num_workers", "0",
    "--data.knn_bank_size", "16", "--data.val_subset", "16", "--trainer.enable_model_summary", "false",
    "--knn.every_n_epochs", "1000", "--reconstruction.every_n_epochs", "1000", "--trainer.limit_val_batches", "0",
    "--trainer.max_steps", "10", "--trainer.log_every_n_steps", "1",
]
SIGNAL_AFTER = 4  # the signal is sent once 4 steps are done
# generous: a job takes about a minute on an idle 2-core machine, several when other work shares the cores
WAIT_S = 900


def install_slurm() -> str | None:
    """None when munged, slurmctld and slurmd are there (installed here if needed), else why not."""
    if all(shutil.which(daemon) or Path(f"/usr/sbin/{daemon}").exists() for daemon in DAEMONS):
        return None
    if sys.platform != "linux" or os.geteuid() != 0 or not shutil.which("apt-get"):
        return "SLURM is not installed, and installing it needs root and apt-get (apt-get install slurm-wlm munge)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(command)}` took more than 10 minutes"
        if result.returncode:
            return f"`{' '.join(command)}` failed: {result.stderr.strip()[-300:]}"
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def node_line() -> str:
    """`NodeName=<host> CPUs=.. RealMemory=..` of this machine, as `slurmd -C` reports it."""
    reported = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=60).stdout.split()
    fields = dict(word.split("=", 1) for word in reported if "=" in word)
    return f"NodeName={fields['NodeName']} NodeAddr=127.0.0.1 CPUs={fields['CPUs']} RealMemory={fields['RealMemory']}"


def write_config(folder: Path) -> Path:
    node = node_line()
    host = node.split()[0].split("=")[1]
    config = folder / "slurm.conf"
    config.write_text("\n".join([
        "ClusterName=lightningmim", f"SlurmctldHost={host}(127.0.0.1)", "AuthType=auth/munge", "CredType=cred/munge",
        f"AuthInfo=socket={folder}/munge.socket", "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU", "SlurmUser=root", "SlurmdUser=root",
        f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}", "ReturnToService=2", "MpiDefault=none",
        "KillWait=10", "MinJobAge=600",
        *(f"{name}PidFile={folder}/{name.lower()}.pid" for name in ("Slurmctld", "Slurmd")),
        *(f"{name}LogFile={folder}/{name.lower()}.log" for name in ("Slurmctld", "Slurmd")),
        f"SlurmdSpoolDir={folder}/spool", f"StateSaveLocation={folder}/state",
        f"{node} State=UNKNOWN",
        f"PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:2", ""]))
    return config


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running one-node cluster: the environment that points its commands at it. Its daemons are stopped by PID
    at the end, also after a failure."""
    reason = install_slurm()
    if reason:
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("slurm")
    for sub in ("spool", "state"):
        (folder / sub).mkdir()
    shutil.copy("/etc/munge/munge.key", folder / "munge.key")
    (folder / "munge.key").chmod(0o600)
    config = write_config(folder)
    env = {**os.environ, "SLURM_CONF": str(config)}
    starts = [["munged", "--force", f"--socket={folder}/munge.socket", f"--key-file={folder}/munge.key",
               f"--log-file={folder}/munged.log", f"--pid-file={folder}/munged.pid",
               f"--seed-file={folder}/munged.seed"],
              ["slurmctld", "-f", str(config), "-i"], ["slurmd", "-f", str(config)]]
    try:
        for command in starts:
            result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
            if result.returncode:
                pytest.skip(f"`{command[0]}` did not start: {result.stderr.strip()[-300:]}")
        deadline = time.monotonic() + 60
        while subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                             env=env).stdout.strip() != "idle":
            if time.monotonic() > deadline:
                pytest.skip("the SLURM node did not become idle within 60 s: "
                            + (folder / "slurmd.log").read_text()[-500:])
            time.sleep(0.5)
        yield env
    finally:
        subprocess.run(["scancel", "--user", "root"], capture_output=True, env=env)
        for daemon in reversed(DAEMONS):
            pid_file = folder / f"{daemon}.pid"
            if pid_file.is_file():
                try:
                    os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
                except ProcessLookupError:
                    pass


def job_field(env: dict[str, str], job_id: str, name: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, env=env).stdout
    return next((word.split("=", 1)[1] for word in shown.split() if word.startswith(f"{name}=")), "")


def submit(env: dict[str, str], folder: Path, name: str, callbacks: list[dict]) -> str:
    config = folder / f"{name}.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    result = subprocess.run(
        ["sbatch", "--parsable", "--nodes", "1", "--ntasks-per-node", "2", "--gpus-per-node", "0",
         "--cpus-per-task", "1", "--time", "20", "--job-name", name,
         str(ROOT / "experiments/slurm_pretrain.sbatch"), *MICRO, "--config", str(config)],
        cwd=folder, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def wait_until(condition, seconds: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what} not within {seconds:.0f} s; the job printed:\n" + (
            log.read_text()[-4000:] if log.is_file() else "(nothing)")
        time.sleep(1)


def records(path: Path) -> dict[int, float]:
    lines = [line.split() for line in path.read_text().splitlines()]
    steps = [int(step) for step, *_ in lines]
    assert len(steps) == len(set(steps)), f"a step ran twice: {steps}"
    return {int(step): float(loss) for step, loss, _ in lines}


def test_time_limit_signal_requeues_and_the_job_resumes_exactly(slurm, tmp_path):
    started = time.monotonic()
    folder = tmp_path / "submit"
    folder.mkdir()
    (folder / "configs").symlink_to(ROOT / "configs")
    env = {**slurm, "PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests/reliability")])}

    def recorder(name: str) -> dict:
        return {"class_path": "helpers.RankRecorder", "init_args": {"path": str(folder / name)}}

    # the partition lets two jobs share the node's CPUs: the straight job runs beside the one to be requeued
    straight = submit(env, folder, "straight", [recorder("straight")])
    ready = folder / "ready"
    requeued = submit(env, folder, "requeued", [recorder("requeued"), {"class_path": "helpers.Announce",
                                                                      "init_args": {"path": str(ready),
                                                                                    "step": SIGNAL_AFTER,
                                                                                    "await_signal": True}}])
    log = folder / f"slurm-requeued-{requeued}.out"
    wait_until(ready.exists, WAIT_S, f"step {SIGNAL_AFTER}", log)
    subprocess.run(["scancel", "--signal=USR1", requeued], env=env, check=True, timeout=60)
    # SLURM holds a requeued job for two minutes (BeginTime), set once the old allocation has ended; a real time limit
    # ends the job anyway. Released here as soon as it is pending again.
    was_pending = False

    def released() -> bool:
        nonlocal was_pending
        state = job_field(env, requeued, "JobState")
        if state == "PENDING" and job_field(env, requeued, "Restarts") == "1":
            was_pending = True
            subprocess.run(["scontrol", "update", f"JobId={requeued}", "StartTime=now"], env=env, timeout=60)
        return was_pending and state != "PENDING"

    wait_until(released, WAIT_S, "the requeue and the restart", log)
    wait_until(lambda: job_field(env, requeued, "JobState") == "COMPLETED", WAIT_S, "the requeued job's end", log)
    wait_until(lambda: job_field(env, straight, "JobState") == "COMPLETED", WAIT_S, "the straight job's end",
               folder / f"slurm-straight-{straight}.out")
    output = log.read_text()
    print(f"real SLURM: straight job {straight}, requeued job {requeued}, {time.monotonic() - started:.0f} s")
    assert "Traceback" not in output, output[-4000:]
    assert f"slurm-{requeued}/hpc_ckpt_1.ckpt" in output

    worst = 0.0
    for rank in (0, 1):
        expected, got = records(folder / f"straight.{rank}"), records(folder / f"requeued.{rank}")
        assert sorted(got) == sorted(expected) == list(range(1, 11))
        for step, loss in expected.items():
            worst = max(worst, abs(got[step] - loss) / abs(loss))
    print(f"largest relative difference of a per-step loss, requeued vs straight: {worst:.2e}")
    assert worst <= 1e-6
    runs = folder / "runs/mae_vit_b16_1600ep_in1k"
    final_a = safe_load(runs / f"version_{straight}/checkpoints/last.ckpt")["state_dict"]
    final_b = safe_load(runs / f"version_{requeued}/checkpoints/last.ckpt")["state_dict"]
    for name, value in final_a.items():
        torch.testing.assert_close(final_b[name], value, rtol=1e-6, atol=1e-7)
    assert not (folder / f"slurm-{requeued}").exists()
