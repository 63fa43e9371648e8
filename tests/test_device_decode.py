"""decode_on "device": the workers hand over JPEG bytes, the training device decodes each batch in one decode_jpeg
call and crops it with the method's loader_views, each image with its own seed. On the CPU the same code runs with
the CPU decoder, so everything up to nvJPEG is tested here; the GPU command is in benchmarks/README.md."""
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

from lightning_mim.data import MIMDataModule
from lightning_mim.data.device_decode import EncodedImage, EncodedReader, _torch_seeded, decode_batch, decode_views
from lightning_mim.data.decode import decode_to_tensor
from lightning_mim.methods import LUT, MAE
from micro_methods import micro_method


def write_folder(root: Path, count: int = 12, png_every: int = 5, subsampling: int = -1) -> Path:
    """root/{train,val}/<2 classes>/ images of 20-40 px, every `png_every`-th one a PNG, the rest JPEGs (chroma
    `subsampling` as PIL takes it: -1 its default 4:2:0, 0 for 4:4:4)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", count), ("val", 4)):
        for index in range(n):
            folder = root / split / f"class_{index % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            height, width = (int(x) for x in rng.integers(20, 41, size=2))
            image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
            suffix = "png" if index % png_every == png_every - 1 else "jpg"
            image.save(folder / f"{index:03d}.{suffix}", quality=90, **({"subsampling": subsampling}
                                                                        if suffix == "jpg" else {}))
    return root


class FakeTrainer:
    training = True
    global_rank, world_size, accumulate_grad_batches = 0, 1, 1

    def __init__(self, module) -> None:
        self.lightning_module = module
        self.strategy = type("Strategy", (), {"root_device": torch.device("cpu")})()


def datamodule(root: Path, module, **kwargs) -> MIMDataModule:
    data = MIMDataModule(source="imagefolder", data_dir=str(root), batch_size=4, num_workers=0, knn_bank_size=4,
                         augment_on="device", decode_on="device", **kwargs)
    data.trainer = FakeTrainer(module)
    data.setup("fit")
    return data


def test_workers_hand_over_jpeg_bytes_and_decoded_pngs(tmp_path):
    reader = EncodedReader("RGB")
    jpeg = next((write_folder(tmp_path) / "train").rglob("*.jpg"))
    png = next((tmp_path / "train").rglob("*.png"))
    encoded = reader(jpeg.read_bytes(), str(jpeg))
    assert encoded.encoded and bytes(encoded.data.numpy()) == jpeg.read_bytes()
    decoded = reader(png.read_bytes(), str(png))
    assert not decoded.encoded and torch.equal(decoded.data, decode_to_tensor(png.read_bytes(), "RGB"))
    pixels = decode_batch([encoded, decoded], "RGB", torch.device("cpu"))
    assert torch.equal(pixels[0], decode_to_tensor(jpeg.read_bytes(), "RGB")) and pixels[1] is decoded.data
    grey = decode_batch([EncodedReader("L")(jpeg.read_bytes(), str(jpeg))], "L", torch.device("cpu"))[0]
    assert torch.equal(grey, decode_to_tensor(jpeg.read_bytes(), "L"))


def test_tensor_decoding_gives_the_pixels_of_pil(tmp_path):
    for path in sorted((write_folder(tmp_path) / "train").rglob("*.*")):
        with Image.open(path) as image:
            rgb = image.convert("RGB")
            for mode, reference in (("RGB", rgb), ("L", rgb.convert("L"))):
                assert torch.equal(decode_to_tensor(path.read_bytes(), mode), pil_to_tensor(reference)), (path, mode)


@pytest.mark.parametrize("method", [MAE, LUT], ids=lambda cls: cls.__name__)
def test_device_decoded_views_are_the_loader_views_of_each_image_with_its_seed(tmp_path, method):
    model = micro_method(method, img_size=16)
    data = datamodule(write_folder(tmp_path), model)
    images, labels = next(iter(data.train_dataloader()))
    assert isinstance(images, list) and all(isinstance(image, EncodedImage) for image in images)
    assert labels.shape == (4,)
    views, _ = data.on_before_batch_transfer((images, labels), 0)
    expected = []
    for image in images:
        pixels = decode_to_tensor(bytes(image.data.numpy()), "RGB") if image.encoded else image.data
        with _torch_seeded(image.seed):
            expected.append(model.loader_views()(pixels))
    if method is LUT:
        assert len(views) == 2 and views[0].dtype == torch.uint8 and views[0].shape == (4, 3, 16, 16)
        for got, want in zip(views, zip(*expected)):
            assert torch.equal(got, torch.stack(want))
    else:
        assert torch.equal(views, torch.stack(expected))
    # the seeds depend on (data.seed, epoch, index) only: a second loader gives the same ones
    again, _ = next(iter(datamodule(tmp_path, model).train_dataloader()))
    assert [image.seed for image in again] == [image.seed for image in images]
    assert len({image.seed for image in images}) == 4


def test_a_jpeg_that_does_not_decode_is_named(tmp_path):
    jpeg = next((write_folder(tmp_path) / "train").rglob("*.jpg"))
    data = jpeg.read_bytes()
    broken = EncodedImage(torch.frombuffer(bytearray(data[: len(data) // 3]), dtype=torch.uint8), True, 0, "bad.jpg")
    good = EncodedReader("RGB")(data, str(jpeg))
    with pytest.raises(ValueError, match="bad.jpg does not decode.*make-shards.*decode_on 'loader'"):
        decode_views([good, broken], lambda pixels: pixels[:, :8, :8], "RGB", torch.device("cpu"))


def test_decode_on_device_needs_device_views_and_files():
    with pytest.raises(ValueError, match="needs augment_on 'device' and source 'imagefolder' or 'webdataset'"):
        MIMDataModule(source="synthetic", decode_on="device")
    with pytest.raises(ValueError, match="needs augment_on 'device'"):
        MIMDataModule(source="imagefolder", data_dir="x", augment_on="loader", decode_on="device")
    with pytest.raises(ValueError, match="unknown decode_on 'gpu'"):
        MIMDataModule(source="imagefolder", data_dir="x", decode_on="gpu")


def test_lut_trains_with_decoding_on_the_training_device(tmp_path):
    model = micro_method(LUT, img_size=16, optim=dict(lr=1e-3, warmup_steps=1))
    data = MIMDataModule(source="imagefolder", data_dir=str(write_folder(tmp_path, count=16)), batch_size=4,
                         num_workers=1, persistent_workers=False, knn_bank_size=4, augment_on="device",
                         decode_on="device")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    teacher_before = [p.clone() for p in model.teacher.parameters()]
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 3
    assert any(not torch.equal(a, b) for a, b in zip(teacher_before, model.teacher.parameters()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nvjpeg_decodes_like_the_cpu_decoder_and_lut_trains_on_the_gpu(tmp_path):
    # 4:4:4 JPEGs: chroma upsampling, where nvJPEG and libjpeg-turbo differ (measured 13 levels on average on these
    # noise images at 4:2:0, a few on photographs), plays no part; their IDCTs differ by a level here and there
    root = write_folder(tmp_path, count=16, subsampling=0)
    files = sorted((root / "train").rglob("*.jpg"))
    images = [EncodedReader("RGB")(path.read_bytes(), str(path)) for path in files]
    for image, pixels in zip(images, decode_batch(images, "RGB", torch.device("cuda"))):
        cpu = decode_to_tensor(bytes(image.data.numpy()), "RGB")
        assert pixels.device.type == "cuda" and pixels.shape == cpu.shape
        assert (pixels.cpu().int() - cpu.int()).abs().float().mean() < 1.0
    model = micro_method(LUT, img_size=16, optim=dict(lr=1e-3, warmup_steps=1))
    data = MIMDataModule(source="imagefolder", data_dir=str(root), batch_size=4, num_workers=1,
                         persistent_workers=False, knn_bank_size=4, augment_on="device", decode_on="device")
    trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 3
