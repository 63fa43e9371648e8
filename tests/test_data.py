"""Tests of lightning_mim.data: sources, DataModule loaders, skip counting, shard writer, DDP batch equality."""
from __future__ import annotations

import gzip
import io
import json
import random
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import webdataset as wds
import yaml
from PIL import Image
from torchvision import transforms

from lightning_mim.data import FASHION_MNIST_DIR, MIMDataModule, read_idx, write_shards
from lightning_mim.data.shards import main as make_shards_main

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------------- helpers


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def fake_fashion_mnist(root: Path, n_train: int = 12, n_test: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return root


def colour(i: int) -> tuple[int, int, int]:
    return (20 * i + 5, 255 - 15 * i, (37 * i) % 256)


def save_image(path: Path, rgb: tuple[int, int, int], size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), rgb).save(path)
    return path


def truncated_jpeg(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG", quality=95)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def pixel_id(batch: torch.Tensor) -> list[tuple[int, ...]]:
    """Top-left RGB value of each uint8 image in a batch."""
    return [tuple(int(v) for v in image[:, 0, 0]) for image in batch]


@pytest.fixture
def broken_folder(tmp_path: Path) -> tuple[Path, set[tuple[int, ...]]]:
    """train/ and val/ with classes cat and dog; train/ holds one corrupt and one truncated jpg, each between
    valid images so that each is tried exactly once per epoch."""
    valid = set()
    names = {"cat": ["a0.png", "a1.png", "b_corrupt.jpg", "c2.png"], "dog": ["d0.png", "e_truncated.jpg", "f1.png"]}
    i = 0
    for cls, files in names.items():
        for name in files:
            path = tmp_path / "train" / cls / name
            if "corrupt" in name:
                path.write_bytes(b"this is not an image")
            elif "truncated" in name:
                truncated_jpeg(path)
            else:
                save_image(path, colour(i))
                valid.add(colour(i))
                i += 1
        save_image(tmp_path / "val" / cls / "v.png", colour(20))
    return tmp_path, valid


def fake_trainer(rank: int, world: int, module: object = None) -> SimpleNamespace:
    return SimpleNamespace(global_rank=rank, world_size=world, lightning_module=module)


def image_folder(root: Path, count: int) -> Path:
    """`count` 8 x 8 images alternating between root/a_cat and root/b_dog; every fifth a JPEG, the others PNG."""
    for i in range(count):
        save_image(root / ("b_dog" if i % 2 else "a_cat") / f"img{i:02d}.{'jpg' if i % 5 == 0 else 'png'}", colour(i))
    return root


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def write_tar(path: Path, samples: list[dict]) -> Path:
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return path


def png_bytes(rgb: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), rgb).save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------- idx reader

def test_read_idx_exact_values(tmp_path: Path) -> None:
    images = np.array([[[0, 1, 2], [3, 4, 255]], [[10, 20, 30], [40, 50, 60]]], dtype=np.uint8)
    raw = bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 3]) + images.tobytes()
    (tmp_path / "img.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "lab").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 0, 9]))
    out = read_idx(tmp_path / "img.gz")
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out, images)
    assert read_idx(tmp_path / "lab").tolist() == [7, 0, 9]


@pytest.mark.parametrize("raw, message", [
    (bytes([1, 2, 8, 1, 0, 0, 0, 1, 5]), "bad magic"),
    (bytes([0, 0, 0x0D, 1, 0, 0, 0, 1, 5]), "type code"),
    (bytes([0, 0, 8, 1, 0, 0, 0, 4, 5, 6]), "declares shape"),
])
def test_read_idx_rejects_corrupt_files(tmp_path: Path, raw: bytes, message: str) -> None:
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_bad_gzip_names_file(tmp_path: Path) -> None:
    path = tmp_path / "x-ubyte.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="x-ubyte.gz"):
        read_idx(path)


# ------------------------------------------------------------------------------------------------ fashion_mnist

@pytest.mark.skipif(not Path(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz").is_file(),
                    reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist() -> None:
    dm = MIMDataModule(num_workers=0, batch_size=500, knn_bank_size=1000)
    dm.setup("fit")
    assert dm.train_dataset_size == 60000 and dm.num_classes == 10
    assert len(dm.val_dataloader().dataset) == 10000
    labels = dm.val_dataloader().dataset.dataset.labels
    assert np.bincount(labels).tolist() == [1000] * 10
    images, _ = next(iter(dm.val_dataloader()))
    assert images.shape == (500, 1, 28, 28)


def test_missing_fashion_mnist_explains_the_fix(tmp_path: Path) -> None:
    dm = MIMDataModule(data_dir=str(tmp_path / "nowhere"), num_workers=0)
    with pytest.raises(FileNotFoundError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert str(tmp_path / "nowhere") in message and "--data.data_dir" in message


def test_grey_image_becomes_rgb_for_three_channel_model(tmp_path: Path) -> None:
    root = fake_fashion_mnist(tmp_path)
    dm = MIMDataModule(data_dir=str(root), num_workers=0, batch_size=4)
    dm.setup("fit")
    dm.bind(image_size=28, in_chans=3, train_transform=None)
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (4, 3, 28, 28)
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])
    raw = read_idx(root / "t10k-images-idx3-ubyte.gz")[:4]
    expected = (torch.tensor(raw).float() / 255 - 0.2860) / 0.3530
    torch.testing.assert_close(images[:, 0], expected)
    assert labels.tolist() == [0, 1, 2, 3]


def test_resize_to_model_size(tmp_path: Path) -> None:
    dm = MIMDataModule(data_dir=str(fake_fashion_mnist(tmp_path)), num_workers=0, batch_size=4, drop_last=False)
    dm.setup("fit")
    dm.bind(image_size=32, in_chans=1)
    assert next(iter(dm.train_dataloader()))[0].shape == (4, 1, 32, 32)


# ------------------------------------------------------------------------------------------------ mean / std

def test_mean_std_expansion() -> None:
    fm = MIMDataModule(source="fashion_mnist")
    assert fm.mean_for(1) == pytest.approx((0.2860,)) and fm.mean_for(3) == pytest.approx((0.2860,) * 3)
    assert fm.std_for(3) == pytest.approx((0.3530,) * 3)
    im = MIMDataModule(source="imagefolder")
    assert im.mean_for(3) == pytest.approx((0.485, 0.456, 0.406))
    assert im.mean_for(1) == pytest.approx(((0.485 + 0.456 + 0.406) / 3,))
    assert im.std_for(1) == pytest.approx(((0.229 + 0.224 + 0.225) / 3,))
    assert MIMDataModule(source="synthetic").std_for(3) == pytest.approx((0.5,) * 3)
    custom = MIMDataModule(source="synthetic", mean=(0.1, 0.2))
    with pytest.raises(ValueError, match="2 values"):
        custom.mean_for(3)


# ---------------------------------------------------------------------------------------------------- synthetic

def test_synthetic_multi_view_transform_gives_two_tensors() -> None:
    dm = MIMDataModule(source="synthetic", synthetic_size=64, num_workers=0, batch_size=8)
    dm.setup("fit")
    to_tensor = transforms.ToTensor()
    dm.bind(32, 3, lambda image: (to_tensor(image), to_tensor(image).flip(-1)))
    views, labels = next(iter(dm.train_dataloader()))
    assert len(views) == 2 and views[0].shape == views[1].shape == (8, 3, 32, 32)
    assert torch.equal(views[0].flip(-1), views[1]) and labels.shape == (8,)


def test_train_transform_is_bound_from_the_lightning_module() -> None:
    seen = {}

    class Module:
        image_size, in_chans = 16, 1

        def train_transform(self, mean: tuple, std: tuple):
            seen.update(mean=mean, std=std)
            return transforms.Compose([transforms.Resize(16), transforms.PILToTensor()])

    dm = MIMDataModule(source="synthetic", synthetic_size=32, num_workers=0, batch_size=4)
    dm.trainer = fake_trainer(0, 1, Module())
    dm.setup("fit")
    assert seen == {"mean": (0.5,), "std": (0.5,)}
    views, _ = next(iter(dm.train_dataloader()))
    assert views.shape == (4, 1, 16, 16) and views.dtype == torch.uint8
    assert next(iter(dm.val_dataloader()))[0].shape == (4, 1, 16, 16)


def test_subsets_are_seeded_and_knn_bank_has_its_size() -> None:
    def make(seed: int) -> MIMDataModule:
        dm = MIMDataModule(source="synthetic", synthetic_size=200, train_subset=50, val_subset=20, knn_bank_size=37,
                           seed=seed, num_workers=0, batch_size=16)
        dm.setup("fit")
        return dm

    a, b, c = make(0), make(0), make(1)
    assert a.train_dataset_size == 50 and len(a.val_dataloader().dataset) == 20
    assert a._train_set.indices == b._train_set.indices != c._train_set.indices
    assert a._val_set.indices == b._val_set.indices
    assert a._knn_set.indices != a._train_set.indices[:37]
    images_a = torch.cat([x for x, _ in a.val_dataloader()])
    assert torch.equal(images_a, torch.cat([x for x, _ in b.val_dataloader()]))
    bank = [(x, y) for x, y in a.knn_bank_dataloader()]
    assert sum(len(y) for _, y in bank) == 37 and [len(y) for _, y in bank][-1] == 37 - 32
    again = torch.cat([y for _, y in a.knn_bank_dataloader()])
    assert torch.equal(torch.cat([y for _, y in bank]), again)


def test_synthetic_classes_are_learnable() -> None:
    dm = MIMDataModule(source="synthetic", synthetic_size=400, num_workers=0, batch_size=400, knn_bank_size=None)
    dm.setup("fit")
    bank, bank_labels = next(iter(dm.knn_bank_dataloader()))
    val, val_labels = next(iter(dm.val_dataloader()))
    nearest = torch.cdist(val.flatten(1), bank.flatten(1)).argmin(1)
    assert (bank_labels[nearest] == val_labels).float().mean() > 0.9


# -------------------------------------------------------------------------------------------------- imagefolder

def test_imagefolder_skips_counts_and_names_broken_images(broken_folder) -> None:
    root, valid = broken_folder
    dm = MIMDataModule(source="imagefolder", data_dir=str(root), num_workers=0, batch_size=2, drop_last=False)
    dm.setup("fit")
    assert dm.num_classes == 2 and dm.train_dataset_size == 7
    dm.bind(8, 3, transforms.PILToTensor())
    with pytest.warns(RuntimeWarning) as record:
        seen = [pid for images, _ in dm.train_dataloader() for pid in pixel_id(images)]
    assert len(seen) == 7 and set(seen) == valid
    assert dm.skipped_samples == 2
    messages = " ".join(str(w.message) for w in record)
    assert "b_corrupt.jpg" in messages and "e_truncated.jpg" in messages
    dm.bind(6, 1, None)
    val_images, val_labels = next(iter(dm.val_dataloader()))
    assert val_images.shape == (2, 1, 6, 6) and val_labels.tolist() == [0, 1]


def test_imagefolder_skip_counter_with_worker_processes(broken_folder) -> None:
    root, valid = broken_folder
    dm = MIMDataModule(source="imagefolder", data_dir=str(root), num_workers=2, batch_size=2, drop_last=False,
                       persistent_workers=False)
    dm.setup("fit")
    dm.bind(8, 3, transforms.PILToTensor())
    seen = [pid for images, _ in dm.train_dataloader() for pid in pixel_id(images)]
    assert set(seen) == valid
    assert dm.skipped_samples == 2


def test_each_broken_image_is_counted_and_named_once_over_epochs_passes_and_workers(broken_folder, capfd,
                                                                                     monkeypatch) -> None:
    # warnings print to stderr as outside pytest, whose recorder the forked loader workers would inherit and lose
    monkeypatch.setattr(warnings, "showwarning", lambda message, category, filename, lineno, file=None, line=None:
                        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line)))
    root, _ = broken_folder
    dm = MIMDataModule(source="imagefolder", data_dir=str(root), num_workers=2, batch_size=2, drop_last=False,
                       persistent_workers=False, knn_bank_size=None)
    dm.setup("fit")
    dm.bind(8, 3, transforms.PILToTensor())
    for epoch in range(2):
        dm.set_epoch(epoch)
        assert dm.skipped_samples_epoch == 0
        for loader in (dm.train_dataloader(), dm.knn_bank_dataloader(), dm.train_dataloader()):
            assert sum(len(labels) for _, labels in loader) == 7
        assert (dm.skipped_samples, dm.skipped_samples_epoch) == (2, 2)
    dm.set_epoch(1)  # the epoch goes on (e.g. set again after a resume): its count stays
    assert dm.skipped_samples_epoch == 2
    warned = [line for line in capfd.readouterr().err.splitlines() if "skipped unreadable" in line]
    assert [sum(name in line for line in warned) for name in ("b_corrupt.jpg", "e_truncated.jpg")] == [1, 1]


@pytest.mark.parametrize("layout, expected", [
    ("missing", "is not a directory"),
    ("empty", "is not a directory"),
    ("no_classes", "no class sub-folders"),
    ("no_images", "Found no valid file"),
])
def test_imagefolder_layout_errors(tmp_path: Path, layout: str, expected: str) -> None:
    root = tmp_path / "data"
    if layout != "missing":
        root.mkdir()
    if layout == "no_classes":
        save_image(root / "train" / "loose.png", colour(0))
    if layout == "no_images":
        (root / "train" / "cat").mkdir(parents=True)
    dm = MIMDataModule(source="imagefolder", data_dir=str(root), num_workers=0)
    with pytest.raises(FileNotFoundError, match=expected) as info:
        dm.setup("fit")
    assert str(root / "train") in str(info.value) and "DATA_DIR/train/<class>/<image>" in str(info.value)


def test_imagefolder_needs_data_dir() -> None:
    with pytest.raises(ValueError, match="--data.data_dir"):
        MIMDataModule(source="imagefolder").setup("fit")


# ------------------------------------------------------------------------------------------------- shard writer

def test_shard_writer_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = {}
    for i in range(7):
        cls = "b_dog" if i % 2 else "a_cat"
        path = save_image(src / cls / f"img{i}.{'png' if i < 5 else 'jpg'}", colour(i))
        files[path.read_bytes()] = (i % 2, path.suffix[1:])
    (src / "a_cat" / "zz_broken.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "shards"
    with pytest.warns(RuntimeWarning, match="zz_broken.png"):
        result = write_shards(str(src), str(out / "train-%04d.tar"), max_count=3, seed=3)
    assert result == {"written": 7, "skipped": 1, "shards": 3, "reused": 0, "classes": 2,
                      "pattern": str(out / "train-{0000..0002}.tar"), "manifest": str(out / "train-manifest.json")}
    assert json.loads((out / "classes.json").read_text()) == ["a_cat", "b_dog"]
    assert (out / "classes.txt").read_text() == "a_cat\nb_dog\n"
    manifest = json.loads((out / "train-manifest.json").read_text())
    assert manifest["complete"] and manifest["samples"] == 7 and manifest["classes"] == ["a_cat", "b_dog"]
    assert manifest["source"] == str(src.resolve()) and manifest["images"] == 8 and manifest["max_count"] == 3
    assert {name: entry["samples"] for name, entry in manifest["shards"].items()} == {
        name: sum(1 for _ in wds.WebDataset(str(out / name), shardshuffle=False))
        for name in ("train-0000.tar", "train-0001.tar", "train-0002.tar")}
    assert [entry["bytes"] for entry in manifest["shards"].values()] == [
        (out / name).stat().st_size for name in manifest["shards"]]

    stored = {}
    for shard in sorted(out.glob("*.tar")):
        for sample in wds.WebDataset(str(shard), shardshuffle=False):
            ext = next(k for k in ("png", "jpg") if k in sample)
            stored[sample[ext]] = (int(sample["cls"]), ext)
    assert stored == files

    dm = MIMDataModule(source="webdataset", train_shards=result["pattern"], val_shards=result["pattern"],
                       train_samples=7, num_workers=0, batch_size=3, knn_bank_size=None)
    dm.setup("fit")
    dm.bind(8, 3, transforms.PILToTensor())
    assert dm.num_classes == 2
    read_back = sorted((int(label), img.tobytes()) for x, y in dm.val_dataloader() for img, label in zip(x.numpy(), y))
    eval_transform = dm.eval_transform()
    expected = sorted((label, eval_transform(Image.open(io.BytesIO(data))).numpy().tobytes())
                      for data, (label, _) in files.items())
    assert read_back == expected
    bank_labels = sorted(int(y) for _, labels in dm.knn_bank_dataloader() for y in labels)
    assert bank_labels == sorted(label for label, _ in files.values())
    small = MIMDataModule(source="webdataset", train_shards=result["pattern"], val_shards=result["pattern"],
                          train_samples=7, num_workers=0, batch_size=3, knn_bank_size=5, val_subset=4)
    small.setup("fit")
    assert [len(y) for _, y in small.knn_bank_dataloader()] == [3, 2]
    assert [len(y) for _, y in small.val_dataloader()] == [3, 1]
    assert small.batch_size == 3


def test_make_shards_command_line(tmp_path: Path, capsys) -> None:
    for i in range(3):
        save_image(tmp_path / "src" / "only" / f"{i}.png", colour(i))
    command = [str(tmp_path / "src"), str(tmp_path / "out" / "s-%03d.tar"), "--max-count", "2", "--no-shuffle"]
    assert make_shards_main(command) == 0
    printed = capsys.readouterr()
    assert "wrote 3 samples of 1 classes in 2 shards" in printed.out
    assert str(tmp_path / "out" / "s-manifest.json") in printed.out
    assert "img/s" in printed.err  # the progress bar's rate
    first = next(iter(wds.WebDataset(str(tmp_path / "out" / "s-000.tar"), shardshuffle=False)))
    assert first["png"] == (tmp_path / "src" / "only" / "0.png").read_bytes()
    # the same command again finds both shards complete
    assert make_shards_main([*command, "--workers", "2"]) == 0
    assert "2 of 2 shards were already complete" in capsys.readouterr().out


def test_shards_are_identical_for_one_and_two_workers(tmp_path: Path) -> None:
    src = image_folder(tmp_path / "src", 11)
    (src / "a_cat" / "zz_broken.png").write_bytes(b"\x89PNG broken")
    outputs = []
    for workers in (1, 2):
        out = tmp_path / f"workers{workers}"
        with pytest.warns(RuntimeWarning, match="zz_broken.png"):
            result = write_shards(str(src), str(out / "train-%03d.tar"), max_count=4, workers=workers)
        assert (result["written"], result["skipped"], result["shards"]) == (11, 1, 3)
        outputs.append(folder_bytes(out))
    assert sorted(outputs[0]) == ["classes.json", "classes.txt", "train-000.tar", "train-001.tar", "train-002.tar",
                                  "train-manifest.json"]
    assert outputs[0] == outputs[1]


def test_make_shards_resumes_an_interrupted_run_by_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = image_folder(tmp_path / "src", 10)
    write_shards(str(src), str(tmp_path / "reference" / "train-%03d.tar"), max_count=4, workers=1)
    out = tmp_path / "out"
    pattern = str(out / "train-%03d.tar")

    # interrupted while writing the second shard (its first sample is in the tar stream)
    original_write = wds.TarWriter.write
    def interrupt_at_sample_6(writer: wds.TarWriter, sample: dict) -> int:
        if sample["__key__"] == f"{5:09d}":
            raise KeyboardInterrupt
        return original_write(writer, sample)
    with monkeypatch.context() as patch:
        patch.setattr(wds.TarWriter, "write", interrupt_at_sample_6)
        with pytest.raises(KeyboardInterrupt):
            write_shards(str(src), pattern, max_count=4, workers=1)
    assert sorted(folder_bytes(out)) == ["classes.json", "classes.txt", "train-000.tar", "train-manifest.json"]
    manifest = json.loads((out / "train-manifest.json").read_text())
    assert list(manifest["shards"]) == ["train-000.tar"] and not manifest["complete"]

    # what a killed writer without atomic renames would leave: a truncated last shard, and a stale temporary file
    (out / "train-002.tar").write_bytes((tmp_path / "reference" / "train-002.tar").read_bytes()[:700])
    (out / ".train-001.tar.x1y2.tmp").write_bytes(b"partial")
    first_shard = (out / "train-000.tar").stat().st_ino
    result = write_shards(str(src), pattern, max_count=4, workers=2)
    assert (result["reused"], result["written"], result["shards"]) == (1, 10, 3)
    assert (out / "train-000.tar").stat().st_ino == first_shard  # kept, not rewritten
    assert folder_bytes(out) == folder_bytes(tmp_path / "reference")


def test_make_shards_refuses_output_of_another_source_or_shard_size(tmp_path: Path) -> None:
    src, other = image_folder(tmp_path / "src", 6), image_folder(tmp_path / "other", 5)
    pattern = str(tmp_path / "out" / "train-%03d.tar")
    write_shards(str(src), pattern, max_count=4)
    with pytest.raises(ValueError, match=r"max_count=4 there, 3 now.*another OUT_PATTERN") as error:
        write_shards(str(src), pattern, max_count=3)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=f"source={src.resolve()}"):
        write_shards(str(other), pattern, max_count=4)
    with pytest.raises(ValueError, match="seed=0 there, 1 now"):
        write_shards(str(src), pattern, max_count=4, seed=1)
    save_image(src / "a_cat" / "new.png", colour(9))
    with pytest.raises(ValueError, match="images=6 there, 7 now"):
        write_shards(str(src), pattern, max_count=4)


# ---------------------------------------------------------------------------------------------------- webdataset

def test_webdataset_skips_broken_samples_and_truncated_shard(tmp_path: Path) -> None:
    write_tar(tmp_path / "good.tar", [{"__key__": f"g{i}", "png": png_bytes(colour(i)), "cls": i} for i in range(4)])
    write_tar(tmp_path / "broken.tar", [
        {"__key__": "nolabel_img", "txt": "no image here", "cls": 5},
        {"__key__": "badbytes", "jpg": b"not a jpeg", "cls": 6},
        {"__key__": "fine", "png": png_bytes(colour(7)), "cls": 7},
    ])
    big = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(big).save(buffer, format="PNG")
    truncated = write_tar(tmp_path / "truncated.tar", [
        {"__key__": f"t{i}", "png": buffer.getvalue(), "cls": 8} for i in range(3)])
    truncated.write_bytes(truncated.read_bytes()[: len(buffer.getvalue()) + 2000])

    dm = MIMDataModule(source="webdataset", train_shards=str(tmp_path / "{good,broken,truncated}.tar"),
                       val_shards=str(tmp_path / "{good,broken,truncated}.tar"), train_samples=8,
                       num_workers=0, batch_size=4)
    dm.setup("fit")
    dm.bind(8, 3, transforms.Compose([transforms.CenterCrop(8), transforms.PILToTensor()]))
    with pytest.warns(RuntimeWarning) as record:
        labels = [int(y) for _, batch in dm.val_dataloader() for y in batch]
    assert labels[:5] == [0, 1, 2, 3, 7] and set(labels[5:]) <= {8}
    assert dm.skipped_samples >= 3
    messages = " ".join(str(w.message) for w in record)
    assert "nolabel_img" in messages and "badbytes" in messages and "truncated.tar" in messages


def test_webdataset_missing_shards_and_arguments(tmp_path: Path) -> None:
    pattern = str(tmp_path / "train-{000..003}.tar")
    with pytest.raises(FileNotFoundError, match="train-"):
        MIMDataModule(source="webdataset", train_shards=pattern, train_samples=10).setup("fit")
    with pytest.raises(ValueError, match="--data.train_shards"):
        MIMDataModule(source="webdataset", train_samples=10).setup("fit")
    # shards without a make-shards manifest, and no train_samples
    with pytest.raises(ValueError, match=r"manifest.*--data.train_samples"):
        MIMDataModule(source="webdataset", train_shards=_uneven_shards(tmp_path)).setup("fit")


def test_webdataset_train_samples_come_from_the_shard_manifest(tmp_path: Path) -> None:
    src = image_folder(tmp_path / "src", 9)
    result = write_shards(str(src), str(tmp_path / "out" / "train-%03d.tar"), max_count=4)

    def train_samples(**kwargs) -> int:
        dm = MIMDataModule(**{"source": "webdataset", "batch_size": 2, **kwargs, "num_workers": 0})
        dm.setup("fit")
        assert len(dm.train_dataloader()) == dm.train_dataset_size // 2
        return dm.train_dataset_size

    assert train_samples(train_shards=result["pattern"]) == 9
    assert train_samples(train_shards=str(tmp_path / "out" / "train-{000..001}.tar")) == 8  # the shards named
    assert train_samples(train_shards=result["pattern"], train_samples=5) == 5  # an explicit value wins
    # the ImageNet preset takes the count from the manifest instead of assuming ImageNet's
    preset = yaml.safe_load((ROOT / "configs" / "data" / "imagenet_wds.yaml").read_text())["data"]
    assert train_samples(**{**preset, "train_shards": result["pattern"], "val_shards": None}) == 9

    with (tmp_path / "out" / "train-001.tar").open("ab") as shard:
        shard.write(b"\0" * 512)
    with pytest.raises(ValueError, match=r"train-001.tar.*changed.*make-shards.*--data.train_samples"):
        train_samples(train_shards=result["pattern"])


def _uneven_shards(tmp_path: Path) -> str:
    for shard, count in enumerate((10, 3, 1)):
        write_tar(tmp_path / f"s{shard}.tar", [
            {"__key__": f"{shard}_{i}", "png": png_bytes(colour(i)), "cls": shard} for i in range(count)])
    return str(tmp_path / "s{0..2}.tar")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_rank_gets_the_same_number_of_batches(tmp_path: Path, num_workers: int) -> None:
    pattern = _uneven_shards(tmp_path)
    counts, labels = [], []
    for rank in (0, 1):
        dm = MIMDataModule(source="webdataset", train_shards=pattern, val_shards=pattern, train_samples=14,
                           batch_size=2, num_workers=num_workers, persistent_workers=False, shuffle_buffer=4)
        dm.trainer = fake_trainer(rank, 2)
        dm.setup("fit")
        dm.bind(8, 3, transforms.PILToTensor())
        loader = dm.train_dataloader()
        batches = list(loader)
        assert len(loader) == 14 // (2 * 2)
        assert all(images.shape == (2, 3, 8, 8) for images, _ in batches)
        counts.append(len(batches))
        assert {int(y) for _, batch in batches for y in batch} <= {0, 1, 2}
        labels.append(sorted(int(y) for _, batch in dm.val_dataloader() for y in batch))
    assert counts == [3, 3]
    assert labels == [[0] * 10 + [2], [1] * 3]


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`")
def test_webdataset_loader_in_a_lightning_fit(tmp_path: Path) -> None:
    import lightning as L

    class Tiny(L.LightningModule):
        image_size, in_chans = 8, 3

        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(3 * 8 * 8, 3)
            self.steps = 0

        def train_transform(self, mean: tuple, std: tuple):
            return transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])

        def training_step(self, batch, batch_idx):
            images, labels = batch
            self.steps += 1
            return torch.nn.functional.cross_entropy(self.layer(images.flatten(1)), labels)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = MIMDataModule(source="webdataset", train_shards=_uneven_shards(tmp_path), train_samples=14, batch_size=2,
                       num_workers=0)
    model = Tiny()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    assert trainer.num_training_batches == 7 and model.steps == 14
    assert trainer.estimated_stepping_batches == 14


DDP_SCRIPT = """
import json, sys
import lightning as L
import torch
from torchvision import transforms
from lightning_mim.data import MIMDataModule


class Tiny(L.LightningModule):
    image_size, in_chans = 8, 3

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(192, 3)
        self.train_batches = self.val_batches = 0

    def train_transform(self, mean, std):
        return transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])

    def training_step(self, batch, batch_idx):
        self.train_batches += 1
        return torch.nn.functional.cross_entropy(self.layer(batch[0].flatten(1)), batch[1])

    def validation_step(self, batch, batch_idx):
        self.val_batches += 1
        self.log("val/mean", batch[0].mean(), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


if __name__ == "__main__":
    pattern, out = sys.argv[1], sys.argv[2]
    dm = MIMDataModule(source="webdataset", train_shards=pattern, val_shards=pattern, train_samples=14,
                       batch_size=2, num_workers=1)
    model = Tiny()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    with open(f"{out}.{trainer.global_rank}", "w") as f:
        json.dump([model.train_batches, model.val_batches], f)
"""


def test_real_ddp_fit_on_uneven_shards_ends_on_every_rank(tmp_path: Path) -> None:
    """Two CPU ranks (gloo) on shards of 10, 3 and 1 samples: the same train batch count, no hang at epoch end."""
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT)
    result = subprocess.run([sys.executable, str(script), _uneven_shards(tmp_path), str(tmp_path / "counts")],
                            capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    counts = [json.loads((tmp_path / f"counts.{rank}").read_text()) for rank in (0, 1)]
    assert [train for train, _ in counts] == [6, 6]
    assert sorted(val for _, val in counts) == [4, 12]


def test_seeded_generators_repeat_draws_and_restore_torch_state() -> None:
    from lightning_mim.data.seeding import sample_seed, seeded_generators

    torch.manual_seed(0)
    before = torch.get_rng_state()
    with seeded_generators(sample_seed(3, 1, 7)):
        first = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(torch.get_rng_state(), before)
    with seeded_generators(sample_seed(3, 1, 7)):
        again = (torch.rand(3), random.random(), np.random.rand())
    with seeded_generators(sample_seed(3, 2, 7)):
        other_epoch = torch.rand(3)
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]
    assert not torch.equal(first[0], other_epoch)
    assert len({sample_seed(0, epoch, index) for epoch in range(4) for index in range(5000)}) == 20000
