"""SLURM auto-requeue: SIGUSR1 makes Lightning write `hpc_ckpt_<n>.ckpt` (atomically, through our CheckpointIO) into
the job's own folder, `<default_root_dir>/slurm-<job id>`, and call `scontrol requeue <job id>`. The requeued job
(same id) resumes from it, logs into the same TensorBoard version and removes it when the run ends; a job with another
id started from the same folder, even with another configuration, starts afresh."""
import os
import signal
import stat
import subprocess
import time

import yaml
from conftest import MICRO, ROOT, cli_command

from lightning_mim.reliability import safe_load

TENSORBOARD = ["--trainer.logger.class_path", "lightning.pytorch.loggers.TensorBoardLogger",
               "--trainer.logger.init_args.save_dir", "runs", "--trainer.logger.init_args.name", "mim"]


def slurm_env(bin_dir, job_id: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests/reliability")]),
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": job_id, "SLURM_NTASKS": "1",
            "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1", "SLURM_JOB_NAME": "mim-pretrain", "SLURM_NODEID": "0",
            "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODELIST": "localhost"}


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
    command = cli_command("fit", *MICRO, *TENSORBOARD)
    log = tmp_path / "run.log"
    process = subprocess.Popen([*command, "--config", str(config), "--trainer.max_steps", "100000"], cwd=tmp_path,
                               env=slurm_env(bin_dir, "4242"), stdout=log.open("w"), stderr=subprocess.STDOUT,
                               text=True)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
        assert ready.exists(), log.read_text()[-3000:]
        process.send_signal(signal.SIGUSR1)
        # Python runs the handler between bytecodes of the main thread: on a loaded 2-core machine (the whole suite)
        # a step can take seconds, and the handler then saves a checkpoint before it requeues
        deadline = time.monotonic() + 180
        while not record.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        process.kill()
        process.wait()
    # the run writes to a file, not a pipe: a full pipe nobody reads would block it, signal handler included
    assert record.exists(), f"no requeue within 180 s of SIGUSR1; the run printed:\n{log.read_text()[-3000:]}"
    assert record.read_text().split() == ["requeue", "4242"]
    assert not list(tmp_path.glob("hpc_ckpt_*"))
    step = safe_load(tmp_path / "slurm-4242/hpc_ckpt_1.ckpt")["global_step"]
    assert step >= 2

    other = subprocess.run([*command, "--model.mask_ratio", "0.6", "--trainer.max_steps", "2"], cwd=tmp_path,
                           env=slurm_env(bin_dir, "5151"), capture_output=True, text=True, timeout=300)
    assert other.returncode == 0, other.stderr[-3000:]
    assert "Restoring states" not in other.stdout + other.stderr

    versions = tmp_path / "runs/mim"
    first_events = set((versions / "version_4242").glob("events.out.tfevents.*"))
    assert first_events
    restart = subprocess.run([*command, "--trainer.max_steps", str(step + 2)], cwd=tmp_path,
                             env=slurm_env(bin_dir, "4242"), capture_output=True, text=True, timeout=300)
    assert restart.returncode == 0, restart.stderr[-3000:]
    assert "slurm-4242/hpc_ckpt_1.ckpt" in restart.stdout + restart.stderr
    assert not (tmp_path / "slurm-4242").exists()
    assert sorted(path.name for path in versions.iterdir()) == ["version_4242", "version_5151"]
    assert set((versions / "version_4242").glob("events.out.tfevents.*")) - first_events  # the restart's own log
