"""crop_decode: a training JPEG's RandomResizedCrop decodes only its region (TurboJPEG 3 through ctypes), and gives
the pixels of a full decode cropped afterwards; files it cannot crop-decode decode whole, and unreadable ones are
still skipped and counted."""
import io
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from lightning_mim.data import MIMDataModule, jpeg_crop, write_shards
from lightning_mim.data.jpeg_crop import (CropDecoder, JPEGFile, RegionResizedCrop, decode_crop, decodes_crop_region,
                                          read_jpeg)
from lightning_mim.data.decode import TensorDecoder, decode_to_tensor
from lightning_mim.data.seeding import Transformed
from lightning_mim.data.shard_pipeline import webdataset_pipeline
from lightning_mim.data.skipping import SkipCounter, UnreadableImage
from lightning_mim.methods import LUT, MAE, BeyondMasking, SimMIM
from micro_methods import micro_method
from test_device_decode import write_folder

pytestmark = pytest.mark.skipif(jpeg_crop.turbojpeg() is None,
                                reason="no TurboJPEG 3: pip install 'lightning_mim[jpeg]' (make install does)")


def encode(pixels: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", **options)
    return buffer.getvalue()


def textured(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth colour regions plus noise, so that chroma varies between neighbouring pixels."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    noisy = np.asarray(coarse, np.float32) + rng.normal(0, 30, (height, width, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


FILES = {
    "4:4:4": encode(textured(69, 77), quality=90, subsampling=0),
    "4:2:2": encode(textured(69, 77), quality=90, subsampling=1),
    "4:2:0": encode(textured(69, 77), quality=90, subsampling=2),
    "4:2:0 progressive": encode(textured(69, 77), quality=90, subsampling=2, progressive=True),
    "grey": encode(textured(69, 77)[..., 0]),
}


@pytest.mark.parametrize("kind", list(FILES))
def test_the_region_decode_gives_the_pixels_of_the_full_decode_at_every_offset(kind):
    """Every top/left offset over two 16-px iMCUs (the left edge moves to an iMCU boundary, the chroma upsampling
    of the edge pixels reads beyond the crop), crops ending inside the image and at its edges, both modes."""
    data = FILES[kind]
    for mode in ("RGB", "L"):
        full = decode_to_tensor(data, mode)
        height, width = full.shape[1:]
        jpeg = read_jpeg(data, kind, mode)
        assert (jpeg.height, jpeg.width) == (height, width)
        for top, left in itertools.product(range(34), repeat=2):
            for crop_height, crop_width in ((5, 7), (height - top, width - left), (17, 33)):
                crop = decode_crop(jpeg, top, left, crop_height, crop_width)
                assert torch.equal(crop, full[:, top:top + crop_height, left:left + crop_width]), \
                    (mode, top, left, crop_height, crop_width)


@pytest.mark.parametrize("crop", [
    RegionResizedCrop(24, scale=(0.2, 1.0), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
    RegionResizedCrop(24, scale=(0.67, 1.0), antialias=True)], ids=["mae", "simmim"])
def test_region_resized_crop_draws_and_resizes_as_torchvision(crop):
    reference = v2.RandomResizedCrop(crop.size, scale=crop.scale, ratio=crop.ratio, interpolation=crop.interpolation,
                                     antialias=crop.antialias)
    data = encode(textured(61, 83, seed=1), quality=90)
    jpeg, full = read_jpeg(data, "x.jpg", "RGB"), decode_to_tensor(data, "RGB")
    for seed in range(20):
        torch.manual_seed(seed)
        expected = reference(full)
        torch.manual_seed(seed)
        assert torch.equal(crop(jpeg), expected), seed
        torch.manual_seed(seed)
        assert torch.equal(crop(full), expected)  # tensors and PIL images go to RandomResizedCrop itself


def test_files_that_cannot_be_crop_decoded_decode_whole(tmp_path, monkeypatch):
    decoder = CropDecoder("RGB")
    jpeg = FILES["4:2:0"]
    assert isinstance(decoder(jpeg, "a.jpg"), JPEGFile)
    png = io.BytesIO()
    Image.fromarray(textured(20, 30)).save(png, "PNG")
    assert torch.equal(decoder(png.getvalue(), "a.png"), decode_to_tensor(png.getvalue(), "RGB"))
    cmyk = io.BytesIO()
    Image.fromarray(textured(20, 30)).convert("CMYK").save(cmyk, "JPEG")
    assert read_jpeg(cmyk.getvalue(), "c.jpg", "RGB") is None
    assert torch.equal(decoder(cmyk.getvalue(), "c.jpg"), decode_to_tensor(cmyk.getvalue(), "RGB"))
    with pytest.raises(ValueError):  # truncated: no end marker, so the full decode rejects it in the reader
        decoder(jpeg[:len(jpeg) // 2], "t.jpg")
    monkeypatch.setattr(jpeg_crop, "turbojpeg", lambda: None)
    assert torch.equal(decoder(jpeg, "a.jpg"), decode_to_tensor(jpeg, "RGB"))


def test_a_decoder_warning_falls_back_to_the_full_decode():
    data = bytearray(FILES["4:2:0"])
    data[len(data) // 2:len(data) // 2 + 200] = bytes(200)  # corrupt entropy data: libjpeg-turbo warns
    jpeg = read_jpeg(bytes(data), "w.jpg", "RGB")
    with pytest.raises(RuntimeError):
        jpeg_crop.turbojpeg().decode_rgb(jpeg.data, 0, 0, jpeg.height, jpeg.width)
    expected = decode_to_tensor(bytes(data), "RGB")[:, 3:40, 5:50]
    assert torch.equal(decode_crop(jpeg, 3, 5, 37, 45), expected)


def test_the_views_of_mae_simmim_and_beyond_masking_take_jpeg_files():
    assert all(decodes_crop_region(micro_method(cls, img_size=16).loader_views())
               for cls in (MAE, SimMIM, BeyondMasking))
    assert not decodes_crop_region(micro_method(LUT, img_size=16).loader_views())
    assert not decodes_crop_region(v2.Compose([v2.PILToTensor(), v2.Resize(8), RegionResizedCrop(4)]))


def train_batches(root: Path, **kwargs) -> tuple[list[torch.Tensor], MIMDataModule]:
    model = micro_method(MAE, img_size=16)
    data = MIMDataModule(source="imagefolder", data_dir=str(root), batch_size=4, num_workers=0, knn_bank_size=None,
                         augment_on="device", **kwargs)
    data.bind(16, 3, model.loader_views(), augment_module=model)
    data.setup("fit")
    return [views for views, _ in data.train_dataloader()], data


def test_crop_decoding_loads_the_batches_of_full_decoding(tmp_path):
    root = write_folder(tmp_path, 12, png_every=13)
    cropped, data = train_batches(root)
    assert isinstance(data._file_decoder, CropDecoder)
    whole, data = train_batches(root, crop_decode=False)
    assert type(data._file_decoder) is TensorDecoder
    assert len(cropped) == 3 and all(torch.equal(a, b) for a, b in zip(cropped, whole))


def fail_in_the_crop(monkeypatch, broken: bytes) -> None:
    """The file `broken` fails in its crop decode, as if its entropy data did not decode, with or without the crop."""
    real_decode = jpeg_crop.decode_crop

    def decode(jpeg, *args):
        if jpeg.data == broken:
            raise UnreadableImage(jpeg.name, "corrupt data")
        return real_decode(jpeg, *args)

    monkeypatch.setattr(jpeg_crop, "decode_crop", decode)


def test_an_image_that_fails_in_the_crop_is_skipped_and_counted(tmp_path, monkeypatch):
    root = write_folder(tmp_path, 8, png_every=9)
    broken = sorted((root / "train").rglob("*.jpg"))[2]
    fail_in_the_crop(monkeypatch, broken.read_bytes())
    with pytest.warns(RuntimeWarning, match=f"skipped unreadable image .*{broken.name}: corrupt data"):
        batches, data = train_batches(root)
    assert sum(len(views) for views in batches) == 8 and data._counter.distinct == 1
    dataset = data.train_dataloader().dataset
    with pytest.raises(UnreadableImage):  # without a counter the error surfaces
        [Transformed(dataset.dataset, dataset.transform)[index] for index in range(8)]


def test_webdataset_skips_images_unreadable_in_the_crop(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "images", 6, png_every=7)
    write_shards(str(root / "train"), str(tmp_path / "train-%03d.tar"), max_count=6, workers=1)
    shard = str(tmp_path / "train-000.tar")
    fail_in_the_crop(monkeypatch, sorted((root / "train").rglob("*.jpg"))[3].read_bytes())
    counter = SkipCounter()
    views = micro_method(MAE, img_size=16).loader_views()
    with pytest.warns(RuntimeWarning, match="skipped unreadable"):
        samples = list(webdataset_pipeline([shard], views, counter, resampled=False, node_splitter=None,
                                           decode=CropDecoder("RGB")))
    assert len(samples) == 5 and counter.distinct == 1 and samples[0][0].shape == (3, 16, 16)
    bug = v2.Compose([v2.PILToTensor(), RegionResizedCrop(16), v2.Lambda(lambda image: 1 / 0)])
    with pytest.raises(ZeroDivisionError):  # anything but an unreadable image is a bug and is raised
        list(webdataset_pipeline([shard], bug, SkipCounter(), resampled=False, node_splitter=None,
                                 decode=CropDecoder("RGB")))
