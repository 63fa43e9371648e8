"""DDP with two CPU processes (gloo): when rank 1 dies mid-training, the run ends non-zero in bounded time, with the
collective timeout set through `--trainer.strategy.timeout`."""
import os
import subprocess
import time

import yaml
from conftest import MICRO, ROOT, cli_command


def test_dead_rank_ends_the_run(tmp_path):
    config = tmp_path / "die.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "helpers.DieOnRank", "init_args": {"rank": 1, "step": 2}}]}}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests/reliability")])}
    start = time.monotonic()
    result = subprocess.run(
        cli_command("fit", *MICRO, "--config", str(config), "--trainer.devices", "2",
                    "--trainer.strategy", "lightning.pytorch.strategies.DDPStrategy",
                    "--trainer.strategy.timeout", "0:00:30", "--trainer.max_steps", "20",
                    "--trainer.default_root_dir", str(tmp_path)),
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=180)
    elapsed = time.monotonic() - start
    assert "MEMBER: 2/2" in result.stdout + result.stderr, result.stderr[-3000:]
    assert result.returncode != 0, result.stderr[-3000:]
    assert elapsed < 120, elapsed
