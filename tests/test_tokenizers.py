"""Visual tokenizers: k-means (pixels, exported timm encoder, open_clip ModifiedResNet) and VQ-KD (released key
names); `lightning-mim tokenizer fit` / `encode`; precomputed ids as views[1]; clear errors."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lightning_mim.backbone import build_backbone
from lightning_mim.cli import main as cli_main
from lightning_mim.data import MIMDataModule, write_shards
from lightning_mim.eval.weights import save_encoder
from lightning_mim.targets import MissingExtraError, TokenizerConfig, build_tokenizer, centre_square_view
from lightning_mim.targets.kmeans import (
    KMeansTokenizer, build_extractor, load_codebook, open_clip_extractor, save_codebook,
)
from lightning_mim.targets.vqkd import load_vqkd_state


def brute_force_ids(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid by explicit float64 distances: features (..., d) -> (...)."""
    flat = features.reshape(-1, features.shape[-1]).double()
    return torch.cdist(flat, centroids.double()).argmin(dim=1).view(features.shape[:-1])


def loop_pixel_features(images: torch.Tensor, patch: int) -> torch.Tensor:
    """Per-patch pixels (row, column, channel order), zero mean / unit unbiased variance (+1e-6), by loops."""
    batch, chans, size, _ = images.shape
    grid = size // patch
    out = torch.empty(batch, grid, grid, patch * patch * chans, dtype=torch.float64)
    for b in range(batch):
        for i in range(grid):
            for j in range(grid):
                block = images[b, :, i * patch:(i + 1) * patch, j * patch:(j + 1) * patch].double()
                vector = block.permute(1, 2, 0).reshape(-1)
                out[b, i, j] = (vector - vector.mean()) / (vector.var(unbiased=True) + 1e-6).sqrt()
    return out


def pixel_codebook(path: Path, vocab: int = 16, patch: int = 4, chans: int = 1, size: int = 16,
                   seed: int = 1) -> Path:
    centroids = torch.randn(vocab, patch * patch * chans, generator=torch.Generator().manual_seed(seed))
    return save_codebook(centroids, path, {"kind": "kmeans", "features": "pixels", "weights": None,
                                           "input_size": size, "patch_size": patch, "in_chans": chans,
                                           "vocab_size": vocab, "dim": patch * patch * chans})


def image_folder(root: Path, per_class: int = 6, size: tuple[int, int] = (20, 24)) -> Path:
    """root/{train,val}/{a,b}/*.png: random RGB images (not square, so the centre-square crop matters)."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in ("a", "b"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(per_class):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")
    return root


# ------------------------------------------------------------------------------------------------ k-means: pixels

def test_pixel_tokenizer_ids_equal_brute_force_nearest_centroid(tmp_path: Path) -> None:
    tokenizer = build_tokenizer({"kind": "kmeans", "path": str(pixel_codebook(tmp_path / "cb.safetensors"))})
    assert (tokenizer.vocab_size, tokenizer.input_size, tokenizer.grid_size, tokenizer.in_chans) == (16, 16, (4, 4), 1)
    images = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    ids = tokenizer(images)
    assert ids.dtype == torch.int64 and ids.shape == (3, 4, 4)
    assert 0 <= int(ids.min()) and int(ids.max()) < 16 and len(ids.unique()) > 4
    assert torch.equal(ids, brute_force_ids(loop_pixel_features(images, 4), tokenizer.centroids))
    assert torch.equal(tokenizer(images), ids)  # deterministic
    # a patch equal to a centroid's pattern (any brightness / contrast) gets that centroid's id
    pattern = tokenizer.centroids[7].view(4, 4)
    images[0, 0, :4, :4] = 0.5 + 0.1 * pattern / pattern.abs().max()
    assert int(tokenizer(images)[0, 0, 0]) == 7


def test_codebook_round_trip_and_checkpoint_state_is_exact(tmp_path: Path) -> None:
    path = pixel_codebook(tmp_path / "cb.safetensors")
    centroids, meta = load_codebook(path)
    assert meta["features"] == "pixels" and meta["vocab_size"] == 16 and centroids.shape == (16, 16)
    tokenizer = build_tokenizer(TokenizerConfig(kind="kmeans", path=str(path)))
    assert not any(p.requires_grad for p in tokenizer.parameters()) and not tokenizer.train().training
    other = build_tokenizer({"kind": "kmeans", "path": str(pixel_codebook(tmp_path / "b.safetensors", seed=2))})
    images = torch.rand(2, 1, 16, 16)
    assert not torch.equal(other(images), tokenizer(images))
    other.load_state_dict(tokenizer.state_dict(), strict=True)  # a resumed run uses the checkpoint's codebook
    assert list(tokenizer.state_dict()) == ["centroids"]
    assert torch.equal(other(images), tokenizer(images))


def test_check_matches_and_bad_input(tmp_path: Path) -> None:
    tokenizer = build_tokenizer({"kind": "kmeans", "path": str(pixel_codebook(tmp_path / "cb.safetensors"))})
    tokenizer.check_matches(16, (4, 4))
    with pytest.raises(ValueError, match="head has 8192 classes but the tokenizer vocabulary has 16"):
        tokenizer.check_matches(8192, (4, 4))
    with pytest.raises(ValueError, match="4 x 4 id grid at 16 px but the backbone's patch grid is 8 x 8"):
        tokenizer.check_matches(16, (8, 8))
    with pytest.raises(ValueError, match=r"takes \[0, 1\] images of shape \(B, 1, 16, 16\), got \(2, 3, 16, 16\)"):
        tokenizer(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match="fitted on features 'pixels' but the tokenizer config asks for 'timm'"):
        build_tokenizer({"kind": "kmeans", "path": str(tmp_path / "cb.safetensors"), "features": "timm"})
    with pytest.raises(ValueError, match="fitted at 16 px but tokenizer.input_size is 32"):
        build_tokenizer({"kind": "kmeans", "path": str(tmp_path / "cb.safetensors"), "input_size": 32})
    with pytest.raises(ValueError, match="fitted on 4-px patches but tokenizer.patch_size is 8"):
        build_tokenizer({"kind": "kmeans", "path": str(tmp_path / "cb.safetensors"), "patch_size": 8})
    with pytest.raises(ValueError, match=r"cb.safetensors was fitted with vocab_size 16 \(the recipe: 512\): it is "
                                         r"not the codebook the recipe asks for. Fit that one with: lightning-mim "
                                         r"tokenizer fit \S+cb.safetensors --features pixels --vocab-size 512 "
                                         r"--source fashion_mnist"):
        build_tokenizer({"kind": "kmeans", "path": str(tmp_path / "cb.safetensors"), "vocab_size": 512})


def test_missing_codebook_prints_the_fit_command(tmp_path: Path) -> None:
    missing = tmp_path / "codebooks" / "fm.safetensors"
    with pytest.raises(FileNotFoundError, match=f"Create it with: lightning-mim tokenizer fit {missing} "
                                                f"--features pixels --patch-size 4 --input-size 32 --vocab-size 512 "
                                                f"--source fashion_mnist "):
        build_tokenizer({"kind": "kmeans", "path": str(missing), "input_size": 32, "patch_size": 4,
                         "vocab_size": 512})


# ------------------------------------------------------------------------------- k-means: timm / open_clip features

def test_exported_encoder_features_are_its_patch_tokens(tmp_path: Path) -> None:
    backbone = build_backbone(size="micro", img_size=16, patch_size=4, in_chans=1).eval()
    path = save_encoder(backbone.state_dict(), backbone.config, tmp_path / "encoder.safetensors")
    extractor = build_extractor("timm", str(path), mean=(0.25,), std=(0.5,)).eval()
    images = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        expected = backbone.forward_full((images - 0.25) / 0.5)[:, 1:].reshape(2, 4, 4, -1)
        assert torch.allclose(extractor(images), expected, atol=1e-6)
    assert extractor.grid(16) == (4, 4) and extractor.in_chans == 1


def tiny_open_clip(tmp_path: Path) -> str:
    """Register a small open_clip ModifiedResNet config (width 8, one block per stage, 64 px) under 'RNtiny'."""
    import open_clip
    config = {"embed_dim": 16, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},
              "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}
    (tmp_path / "RNtiny.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "RNtiny.json")
    return "RNtiny"


def test_open_clip_layer4_features_from_a_local_checkpoint(tmp_path: Path) -> None:
    """k-CLIP's code path on a small ModifiedResNet (RN50x64 at 448 px is too slow for the suite): random weights
    saved to a file and loaded back; features = open_clip's own layer-4 map before the attention pool."""
    import open_clip
    arch = tiny_open_clip(tmp_path)
    reference = open_clip.create_model(arch, pretrained=None).eval()
    torch.save(reference.state_dict(), tmp_path / "clip.pt")
    extractor = open_clip_extractor(arch, str(tmp_path / "clip.pt")).eval()
    assert (extractor.dim, extractor.image_size, extractor.grid(64)) == (256, 64, (2, 2))
    assert not any("attnpool" in key for key in extractor.state_dict())
    assert sum(key.startswith("visual.bn1.") for key in extractor.state_dict()) == 5  # the stem's batch norms too
    images = torch.rand(2, 3, 64, 64)
    mean, std = torch.tensor(open_clip.OPENAI_DATASET_MEAN), torch.tensor(open_clip.OPENAI_DATASET_STD)
    with torch.no_grad():
        layer4 = reference.visual.forward_intermediates((images - mean[:, None, None]) / std[:, None, None],
                                                        indices=[4], intermediates_only=True)
        expected = layer4["image_intermediates"][-1].permute(0, 2, 3, 1)
        assert torch.allclose(extractor(images), expected, atol=1e-5)
    centroids = torch.randn(8, 256)
    tokenizer = KMeansTokenizer(extractor, centroids, 64)
    assert torch.equal(tokenizer(images), brute_force_ids(expected, centroids))


def test_rn50x64_gives_4096d_14x14_at_448px() -> None:
    with torch.device("meta"):  # shapes only: the real tower has 420 M parameters
        extractor = open_clip_extractor("RN50x64", None, device="meta")
        features = extractor.features(torch.zeros(1, 3, 448, 448))
    assert (extractor.dim, extractor.image_size, extractor.grid(448)) == (4096, 448, (14, 14))
    assert features.shape == (1, 14, 14, 4096)


def test_missing_open_clip_names_the_pip_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(MissingExtraError, match=r"'open-clip-torch'.*pip install 'lightning_mim\[tokenizers\]'"):
        open_clip_extractor("RN50x64", None)


def test_missing_faiss_is_a_one_line_error_naming_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(SystemExit):
        cli_main(["tokenizer", "fit", str(tmp_path / "cb.safetensors"), "--source", "synthetic"])
    assert ("lightning-mim: error: lightning-mim tokenizer fit needs the Python package 'faiss-cpu', which is not "
            "installed: pip install 'lightning_mim[tokenizers]'") in capsys.readouterr().err


def test_fit_refuses_a_sample_larger_than_free_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_mim.targets import fit
    monkeypatch.setattr(fit, "available_memory", lambda: 2 ** 20)  # 1 MiB free; 512 x 256 x 16-d float32 = 8 MiB
    with pytest.raises(ValueError, match="needs 0.0 GiB of RAM but 0.0 GiB are free: lower --max-points"):
        fit.fit_codebook(tmp_path / "cb.safetensors", "pixels", 512, patch_size=4, source="synthetic",
                         num_workers=0)
    assert not (tmp_path / "cb.safetensors").exists()


# ------------------------------------------------------------------------------------------------------- VQ-KD

VQKD_TINY = dict(kind="vqkd", input_size=32, vqkd_embed_dim=64, vqkd_depth=1, vqkd_heads=2, vqkd_patch_size=8,
                 vqkd_vocab_size=32, vqkd_code_dim=8)


def released_vqkd_state(dim: int = 64, vocab: int = 32, code: int = 8, grid: int = 4, patch: int = 8
                        ) -> dict[str, torch.Tensor]:
    """A random state dict under the released checkpoint's key names (BEiT v2 modeling_vqkd.py), encoder depth 1,
    plus decoder / teacher / scaling / EMA entries that a tokenizer drops."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int, scale: float = 0.3) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    state = {"encoder.cls_token": rand(1, 1, dim), "encoder.pos_embed": rand(1, grid * grid + 1, dim),
             "encoder.patch_embed.proj.weight": rand(dim, 3, patch, patch, scale=0.05),
             "encoder.patch_embed.proj.bias": rand(dim)}
    block = "encoder.blocks.0."
    state |= {block + "norm1.weight": 1 + rand(dim), block + "norm1.bias": rand(dim),
              block + "attn.qkv.weight": rand(3 * dim, dim, scale=0.2), block + "attn.q_bias": rand(dim),
              block + "attn.v_bias": rand(dim), block + "attn.proj.weight": rand(dim, dim, scale=0.2),
              block + "attn.proj.bias": rand(dim), block + "norm2.weight": 1 + rand(dim),
              block + "norm2.bias": rand(dim),
              block + "mlp.fc1.weight": rand(4 * dim, dim, scale=0.2), block + "mlp.fc1.bias": rand(4 * dim),
              block + "mlp.fc2.weight": rand(dim, 4 * dim, scale=0.1), block + "mlp.fc2.bias": rand(dim),
              "encoder.fc_norm.weight": 1 + rand(dim), "encoder.fc_norm.bias": rand(dim),
              "encode_task_layer.0.weight": rand(dim, dim, scale=0.2), "encode_task_layer.0.bias": rand(dim),
              "encode_task_layer.2.weight": rand(code, dim), "encode_task_layer.2.bias": rand(code),
              "quantize.embedding.weight": F.normalize(rand(vocab, code), dim=1),
              "quantize.embedding.cluster_size": rand(vocab), "quantize.embedding.embed_avg": rand(vocab, code),
              "quantize.embedding.initted": torch.ones(1), "quantize.cluster_size": rand(vocab),
              "decoder.cls_token": rand(1, 1, dim), "decoder.blocks.0.norm1.weight": rand(dim),
              "decode_task_layer.2.weight": rand(512, dim), "teacher_model.visual.proj": rand(dim, 512),
              "scaling_layer.shift": rand(1, 3, 1, 1), "loss_fn.weight": rand(1)}
    return state


def reference_vqkd_ids(state: dict[str, torch.Tensor], images: torch.Tensor, heads: int = 2, patch: int = 8
                       ) -> torch.Tensor:
    """BEiT v2's encoder + task layer + argmax cosine, written from the released names (BEiT q/v biases)."""
    x = images * 2 - 1
    x = F.conv2d(x, state["encoder.patch_embed.proj.weight"], state["encoder.patch_embed.proj.bias"], stride=patch)
    batch, dim, h, w = x.shape
    x = torch.cat([state["encoder.cls_token"].expand(batch, -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
    x = x + state["encoder.pos_embed"]
    b = "encoder.blocks.0."
    y = F.layer_norm(x, (dim,), state[b + "norm1.weight"], state[b + "norm1.bias"], eps=1e-6)
    bias = torch.cat([state[b + "attn.q_bias"], torch.zeros(dim), state[b + "attn.v_bias"]])
    q, k, v = F.linear(y, state[b + "attn.qkv.weight"], bias).view(batch, -1, 3, heads, dim // heads).unbind(2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    attn = (q @ k.transpose(-1, -2) / math.sqrt(dim // heads)).softmax(-1)
    x = x + F.linear((attn @ v).transpose(1, 2).reshape(batch, -1, dim), state[b + "attn.proj.weight"],
                     state[b + "attn.proj.bias"])
    y = F.layer_norm(x, (dim,), state[b + "norm2.weight"], state[b + "norm2.bias"], eps=1e-6)
    y = F.linear(F.gelu(F.linear(y, state[b + "mlp.fc1.weight"], state[b + "mlp.fc1.bias"])),
                 state[b + "mlp.fc2.weight"], state[b + "mlp.fc2.bias"])
    x = x + y
    patches = F.layer_norm(x[:, 1:], (dim,), state["encoder.fc_norm.weight"], state["encoder.fc_norm.bias"], eps=1e-6)
    z = torch.tanh(F.linear(patches, state["encode_task_layer.0.weight"], state["encode_task_layer.0.bias"]))
    z = F.normalize(F.linear(z, state["encode_task_layer.2.weight"], state["encode_task_layer.2.bias"]), dim=-1)
    cosine = z @ state["quantize.embedding.weight"].T
    return cosine.argmax(-1).view(batch, h, w)


def test_vqkd_loads_released_key_names_and_ids_are_argmax_cosine(tmp_path: Path) -> None:
    state = released_vqkd_state()
    torch.save({"model": state}, tmp_path / "vqkd.pth")
    tokenizer = build_tokenizer({**VQKD_TINY, "path": str(tmp_path / "vqkd.pth")})
    assert (tokenizer.vocab_size, tokenizer.grid_size, tokenizer.in_chans, tokenizer.input_size) == (32, (4, 4), 3, 32)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    ids = tokenizer(images)
    assert ids.dtype == torch.int64 and len(ids.unique()) > 3
    assert torch.equal(ids, reference_vqkd_ids(state, images))
    # the report: dropped by rule (decoder, EMA statistics, teacher, scaling, loss), q/v biases fused
    report = load_vqkd_state(tmp_path / "vqkd.pth", tokenizer)
    assert set(report.dropped) == {"quantize.embedding.cluster_size", "quantize.embedding.embed_avg",
                                   "quantize.embedding.initted", "quantize.cluster_size", "decoder.cls_token",
                                   "decoder.blocks.0.norm1.weight", "decode_task_layer.2.weight",
                                   "teacher_model.visual.proj", "scaling_layer.shift", "loss_fn.weight"}
    assert report.renamed["quantize.embedding.weight"] == "codebook"
    fresh = build_tokenizer({**VQKD_TINY, "path": str(tmp_path / "vqkd.pth")})
    fresh.codebook.zero_()
    fresh.load_state_dict(tokenizer.state_dict(), strict=True)
    assert torch.equal(fresh(images), ids)


@pytest.mark.parametrize("change, message", [
    ({"vqkd_vocab_size": 64}, r"shape codebook: checkpoint \(32, 8\), tokenizer \(64, 8\)"),
    ({"vqkd_embed_dim": 32, "vqkd_heads": 2}, r"shape encoder.cls_token: checkpoint \(1, 1, 64\)"),
    ({"vqkd_depth": 2}, "missing encoder.blocks.1"),
])
def test_vqkd_checkpoint_of_another_shape_fails_clearly(tmp_path: Path, change: dict, message: str) -> None:
    torch.save({"model": released_vqkd_state()}, tmp_path / "vqkd.pth")
    with pytest.raises(ValueError, match=message):
        build_tokenizer({**VQKD_TINY, **change, "path": str(tmp_path / "vqkd.pth")})


def test_vqkd_unknown_and_missing_keys_fail(tmp_path: Path) -> None:
    state = released_vqkd_state()
    del state["encoder.fc_norm.weight"]
    state["encoder.norm.weight"] = torch.ones(64)
    torch.save({"state_dict": state}, tmp_path / "vqkd.pth")
    with pytest.raises(ValueError, match="missing encoder.fc_norm.weight; unexpected encoder.norm.weight"):
        build_tokenizer({**VQKD_TINY, "path": str(tmp_path / "vqkd.pth")})
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        build_tokenizer({**VQKD_TINY, "path": str(tmp_path / "absent.pth")})


def test_tokenizer_forward_reads_nothing_on_the_host(tmp_path: Path) -> None:
    from test_host_sync import RecordHostReads
    torch.save({"model": released_vqkd_state()}, tmp_path / "vqkd.pth")
    tokenizers = [build_tokenizer({**VQKD_TINY, "path": str(tmp_path / "vqkd.pth")}),
                  build_tokenizer({"kind": "kmeans", "path": str(pixel_codebook(tmp_path / "cb.safetensors"))})]
    for tokenizer in tokenizers:
        images = torch.rand(2, tokenizer.in_chans, tokenizer.input_size, tokenizer.input_size)
        record = RecordHostReads()
        with record:
            tokenizer(images)
        assert record.calls == []


# ------------------------------------------------------------------------------- tokenizer fit / encode / data

def test_fit_encode_and_datamodule_delivers_ids_as_views1(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = image_folder(tmp_path / "images")
    codebook = tmp_path / "cb.safetensors"
    cli_main(["tokenizer", "fit", str(codebook), "--features", "pixels", "--patch-size", "4", "--input-size", "16",
              "--vocab-size", "8", "--source", "imagefolder", "--data-dir", str(root), "--num-workers", "0",
              "--batch-size", "5", "--niter", "4", "--max-points", "100"])
    assert "fitted on 100 patches of 12 images" in capsys.readouterr().out
    centroids, meta = load_codebook(codebook)
    assert centroids.shape == (8, 48) and meta["grid"] == [4, 4] and meta["points"] == 100
    assert meta["source"]["source"] == "imagefolder" and meta["in_chans"] == 3 and meta["seed"] == 0
    tokenizer = build_tokenizer({"kind": "kmeans", "path": str(codebook)})
    view = centre_square_view(16, "RGB")
    with Image.open(root / "train" / "a" / "0.png") as image:
        pixels = view(image.convert("RGB"))
    expected = brute_force_ids(loop_pixel_features(pixels[None], 4), centroids)
    assert torch.equal(tokenizer(pixels[None]), expected)

    shards = write_shards(str(root / "train"), str(tmp_path / "wds" / "train-%03d.tar"), max_count=5, workers=1)
    out = tmp_path / "tok" / "train-%03d.tar"
    cli_main(["tokenizer", "encode", "--path", str(codebook), shards["pattern"], str(out), "--batch-size", "4"])
    assert "wrote 12 samples with ids in 3 shards (0 were already complete)" in capsys.readouterr().out
    cli_main(["tokenizer", "encode", "--path", str(codebook), shards["pattern"], str(out)])
    assert "(3 were already complete)" in capsys.readouterr().out

    pattern = str(tmp_path / "tok" / "train-{000..002}.tar")
    dm = MIMDataModule(source="webdataset", train_shards=pattern, batch_size=4, num_workers=0,
                       token_ids_key="tokens.npy", knn_bank_size=None)
    dm.bind(16, 3, lambda image: (view(image), view(image)))
    dm.setup("fit")
    assert dm.train_dataset_size == 12
    views, _ = next(iter(dm.train_dataloader()))
    assert views[1].dtype == torch.int64 and views[1].shape == (4, 4, 4)
    assert torch.equal(views[1], tokenizer(views[0]))  # stored ids == on-the-fly ids of the same samples

    plain = MIMDataModule(source="webdataset", train_shards=shards["pattern"], token_ids_key="tokens.npy",
                          num_workers=0)
    with pytest.raises(ValueError, match="holds no ids under that key.*lightning-mim tokenizer encode"):
        plain.setup("fit")
    with pytest.raises(ValueError, match="token_ids_key reads ids stored in WebDataset shards"):
        MIMDataModule(source="fashion_mnist", token_ids_key="tokens.npy")
    save_codebook(centroids.flip(0), codebook, meta)  # re-fitted at the same path: no resume into the old shards
    with pytest.raises(SystemExit):
        cli_main(["tokenizer", "encode", "--path", str(codebook), shards["pattern"], str(out)])
    assert "records shards encoded with other settings (tokenizer_sha256)" in capsys.readouterr().err


def test_tokenizer_benchmark_runs_on_the_cpu(tmp_path: Path) -> None:
    from benchmarks.tokenizers import main as bench_main
    bench_main(["--device", "cpu", "--kinds", "pixels", "--dtypes", "float32,bfloat16", "--batch", "8", "--steps",
                "1", "--warmup", "0", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "tokenizers.json").read_text())
    assert [(row["kind"], row["dtype"], row["grid"], row["vocab"]) for row in rows] == [
        ("pixels", "float32", [8, 8], 512), ("pixels", "bfloat16", [8, 8], 512)]
    assert "| pixels | float32 | 8 |" in (tmp_path / "tokenizers.md").read_text()
