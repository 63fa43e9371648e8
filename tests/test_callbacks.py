import io
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn as nn
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.trainer.states import TrainerFn
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, Dataset, TensorDataset

import lightning_mim.callbacks.throughput as throughput_module
from lightning_mim.callbacks import KNNMonitor, ModeGuard, ReconstructionImages, Throughput
from lightning_mim.eval import extract_features, knn_accuracy
from lightning_mim.callbacks.reconstruction import LABEL_WIDTH, MIN_TILE

# the fake teacher is in eval mode on purpose
pytestmark = pytest.mark.filterwarnings("ignore:Found .* module\\(s\\) in eval mode:UserWarning")

MEAN, STD = 0.5, 0.25
NUM_CLASSES, SIZE, BATCH = 5, 8, 8


def labelled_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class prototypes plus noise, (n, 1, 8, 8) in the normalised space, labels n % 5."""
    prototypes = torch.randn(NUM_CLASSES, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(n) % NUM_CLASSES
    noise = torch.randn(n, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    return prototypes[labels] + 0.5 * noise, labels


class TwoViews(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index]
        return (image, image.flip(-1)), self.labels[index]


class FakeData(L.LightningDataModule):
    """Follows the datamodule interface: val / k-NN bank loaders of (image, label), mean_for / std_for."""

    num_classes = NUM_CLASSES
    batch_size = BATCH

    def __init__(self) -> None:
        super().__init__()
        self.train_set = TwoViews(*labelled_images(64, seed=1))
        self.val_set = TensorDataset(*labelled_images(20, seed=2))
        self.bank_set = TensorDataset(*labelled_images(40, seed=3))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=BATCH, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=BATCH)

    def knn_bank_dataloader(self) -> DataLoader:
        return DataLoader(self.bank_set, batch_size=BATCH)

    def mean_for(self, in_chans: int) -> tuple[float, ...]:
        return (MEAN,) * in_chans

    def std_for(self, in_chans: int) -> tuple[float, ...]:
        return (STD,) * in_chans


class FakeMethod(L.LightningModule):
    """A linear encoder over flattened pixels and a learnable teacher that stays in eval mode."""

    in_chans = 1

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(SIZE * SIZE, 16), nn.Dropout(0.1))
        self.teacher = nn.Sequential(nn.Flatten(), nn.Linear(SIZE * SIZE, 16), nn.Dropout(0.1)).eval()
        self.modes_in_training_step: list[dict[str, bool]] = []
        self.extract_modes: list[bool] = []

    def modes(self) -> dict[str, bool]:
        return {name: module.training for name, module in self.named_modules()}

    def training_step(self, batch, batch_idx):
        (first, second), _ = batch
        self.modes_in_training_step.append({"epoch": self.current_epoch, **self.modes()})
        return (self.encoder(first) - self.teacher(second)).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        images, _ = batch
        self.log("val/loss", self.encoder(images).pow(2).mean())

    def extract_features(self, images: torch.Tensor) -> torch.Tensor:
        self.extract_modes.append(any(module.training for module in self.modules()))
        return self.encoder(images)

    def reconstruct(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        mask = torch.zeros_like(images)
        mask[..., : SIZE // 2, :] = 1.0  # the top half is masked and predicted as ones
        masked = images * (1 - mask)
        return {"input": images, "masked": masked, "reconstruction": masked + mask}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("run")
    knn = KNNMonitor(k=5, temperature=0.1)
    reconstruction = ReconstructionImages(num_images=4)
    throughput = Throughput(log_every_n_steps=3, warmup_steps=2)
    logger = TensorBoardLogger(str(directory), name="fake", default_hp_metric=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=2, limit_train_batches=6, logger=logger,
                        callbacks=[knn, reconstruction, throughput], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    model, data = FakeMethod(), FakeData()
    trainer.fit(model, datamodule=data)
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return SimpleNamespace(trainer=trainer, model=model, data=data, knn=knn, throughput=throughput, events=events)


def test_knn_top1_is_logged_and_matches_a_hand_computation(fitted):
    model, data = fitted.model, fitted.data
    model.eval()
    bank, bank_labels = extract_features(model.extract_features, data.knn_bank_dataloader(), "cpu")
    test, test_labels = extract_features(model.extract_features, data.val_dataloader(), "cpu")
    expected = knn_accuracy(bank, bank_labels, test, test_labels, NUM_CLASSES, k=5, temperature=0.1)
    assert fitted.knn.last == pytest.approx(expected)
    metrics = fitted.trainer.callback_metrics
    assert metrics["val/knn_top1"].item() == pytest.approx(expected["top1"])
    assert metrics["val/knn_top5"].item() == pytest.approx(expected["top5"])
    scalars = fitted.events.Scalars("val/knn_top1")
    assert len(scalars) == 2  # once per epoch, none in the sanity check
    assert scalars[-1].value == pytest.approx(expected["top1"])
    assert "val/knn_top5" in fitted.events.Tags()["scalars"]


def test_submodule_modes_survive_validation(fitted):
    model = fitted.model
    assert model.extract_modes and not any(model.extract_modes)  # features always extracted in eval mode
    second_epoch = [modes for modes in model.modes_in_training_step if modes.pop("epoch") == 1]
    assert second_epoch
    for modes in second_epoch:
        assert not any(training for name, training in modes.items() if name.startswith("teacher"))
        assert all(training for name, training in modes.items() if not name.startswith("teacher"))


def test_reconstruction_grid_in_tensorboard(fitted):
    images = fitted.events.Images("val/reconstruction")
    assert len(images) == 2
    assert [event.step for event in images] == [6, 12]
    padding, scale = 2, MIN_TILE // SIZE  # make_grid's padding; 8x8 tiles scaled up to 64x64 (nearest)
    tile = SIZE * scale + padding
    assert (images[-1].width, images[-1].height) == (LABEL_WIDTH + 4 * tile + padding, 3 * tile + padding)
    grid = np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)).convert("RGB")).astype(float)
    first_input = (fitted.data.val_set.tensors[0][0, 0] * STD + MEAN).clamp(0, 1).numpy() * 255
    left = LABEL_WIDTH + padding
    rows = [grid[row * tile + padding:(row + 1) * tile, left:left + SIZE * scale, 0][::scale, ::scale]
            for row in range(3)]
    np.testing.assert_allclose(rows[0], first_input, atol=1.0)
    top, bottom = slice(0, SIZE // 2), slice(SIZE // 2, SIZE)
    np.testing.assert_allclose(rows[1][top], np.full((SIZE // 2, SIZE), MEAN * 255), atol=1.0)  # zeroed input
    np.testing.assert_allclose(rows[2][top], np.full((SIZE // 2, SIZE), (STD + MEAN) * 255), atol=1.0)
    np.testing.assert_allclose(rows[1][bottom], first_input[bottom], atol=1.0)
    np.testing.assert_allclose(rows[2][bottom], first_input[bottom], atol=1.0)


def test_throughput_logged_at_each_boundary(fitted):
    history = fitted.throughput.history
    # 12 training batches, 2 of warm-up, then a record every 3 batches
    assert [record["step"] for record in history] == [5, 8, 11]
    scalars = fitted.events.Scalars("train/throughput_img_s")
    assert [event.step for event in scalars] == [5, 8, 11]
    assert all(event.value > 0 for event in scalars)
    for record, event in zip(history, scalars):
        assert event.value == pytest.approx(record["train/throughput_img_s"], rel=1e-6)
        assert record["train/throughput_img_s_per_device"] == record["train/throughput_img_s"]  # one device


def test_mode_guard_restores_every_flag():
    model = FakeMethod()
    model.encoder[2].eval()
    before = model.modes()
    with ModeGuard(model):
        assert not any(module.training for module in model.modules())
    assert model.modes() == before
    with pytest.raises(KeyError), ModeGuard(model):
        raise KeyError("restored on errors too")
    assert model.modes() == before


def stub_trainer(**overrides) -> SimpleNamespace:
    values = dict(sanity_checking=False, state=SimpleNamespace(fn=TrainerFn.FITTING), current_epoch=0,
                  global_rank=0, world_size=1, is_global_zero=True, global_step=0, loggers=[],
                  datamodule=FakeData(), precision_plugin=Precision())
    values.update(overrides)
    return SimpleNamespace(**values)


def test_knn_monitor_hook_logs_per_rank_and_restores_modes(monkeypatch):
    model = FakeMethod()
    logged = {}
    monkeypatch.setattr(model, "log", lambda name, value, **kwargs: logged.update({name: (value, kwargs)}))
    before = model.modes()
    KNNMonitor(k=3).on_validation_epoch_end(stub_trainer(), model)
    assert model.modes() == before and model.teacher.training is False and model.encoder.training is True
    assert set(logged) == {"val/knn_top1", "val/knn_top5"}
    assert all(kwargs == {"sync_dist": False, "rank_zero_only": False} for _, kwargs in logged.values())


@pytest.mark.parametrize("every, epoch, sanity, fn, runs", [
    (1, 0, True, TrainerFn.FITTING, False),
    (2, 0, False, TrainerFn.FITTING, False),
    (2, 1, False, TrainerFn.FITTING, True),
    (2, 0, False, TrainerFn.VALIDATING, True),
])
def test_knn_monitor_schedule(every, epoch, sanity, fn, runs):
    model = FakeMethod()
    trainer = stub_trainer(current_epoch=epoch, sanity_checking=sanity, state=SimpleNamespace(fn=fn))
    model.log = lambda *args, **kwargs: None
    KNNMonitor(every_n_epochs=every).on_validation_epoch_end(trainer, model)
    assert bool(model.extract_modes) == runs


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_throughput_arithmetic_and_syncs_only_at_window_edges(monkeypatch):
    clock, syncs = FakeClock(), []
    monkeypatch.setattr(throughput_module.time, "perf_counter", clock)
    monkeypatch.setattr(throughput_module.torch.cuda, "synchronize", lambda device=None: syncs.append(clock.now))

    class Logger:
        def __init__(self) -> None:
            self.records = []

        def log_metrics(self, metrics, step):
            self.records.append((step, metrics))

    logger = Logger()
    trainer = stub_trainer(world_size=4, loggers=[logger])
    module = SimpleNamespace(device=torch.device("cuda"))  # only the sync branch needs a CUDA device
    callback = Throughput(log_every_n_steps=2, warmup_steps=1)
    callback.on_train_start(trainer, module)
    views = (torch.zeros(10, 1, 2, 2), torch.zeros(10, 1, 2, 2))
    for step in range(1, 6):  # batches end at t = 1, 2, 3, 4, 5 s; validation 100 s long after the third
        clock.now += 1.0
        trainer.global_step = step
        callback.on_train_batch_end(trainer, module, None, (views, None), step - 1)
        if step == 3:
            callback.on_validation_start(trainer, module)
            clock.now += 100.0
            callback.on_validation_end(trainer, module)
    # warm-up ends at t=1; window 1: batches 2-3, 2 s; window 2: batches 4-5, 2 s of training around validation
    assert [step for step, _ in logger.records] == [3, 5]
    for _, metrics in logger.records:
        assert metrics == {"train/throughput_img_s": 40.0, "train/throughput_img_s_per_device": 10.0}
    assert [record["step"] for record in callback.history] == [3, 5]
    # synced at the end of warm-up, each logging step and the two validation edges: never in steps 2 or 4
    assert syncs == [1.0, 3.0, 3.0, 103.0, 105.0]


def test_last_checkpoint_holds_the_final_step_when_training_stops_mid_epoch(tmp_path):
    from lightning_mim.callbacks import MIMCheckpoint
    from lightning_mim.data import MIMDataModule
    from lightning_mim.methods import MAE

    model = MAE(backbone=dict(size="micro", img_size=32, patch_size=4), decoder_dim=32, decoder_depth=1,
                decoder_heads=2, optim=dict(lr=1e-3, warmup_steps=1))
    data = MIMDataModule(source="synthetic", synthetic_size=128, batch_size=16, num_workers=0)
    checkpoint = MIMCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = L.Trainer(max_steps=19, accelerator="cpu", logger=False, callbacks=[checkpoint],
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=1, check_val_every_n_epoch=2)
    # 8 steps per epoch, validation every second epoch; the run stops mid-epoch at step 19
    trainer.fit(model, data)
    saved = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 19
    assert torch.equal(saved["state_dict"]["backbone.cls_token"], model.backbone.cls_token.detach())
