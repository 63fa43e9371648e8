"""SLURM requeue at a step boundary (`RequeueAtStepBoundary`), with a stand-in `scontrol`: the time-limit signal
(SIGUSR1) or SIGTERM sent in the middle of a step makes the run write `hpc_ckpt_<n>.ckpt` at the end of that step into
the job's own folder, `<default_root_dir>/slurm-<job id>`, call `scontrol requeue <job id>` and exit with status 0.
The requeued job (same id) resumes from it and continues exactly as an uninterrupted run: the same per-step losses,
the same logged steps, the same final weights; it logs into the same TensorBoard version and removes the checkpoint
when it ends. A job with another id started from the same folder starts afresh."""
import os
import stat
import subprocess

import torch
import yaml
from conftest import MICRO, ROOT, cli_command
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_mim.reliability import safe_load

TENSORBOARD = ["--trainer.logger.class_path", "lightning.pytorch.loggers.TensorBoardLogger",
               "--trainer.logger.init_args.save_dir", "runs", "--trainer.logger.init_args.name", "mim",
               "--trainer.logger.init_args.default_hp_metric", "false"]
# 64 samples in batches of 16: 4 steps an epoch; the signal comes during step 6, the middle of the second epoch
TOTAL, SIGNAL_AT = 12, 6


def slurm_env(bin_dir, job_id: str, tasks: int = 1) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests/reliability")]),
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": job_id, "SLURM_NTASKS": str(tasks),
            "SLURM_NTASKS_PER_NODE": str(tasks), "SLURM_NNODES": "1", "SLURM_JOB_NAME": "mim-pretrain",
            "SLURM_NODEID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODELIST": "localhost"}


def fake_scontrol(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "scontrol.log"
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {record}\n")
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    return bin_dir, record


def fit(tmp_path, bin_dir, job_id: str, name: str, *callbacks: dict) -> subprocess.CompletedProcess:
    config = tmp_path / f"{name}.yaml"
    recorder = {"class_path": "helpers.LossRecorder", "init_args": {"path": str(tmp_path / f"{name}.txt")}}
    config.write_text(yaml.safe_dump({"trainer": {"callbacks": [recorder, *callbacks]}}))
    command = cli_command("fit", *MICRO, *TENSORBOARD, "--config", str(config), "--seed_everything", "7",
                          "--data.synthetic_size", "64", "--trainer.max_steps", str(TOTAL),
                          # bounded by epochs too, as a recipe is: the lr schedule builds the loader before the restore
                          "--trainer.max_epochs", "1000")
    return subprocess.run(command, cwd=tmp_path, env=slurm_env(bin_dir, job_id), capture_output=True, text=True,
                          timeout=300)


def losses(path) -> dict[int, float]:
    return {int(step): float(loss) for step, loss in (line.split() for line in path.read_text().splitlines())}


def logged(version) -> dict[str, dict[int, float]]:
    """Every scalar tag of a TensorBoard version folder (all its event files): step -> value."""
    tags: dict[str, dict[int, float]] = {}
    for events in sorted(version.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            for event in accumulator.Scalars(tag):
                assert event.step not in tags.setdefault(tag, {}), (tag, event.step)  # no step logged twice
                tags[tag][event.step] = event.value
    return tags


def interrupt(tmp_path, bin_dir, record, signal: str):
    """A run of job 4242 that gets `signal` during step SIGNAL_AT: it saves the end of that step, requeues and
    exits."""
    sender = {"class_path": "helpers.SignalAtStep", "init_args": {"step": SIGNAL_AT, "signal": signal}}
    interrupted = fit(tmp_path, bin_dir, "4242", "requeued", sender)
    assert interrupted.returncode == 0, interrupted.stderr[-3000:]
    assert record.read_text().split() == ["requeue", "4242"]
    assert not list(tmp_path.glob("hpc_ckpt_*"))
    checkpoint = tmp_path / "slurm-4242/hpc_ckpt_1.ckpt"
    assert safe_load(checkpoint)["global_step"] == SIGNAL_AT
    assert sorted(losses(tmp_path / "requeued.txt")) == list(range(1, SIGNAL_AT + 1))  # no step begun after it
    assert "Traceback" not in interrupted.stderr
    return checkpoint


def test_sigterm_before_the_kill_also_requeues_at_the_step_end(tmp_path):
    interrupt(tmp_path, *fake_scontrol(tmp_path), "SIGTERM")


def test_time_limit_signal_mid_step_requeues_at_the_step_end_and_resumes_exactly(tmp_path):
    bin_dir, record = fake_scontrol(tmp_path)
    checkpoint = interrupt(tmp_path, bin_dir, record, "SIGUSR1")

    straight = fit(tmp_path, bin_dir, "5151", "straight")  # another job from the same folder starts afresh
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "Restoring states" not in straight.stdout + straight.stderr
    first_events = set((tmp_path / "runs/mim/version_4242").glob("events.out.tfevents.*"))
    resumed = fit(tmp_path, bin_dir, "4242", "requeued")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert str(checkpoint.relative_to(tmp_path)) in resumed.stdout + resumed.stderr
    assert not (tmp_path / "slurm-4242").exists()
    assert record.read_text().split() == ["requeue", "4242"]  # the finished run requeues nothing

    expected, got = losses(tmp_path / "straight.txt"), losses(tmp_path / "requeued.txt")
    assert sorted(got) == sorted(expected) == list(range(1, TOTAL + 1))
    for step in range(1, TOTAL + 1):
        assert abs(got[step] - expected[step]) <= 1e-6 * abs(expected[step]), (step, got[step], expected[step])
    versions = tmp_path / "runs/mim"
    assert sorted(path.name for path in versions.iterdir()) == ["version_4242", "version_5151"]
    assert set((versions / "version_4242").glob("events.out.tfevents.*")) - first_events  # the restart's own log
    logged_straight, logged_requeued = logged(versions / "version_5151"), logged(versions / "version_4242")
    assert logged_requeued.keys() == logged_straight.keys()
    for tag, values in logged_straight.items():
        assert sorted(logged_requeued[tag]) == sorted(values), tag
    for step, value in logged_straight["train/loss"].items():
        assert abs(logged_requeued["train/loss"][step] - value) <= 1e-6 * abs(value), step
    final_a = safe_load(versions / "version_5151/checkpoints/last.ckpt")["state_dict"]
    final_b = safe_load(versions / "version_4242/checkpoints/last.ckpt")["state_dict"]
    for name, value in final_a.items():
        torch.testing.assert_close(final_b[name], value, rtol=1e-6, atol=1e-7)
