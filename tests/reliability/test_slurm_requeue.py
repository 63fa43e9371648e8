"""SLURM auto-requeue: SIGUSR1 makes Lightning write `hpc_ckpt_<n>.ckpt` (atomically, through our CheckpointIO)
and call `scontrol requeue <job id>`; the requeued job resumes from that checkpoint on its own."""
import os
import signal
import stat
import subprocess
import time

import yaml
from conftest import MICRO, ROOT, cli_command

from lightning_mim.reliability import safe_load


def test_sigusr1_checkpoints_requeues_and_restart_resumes(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "scontrol.log"
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {record}\n")
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    ready = tmp_path / "ready"
    config = tmp_path / "announce.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "helpers.Announce", "init_args": {"path": str(ready), "step": 2}}]}}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests/reliability")]),
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1",
           "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "mim-pretrain", "SLURM_NODEID": "0",
           "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODELIST": "localhost"}
    root = tmp_path / "run"
    command = cli_command("fit", *MICRO, "--config", str(config), "--trainer.max_steps", "100000",
                          "--trainer.default_root_dir", str(root))
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
        assert ready.exists(), process.stdout.read()[-3000:] if process.poll() is not None else "not ready"
        process.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 60
        while not record.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        process.kill()
        process.wait()
    assert record.read_text().split() == ["requeue", "4242"]
    hpc = root / "hpc_ckpt_1.ckpt"
    step = safe_load(hpc)["global_step"]
    assert step >= 2

    restart = subprocess.run(
        cli_command("fit", *MICRO, "--trainer.max_steps", str(step + 2), "--trainer.default_root_dir", str(root)),
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert restart.returncode == 0, restart.stderr[-3000:]
    assert "hpc_ckpt_1.ckpt" in restart.stdout + restart.stderr
