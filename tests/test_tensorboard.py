"""What TensorBoard shows of a folder of runs: labelled image grids in every run (also without validation), loss
tags grouped by kind, HParams columns that are the union over the runs, superseded runs moved aside; and no
jsonargparse deprecation warning raised by our CLI code."""
import json
import os
import time
import warnings
from pathlib import Path

import pytest
import torch
from jsonargparse._deprecated import JsonargparseDeprecationWarning
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard import context
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins import base_plugin
from tensorboard.plugins.hparams import backend_context

from lightning_mim.callbacks.reconstruction import LABEL_WIDTH, MIN_TILE, labelled_grid
from lightning_mim.cli import run_cli
from lightning_mim.reproduce.hparams import remove_experiment_summaries, run_hparams, write_session
from lightning_mim.reproduce.plan import Plan, PlannedRun, Stage
from lightning_mim.reproduce.state import State
from lightning_mim.reproduce.superseded import move_superseded
from micro_methods import micro_cli_model

ROOT = Path(__file__).resolve().parents[1]


def test_cli_raises_no_jsonargparse_deprecation_warning_from_our_code(tmp_path, monkeypatch):
    monkeypatch.setenv("JSONARGPARSE_DEPRECATION_WARNINGS", "all")  # each time, not only once per process
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_cli(["--config", str(ROOT / "configs/trainer/cpu.yaml"), "--config",
                 str(ROOT / "configs/mae/vit_micro_p4_demo_fmnist.yaml"),
                 "--trainer.logger.init_args.save_dir", str(tmp_path)], run=False)
    ours = [f"{warning.filename}:{warning.lineno}: {warning.message}" for warning in caught
            if issubclass(warning.category, JsonargparseDeprecationWarning)
            and Path(warning.filename).resolve().is_relative_to(ROOT / "lightning_mim")]
    assert not ours


def test_labelled_grid_scales_tiles_and_labels_every_row():
    rows = [torch.full((3, 1, 8, 8), value) for value in (0.0, 0.5, 1.0)]
    grid = labelled_grid(rows, ["input", "masked", "prediction"]).numpy()
    scale, padding = MIN_TILE // 8, 2
    tile = 8 * scale + padding
    assert grid.shape == (3, 3 * tile + padding, LABEL_WIDTH + 3 * tile + padding)
    for index, value in enumerate((0, 128, 255)):
        band = slice(index * tile + padding, (index + 1) * tile)
        tiles = grid[:, band, LABEL_WIDTH + padding:]
        assert (tiles[:, :, : 8 * scale] == value).all()  # first tile of the row, scaled up
        label = grid[0, band, :LABEL_WIDTH]
        assert (label < 128).sum() > 20 and (label == 255).mean() > 0.8  # dark text on white


MICRO_FIT = ["--data.source", "synthetic", "--data.synthetic_size", "64", "--data.batch_size", "16",
             "--data.num_workers", "0", "--data.val_subset", "16", "--data.knn_bank_size", "32",
             "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
             "--trainer.log_every_n_steps", "1", "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0"]


@pytest.mark.parametrize("method, grids, losses", [
    ("MAE", {"val/reconstruction"}, {"train_pixel/loss_mim"}),
    ("BeyondMasking", {"val/reconstruction", "val/degradation"}, {"train_pixel/loss_centre", "train_pixel/loss_edge"}),
])
def test_a_run_without_validation_writes_its_grids_at_its_last_step(tmp_path, method, grids, losses):
    cli = run_cli(["fit", "--config", str(ROOT / "configs/trainer/cpu.yaml"), *micro_cli_model(method), *MICRO_FIT,
                   "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
                   "--checkpoint.dirpath", str(tmp_path / "checkpoints")])
    events = EventAccumulator(cli.trainer.logger.log_dir, size_guidance={"images": 0, "scalars": 0}).Reload()
    assert set(events.Tags()["images"]) == grids
    for tag in grids:
        (image,) = events.Images(tag)
        assert image.step == 3 and image.width > LABEL_WIDTH + 8 * MIN_TILE
    scalars = set(events.Tags()["scalars"])
    assert losses | {"train/loss"} <= scalars and not any(tag.startswith("train/loss_") for tag in scalars)
    written = {value.tag for path in Path(cli.trainer.logger.log_dir).glob("events.out.tfevents.*")
               for event in EventFileLoader(str(path)).Load() for value in event.summary.value}
    assert "_hparams_/experiment" not in written  # the CLI's logger writes no hp_metric, so no experiment summary


def micro_config(method: str, **init_args) -> dict:
    return {"model": {"class_path": f"lightning_mim.methods.{method}", "init_args": init_args},
            "data": {"source": "fashion_mnist", "batch_size": 256}, "trainer": {"max_steps": 300}}


def hparams_experiment(logdir: Path):
    """The experiment TensorBoard's HParams plugin serves for `logdir` (its backend, as the web page asks it)."""
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    backend = backend_context.Context(base_plugin.TBContext(
        logdir=str(logdir), data_provider=data_provider.MultiplexerDataProvider(multiplexer, str(logdir))))
    request = context.RequestContext()
    return backend.experiment_from_metadata(request, "", True, backend.hparams_metadata(request, ""),
                                            backend.hparams_from_data_provider(request, "", None))


def test_hparams_columns_are_the_union_over_the_runs(tmp_path):
    runs = {"mae/aaa": micro_config("MAE", norm_pix_loss=True, mask_ratio=0.75),
            "symmim/bbb": micro_config("SymMIM", con_level=2, mask_ratio=0.75)}
    for name, config in runs.items():
        method = config["model"]["class_path"].rpartition(".")[2]
        recipe = f"vit_micro_p4_demo_fmnist_{method.lower()}"
        # the older table writing of the first run: an experiment summary, which would hide the second's columns
        if name == "mae/aaa":
            old = TensorBoardLogger(str(tmp_path), name="mae", version="aaa", default_hp_metric=False)
            old.log_hyperparams({"model": config["model"]}, {"reproduce/knn_top1": 1.0})
            old.finalize("success")
            remove_experiment_summaries(tmp_path / name, {"reproduce/knn_top1"})
        write_session(tmp_path / name, run_hparams(config, recipe, {"seed": 0}, ("max_steps",)),
                      {"reproduce/knn_top1": 70.0 if method == "MAE" else 60.0})
    experiment = hparams_experiment(tmp_path)
    columns = {info.name: info.differs for info in experiment.hparam_infos}
    assert columns == {"method": True, "recipe": True, "seed": False, "model/norm_pix_loss": False,
                       "model/con_level": False, "model/mask_ratio": False, "data/source": False,
                       "data/batch_size": False, "trainer/max_steps": False}
    assert [info.name for info in experiment.hparam_infos][:2] == ["method", "recipe"]  # differing ones first
    assert {info.name.tag for info in experiment.metric_infos} == {"reproduce/knn_top1"}


def planned(store: Path, key: str, fingerprint: str, seed: int = 0) -> PlannedRun:
    label = key if seed == 0 else f"{key}/seed{seed}"
    run_dir = store / key / fingerprint
    stage = Stage(f"{label}/pretrain", ["fit"], fingerprint, run_dir / "pretrain.log")
    return PlannedRun(key, "MAE", "micro", (), run_dir, "", 1, ("knn",), [stage], seed)


def trained(run: PlannedRun, state: State, finished: float) -> None:
    """A finished pre-training: its folder, checkpoint (modified at `finished`) and state record."""
    checkpoint = run.checkpoint
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"")
    os.utime(checkpoint, (finished, finished))
    state.start(run.pretrain)
    state.finish(run.pretrain, "done", 1.0)


def test_older_runs_of_a_row_move_aside_unless_a_table_uses_them(tmp_path, capsys):
    store, state, now = tmp_path / "demo", State(tmp_path / "demo" / "state.json"), time.time()
    current, seed1 = planned(store, "mae", "new"), planned(store, "mae", "s1new", seed=1)
    older = planned(store, "mae", "old")  # replaced: moved
    in_lut = planned(store, "mae", "lutfp")  # older, but LUT's table uses it: kept
    newer = planned(store, "mae", "newer")  # trained after the current one (another table in progress): kept
    seed1_old = planned(store, "mae", "s1old", seed=1)  # seed 1's older run, while only seed 0 is planned: kept
    for run, age in ((older, 300), (in_lut, 200), (current, 100), (newer, 0), (seed1_old, 300), (seed1, 100)):
        trained(run, state, now - age)
    (store / "lut").mkdir()
    (store / "lut" / "table.json").write_text(json.dumps({"rows": [{"checkpoints": [str(in_lut.checkpoint)]}]}))
    plan = Plan("compare", "", None, store / "compare", store, [], [current])
    moved = move_superseded(plan, state)
    assert moved == [store / "superseded" / "mae" / "old"]
    assert (moved[0] / "checkpoints" / "last.ckpt").is_file() and not older.run_dir.exists()
    assert all(run.run_dir.is_dir() for run in (current, in_lut, newer, seed1_old, seed1))
    assert set(state.stages["mae/pretrain"]) == {"new", "lutfp", "newer"}  # the moved run is trained again if planned
    assert set(state.stages["mae/seed1/pretrain"]) == {"s1old", "s1new"}
    assert capsys.readouterr().out.count("superseded: ") == 1
    assert move_superseded(plan, state) == []  # nothing left to move
