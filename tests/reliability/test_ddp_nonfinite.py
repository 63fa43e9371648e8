"""DDP with two CPU processes (gloo): a NaN loss on one rank skips the step on both, and the ranks stay identical."""
import os
import subprocess

import yaml
from conftest import MICRO, ROOT, cli_command


def test_nan_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    record = tmp_path / "changes"
    config = tmp_path / "poison.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "helpers.PoisonOnRank", "init_args": {"rank": 1, "step": 2}},
        {"class_path": "helpers.RecordParameterChanges", "init_args": {"path": str(record)}}]}}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests/reliability")])}
    result = subprocess.run(
        cli_command("fit", *MICRO, "--config", str(config), "--trainer.devices", "2", "--trainer.strategy", "ddp",
                    "--trainer.max_steps", "4", "--trainer.log_every_n_steps", "50", "--model.optim.warmup_steps", "0",
                    "--trainer.default_root_dir", str(tmp_path)),
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [[line.split() for line in (tmp_path / f"changes.{rank}").read_text().splitlines()] for rank in (0, 1)]
    for lines in ranks:
        assert [(step, changed) for step, changed, _ in lines] == [("1", "1"), ("2", "1"), ("3", "0"), ("4", "1")]
    assert [total for _, _, total in ranks[0]] == [total for _, _, total in ranks[1]]
