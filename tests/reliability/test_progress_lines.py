"""Logs that are not a terminal (sbatch's `.out` file) get no progress bar, whose redraws flood them, but one text
line every `--progress.every_n_steps` steps (`TextProgress`); a bar typed on the command line is kept."""
import sys
from types import SimpleNamespace

import torch
from conftest import MICRO

from lightning_mim.callbacks import TextProgress
from lightning_mim.cli import run_cli


def test_a_line_every_n_steps_on_rank_zero_only_without_a_bar(capsys):
    progress = TextProgress(every_n_steps=4)
    trainer = SimpleNamespace(global_step=0, progress_bar_callback=None, is_global_zero=True, max_steps=10,
                              current_epoch=1)
    progress.on_train_start(trainer, None)
    for step in range(1, 11):
        trainer.global_step = step
        progress.on_train_batch_end(trainer, None, {"loss": torch.tensor(0.25 * step)}, None, step - 1)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(",")[:2] for line in lines] == [["step 4/10 (epoch 1)", " loss 1"],
                                                        ["step 8/10 (epoch 1)", " loss 2"]]
    assert all(line.endswith("steps/s") for line in lines)
    for other in (dict(is_global_zero=False), dict(progress_bar_callback=object())):
        silent = SimpleNamespace(**{**vars(trainer), "global_step": 12, **other})
        progress.on_train_batch_end(silent, None, {"loss": torch.tensor(1.0)}, None, 11)
    assert capsys.readouterr().out == ""


def test_no_bar_where_stdout_is_not_a_terminal_unless_typed(monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    assert run_cli([*MICRO, "--trainer.enable_progress_bar", "true"], run=False).trainer.progress_bar_callback
    micro = [word for word in MICRO if word != "--trainer.enable_progress_bar"]
    micro.remove("false")
    assert run_cli(micro, run=False).trainer.progress_bar_callback is None
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert run_cli(micro, run=False).trainer.progress_bar_callback is not None
