"""Exact resume: a run SIGKILLed after the checkpoint of step k, in the middle of an epoch, and restarted (automatic
resume from `--checkpoint.dirpath/last.ckpt`) reproduces the per-step losses and final weights of an uninterrupted
run; the training loader resumed from its state yields exactly the batches not yet seen, augmentations included."""
import os
import random
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, cli_command, micro_args

from lightning_mim.data import MIMDataModule
from lightning_mim.methods import MAE
from lightning_mim.reliability import RNGState, safe_load, seed_process

# 64 samples in batches of 16: 4 steps an epoch, so step 6 is the middle of the second epoch
TOTAL, KILL_AT = 12, 6


def start(tmp_path, name: str, callbacks: list[dict], method: str, *extra: str, total: int = TOTAL,
          samples: int = 64) -> subprocess.Popen:
    """The run in the background; its output goes to `<name>.stdout` / `.stderr`, so that no full pipe blocks it."""
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests/reliability")])}
    with (tmp_path / f"{name}.stdout").open("w") as stdout, (tmp_path / f"{name}.stderr").open("w") as stderr:
        return subprocess.Popen(
            cli_command("fit", *micro_args(method), "--config", str(config), "--seed_everything", "7",
                        "--data.synthetic_size", str(samples), "--trainer.max_steps", str(total),
                        "--trainer.default_root_dir", str(tmp_path / name),
                        "--checkpoint.dirpath", str(tmp_path / name / "ckpt"), "--checkpoint.every_n_train_steps",
                        "1", *extra),
            stdout=stdout, stderr=stderr, text=True, cwd=tmp_path, env=env)


def finish(process: subprocess.Popen, tmp_path, name: str) -> subprocess.CompletedProcess:
    try:
        process.wait(timeout=300)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, (tmp_path / f"{name}.stdout").read_text(),
                                       (tmp_path / f"{name}.stderr").read_text())


def run(tmp_path, name: str, callbacks: list[dict], method: str, *extra: str, total: int = TOTAL,
        samples: int = 64) -> subprocess.CompletedProcess:
    process = start(tmp_path, name, callbacks, method, *extra, total=total, samples=samples)
    return finish(process, tmp_path, name)


def losses(path) -> dict[int, float]:
    return {int(step): float(loss) for step, loss in (line.split() for line in path.read_text().splitlines())}


# LUT augments view 2 on the device (data.augment_on's default): those draws are restored with the RNG states
@pytest.mark.parametrize("method", ["MAE", "SimMIM", "SymMIM", "LUT", "BEiT", "MaPeT", "BeyondMasking"])
def test_sigkill_then_resume_matches_straight_run(tmp_path, method):
    # the straight run and the run to be killed are independent: they share the machine's cores
    straight = start(tmp_path, "straight", [{"class_path": "helpers.LossRecorder",
                                             "init_args": {"path": str(tmp_path / "straight.txt")}}], method)
    recorder = {"class_path": "helpers.LossRecorder", "init_args": {"path": str(tmp_path / "resumed.txt")}}
    killed = finish(start(tmp_path, "resumed", [recorder, {"class_path": "helpers.KillAtStep",
                                                           "init_args": {"step": KILL_AT}}], method),
                    tmp_path, "resumed")
    straight = finish(straight, tmp_path, "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert killed.returncode == -9
    resumed = run(tmp_path, "resumed", [recorder], method)
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


def rank_records(path) -> dict[int, tuple[float, str]]:
    return {int(step): (float(loss), digest) for step, loss, digest in (line.split() for line in
                                                                           path.read_text().splitlines())}


# Two CPU processes, 96 samples: 3 steps an epoch per rank, so step 7 is the middle of the third epoch. LUT draws
# masks and view-2 colour augmentations on the device; each rank has its own streams, and each resumes its own.
def test_ddp_ranks_draw_apart_and_each_resumes_its_own_stream(tmp_path):
    ddp = ("--trainer.devices", "2", "--trainer.strategy", "ddp")
    total, kill_at, samples = 9, 7, 96

    def recorder(name: str) -> dict:
        return {"class_path": "helpers.RankRecorder", "init_args": {"path": str(tmp_path / name)}}

    straight = run(tmp_path, "straight", [recorder("straight")], "LUT", *ddp, total=total, samples=samples)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = run(tmp_path, "resumed", [recorder("resumed"), {"class_path": "helpers.KillAtStep",
                                                             "init_args": {"step": kill_at}}], "LUT", *ddp,
                 total=total, samples=samples)
    assert killed.returncode == -9
    resumed = run(tmp_path, "resumed", [recorder("resumed")], "LUT", *ddp, total=total, samples=samples)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected = [rank_records(tmp_path / f"straight.{rank}") for rank in (0, 1)]
    got = [rank_records(tmp_path / f"resumed.{rank}") for rank in (0, 1)]
    for step in range(1, total + 1):
        assert expected[0][step][1] != expected[1][step][1], step  # the ranks' generators differ at every step
    for rank in (0, 1):
        assert sorted(got[rank]) == list(range(1, total + 1)) == sorted(expected[rank])
        for step in range(kill_at + 1, total + 1):
            (loss, digest), (want_loss, want_digest) = got[rank][step], expected[rank][step]
            assert digest == want_digest, (rank, step)
            assert abs(loss - want_loss) <= 1e-6 * abs(want_loss), (rank, step, loss, want_loss)


def draws() -> tuple[list[float], float, float]:
    return torch.rand(3).tolist(), random.random(), float(np.random.rand())


def test_rng_state_gives_each_rank_its_own_stream_and_its_own_saved_state(monkeypatch):
    states, expected = [], []
    for seed in (11, 22):
        seed_process(seed)
        states.append(RNGState().state_dict()["ranks"][0])
        expected.append(draws())

    one, rank1 = RNGState(), RNGState()
    monkeypatch.setenv("PL_GLOBAL_SEED", "5")
    seed_process(11)
    one.setup(SimpleNamespace(global_rank=0, world_size=1), None, "fit")
    assert draws() == expected[0]  # one process keeps its stream
    rank1.setup(SimpleNamespace(global_rank=1, world_size=2), None, "fit")
    seed_process(6)
    fresh = draws()
    rank1.setup(SimpleNamespace(global_rank=1, world_size=2), None, "fit")
    assert draws() == fresh  # rank r of a multi-process run: seed + r

    rank1.load_state_dict({"ranks": states})
    assert draws() == expected[1]
    one.load_state_dict(states[0])  # a checkpoint from before per-rank states
    assert draws() == expected[0]
    with pytest.warns(UserWarning, match="holds the random generator states of 1 process"):
        rank1.load_state_dict({"ranks": states[:1]})
    assert draws() == fresh


def augmented_loader(workers: int):
    data = MIMDataModule(source="synthetic", synthetic_size=40, synthetic_image_size=16, batch_size=4,
                         num_workers=workers, persistent_workers=False, knn_bank_size=8, val_subset=8, seed=3)
    model = MAE(backbone=dict(size="micro", img_size=16, patch_size=4), decoder_dim=32, decoder_depth=1,
                decoder_heads=2)
    data.bind(16, 3, model.train_transform(data.mean_for(3), data.std_for(3)))
    data.setup("fit")
    loader = data.train_dataloader()
    loader.sampler.set_epoch(1)
    return loader


@pytest.mark.parametrize("workers", [0, 2])
def test_train_loader_resumes_mid_epoch_with_the_unseen_batches(workers):
    straight = [images for images, _ in augmented_loader(workers)]
    assert len(straight) == 10
    first = augmented_loader(workers)
    iterator = iter(first)
    seen = [next(iterator)[0] for _ in range(3)]
    state = first.state_dict()
    torch.manual_seed(1234)  # the global generator must not matter
    resumed = augmented_loader(workers)
    resumed.load_state_dict(state)
    rest = [images for images, _ in resumed]
    assert len(seen) + len(rest) == len(straight)
    for got, expected in zip(seen + rest, straight):
        assert torch.equal(got, expected)
    other_epoch = augmented_loader(workers)
    other_epoch.sampler.set_epoch(2)
    assert not torch.equal(next(iter(other_epoch))[0], straight[0])
