"""Exact resume: a run SIGKILLed after the checkpoint of step k and restarted (automatic resume from
`--checkpoint.dirpath/last.ckpt`) at an epoch boundary reproduces the per-step losses and final weights of an
uninterrupted run (mid-epoch the plain DataLoader reshuffles, so the data order is not exact there)."""
import os
import subprocess

import torch
import yaml
from conftest import MICRO, ROOT, cli_command

from lightning_mim.reliability import safe_load

TOTAL, KILL_AT = 12, 8


def run(tmp_path, name: str, callbacks: list[dict]) -> subprocess.CompletedProcess:
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests/reliability")])}
    return subprocess.run(
        cli_command("fit", *MICRO, "--config", str(config), "--seed_everything", "7",
                    "--data.synthetic_size", "64", "--trainer.max_steps", str(TOTAL),
                    "--trainer.default_root_dir", str(tmp_path / name),
                    "--checkpoint.dirpath", str(tmp_path / name / "ckpt"), "--checkpoint.every_n_train_steps", "1"),
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)


def losses(path) -> dict[int, float]:
    return {int(step): float(loss) for step, loss in (line.split() for line in path.read_text().splitlines())}


def test_sigkill_then_resume_matches_straight_run(tmp_path):
    straight = run(tmp_path, "straight", [{"class_path": "helpers.LossRecorder",
                                           "init_args": {"path": str(tmp_path / "straight.txt")}}])
    assert straight.returncode == 0, straight.stderr[-3000:]
    recorder = {"class_path": "helpers.LossRecorder", "init_args": {"path": str(tmp_path / "resumed.txt")}}
    killed = run(tmp_path, "resumed", [recorder, {"class_path": "helpers.KillAtStep", "init_args": {"step": KILL_AT}}])
    assert killed.returncode == -9
    resumed = run(tmp_path, "resumed", [recorder])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout

    expected, got = losses(tmp_path / "straight.txt"), losses(tmp_path / "resumed.txt")
    assert sorted(got) == list(range(1, TOTAL + 1)) == sorted(expected)
    for step in range(KILL_AT + 1, TOTAL + 1):
        assert abs(got[step] - expected[step]) <= 1e-6 * abs(expected[step]), (step, got[step], expected[step])
    final_a = safe_load(tmp_path / "straight" / "ckpt" / "last.ckpt")["state_dict"]
    final_b = safe_load(tmp_path / "resumed" / "ckpt" / "last.ckpt")["state_dict"]
    for name, value in final_a.items():
        torch.testing.assert_close(final_b[name], value, rtol=1e-6, atol=1e-7)
