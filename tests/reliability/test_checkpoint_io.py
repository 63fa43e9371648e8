"""Atomic checkpoint writes and weights-only loading."""
import stat
from pathlib import Path

import pytest
import torch
from conftest import MICRO

from lightning_mim.cli import run_cli
from lightning_mim.reliability import AtomicCheckpointIO, UnsafeCheckpointError, atomic_torch_save, safe_load


def test_failure_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "step": 1}, path)
    real_save = torch.save

    def half_then_fail(obj, handle, *args, **kwargs):
        real_save(obj, handle, *args, **kwargs)
        handle.seek(0)
        handle.truncate(handle.tell() // 2 + 10)
        raise OSError("disk full (injected)")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError, match="injected"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "step": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    loaded = io.load_checkpoint(path)
    assert loaded["step"] == 1 and torch.equal(loaded["state_dict"]["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_atomic_save_replaces_with_the_usual_permissions(tmp_path):
    atomic_torch_save({"a": 1}, tmp_path / "x.pt")
    atomic_torch_save({"a": 2}, tmp_path / "x.pt")
    assert safe_load(tmp_path / "x.pt") == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]
    (tmp_path / "plain").write_bytes(b"")
    assert stat.S_IMODE((tmp_path / "x.pt").stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode)


class _Payload:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_code_running_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "evil": _Payload(str(marker))}, tmp_path / "evil.ckpt")
    with pytest.raises(UnsafeCheckpointError, match="refused to load"):
        safe_load(tmp_path / "evil.ckpt")
    with pytest.raises(UnsafeCheckpointError):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "evil.ckpt")
    assert not marker.exists()


def test_cli_uses_atomic_io_and_own_checkpoints_load_weights_only(tmp_path):
    cli = run_cli(["fit", *MICRO, "--trainer.max_steps", "3", "--trainer.default_root_dir", str(tmp_path),
                   "--checkpoint.dirpath", str(tmp_path / "ckpt")])
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    last = tmp_path / "ckpt" / "last.ckpt"
    checkpoint = safe_load(last)
    assert checkpoint["global_step"] == 3 and "state_dict" in checkpoint
    assert not [p for p in last.parent.iterdir() if p.name.endswith(".tmp")]


def test_user_checkpoint_io_plugin_is_kept(tmp_path):
    cli = run_cli([*MICRO, "--trainer.max_steps", "1", "--trainer.default_root_dir", str(tmp_path),
                   "--trainer.plugins", "lightning.fabric.plugins.TorchCheckpointIO"], run=False)
    io = cli.trainer.strategy.checkpoint_io
    assert type(io).__name__ == "TorchCheckpointIO"


def test_cli_last_checkpoint_holds_the_final_step_after_an_earlier_save(tmp_path):
    # 8 steps an epoch, validation every second epoch: saves at steps 8 and 16, the run stops at step 19
    cli = run_cli(["fit", *MICRO, "--trainer.max_steps", "19", "--trainer.limit_val_batches", "1",
                   "--trainer.check_val_every_n_epoch", "2", "--trainer.default_root_dir", str(tmp_path),
                   "--checkpoint.dirpath", str(tmp_path / "ckpt")])
    assert cli.trainer.global_step == 19
    assert safe_load(tmp_path / "ckpt" / "last.ckpt")["global_step"] == 19
