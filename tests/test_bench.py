"""The benchmark's FLOP counting matches hand counts, and a tiny run writes a complete report."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from benchmarks.bench import main
from benchmarks.decoders import DECODERS
from benchmarks.flops import count_flops
from benchmarks.methods import available_methods, bench_methods, build_method
from lightning_mim.methods import MAE


def vit_blocks_flops(tokens: int, width: int, depth: int) -> int:
    """Forward matmul FLOPs of `depth` pre-norm ViT blocks (mlp ratio 4) on one sequence: qkv, attention
    (Q K^T and P V), output projection, MLP."""
    return depth * (2 * tokens * width * (3 * width + width + 8 * width) + 4 * tokens * tokens * width)


def mae_flops_per_image(method: MAE) -> tuple[int, int]:
    """(forward, forward + backward) matmul FLOPs of one image through MAE, from its layer sizes."""
    backbone, decoder = method.backbone, method.decoder
    patches, width = backbone.num_patches, backbone.embed_dim
    patch_dim = backbone.patch_size ** 2 * method.in_chans
    kept = 1 + round(patches * (1 - method.mask_ratio))
    decoder_width, decoder_tokens = decoder.embed.out_features, 1 + patches
    patch_embed = 2 * patches * width * patch_dim
    forward = (patch_embed + vit_blocks_flops(kept, width, len(backbone.blocks))
               + 2 * kept * width * decoder_width
               + vit_blocks_flops(decoder_tokens, decoder_width, len(decoder.blocks))
               + 2 * decoder_tokens * decoder_width * patch_dim)
    # backward doubles every product, except the patch embedding, whose input (the images) needs no gradient
    return forward, 3 * forward - patch_embed


def test_count_flops_linear_is_2mnk_forward_and_twice_that_backward() -> None:
    m, k, n = 8, 16, 32
    layer = torch.nn.Linear(k, n)
    inputs = torch.randn(m, k, requires_grad=True)
    with torch.no_grad():
        assert count_flops(lambda: layer(inputs)) == 2 * m * n * k
    assert count_flops(lambda: layer(inputs).sum().backward()) == 3 * 2 * m * n * k


def test_count_flops_counts_cpu_attention_forward_and_backward() -> None:
    query = torch.randn(2, 3, 10, 8, requires_grad=True)
    key, value = torch.randn(2, 3, 12, 8, requires_grad=True), torch.randn(2, 3, 12, 8, requires_grad=True)
    forward = 2 * 2 * 3 * 10 * 12 * (8 + 8)
    attention = torch.nn.functional.scaled_dot_product_attention
    assert count_flops(lambda: attention(query, key, value)) == forward
    assert count_flops(lambda: attention(query, key, value).sum().backward()) == 3 * forward


def test_count_flops_of_a_micro_mae_forward_matches_its_layer_sizes() -> None:
    method = MAE(backbone=dict(size="micro", img_size=32, patch_size=4), decoder_dim=64, decoder_depth=2,
                 decoder_heads=4)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        counted = count_flops(lambda: method.compute_losses(images))
    assert counted == 3 * mae_flops_per_image(method)[0]


# small heads keep the tiny run fast; each method takes the arguments its constructor accepts
METHOD_ARGS = {"decoder_dim": 64, "decoder_depth": 1, "decoder_heads": 4, "head_hidden_dim": 128}


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("bench") / "tiny"
    threads = torch.get_num_threads()
    main(["--methods", "all", "--size", "micro", "--img-size", "32", "--patch-size", "4", "--batch", "4",
          "--steps", "2", "--warmup", "1", "--threads", "1", "--matmul-seconds", "0.05",
          "--method-args", json.dumps(METHOD_ARGS), "--data", "imagefolder,webdataset",
          "--data-images", "32", "--workers", "0", "--augment-on", "loader,device,device_whole,device_decode",
          "--device", "cpu",
          "--out", str(out)])
    assert torch.get_num_threads() == threads  # --threads applies to the run only
    return json.loads((out / "bench.json").read_text()), (out / "bench.md").read_text()


def test_tiny_bench_reports_every_column_positive(tiny_report: tuple[dict, str]) -> None:
    report, _ = tiny_report
    methods = sorted(bench_methods())  # every method, and Beyond Masking once per objective
    assert len(methods) == len(available_methods()) + 6 and "beyondmasking:decolorize" in methods
    assert sorted(row["method"] for row in report["methods"]) == methods
    objectives = {row["method"]: row["method_args"].get("objective") for row in report["methods"]}
    assert objectives["beyondmasking:zoom_out"] == "zoom_out" and objectives["beyondmasking"] is None
    for key in ("device", "torch", "timm", "lightning", "torch_threads", "loadavg_start", "loadavg_end", "matmul",
                "settings"):
        assert key in report["header"]
    assert report["header"]["torch_threads"] == 1
    for row in report["methods"]:
        for column in ("params_m", "step_ms", "img_per_s", "gflops_per_img", "achieved_tflops", "matmul_tflops",
                       "matmul_tflops_before", "matmul_tflops_after", "mfu_vs_matmul", "peak_mem_mib",
                       "first_step_s"):
            assert row[column] > 0, (row["method"], column)
        assert row["achieved_tflops"] == pytest.approx(row["gflops_per_img"] * row["img_per_s"] / 1e3)
        assert row["mfu_vs_matmul"] == pytest.approx(row["achieved_tflops"] / row["matmul_tflops"])
        assert isinstance(row["cpu_target_met"], bool)
    assert [(row["method"], row["source"], row["augment_on"]) for row in report["data"]] == [
        (method, source, place) for method in [row["method"] for row in report["methods"]]
        for source in ("imagefolder", "webdataset") for place in ("loader", "device", "device_whole", "device_decode")]
    step_rates = {row["method"]: row["img_per_s"] for row in report["methods"]}
    for row in report["data"]:
        assert row["images"] == 32
        for column in ("seconds", "img_per_s", "img_per_s_per_worker", "img_per_cpu_s", "data_vs_train"):
            assert row[column] > 0, (row["method"], row["source"], column)
        # workers (at least one) whose images per second together reach the step's
        workers = row["workers_per_device"]
        assert workers * row["img_per_s_per_worker"] >= step_rates[row["method"]]
        assert workers == 1 or (workers - 1) * row["img_per_s_per_worker"] < step_rates[row["method"]]
        assert (row["device_ms_per_batch"] is None) == (row["augment_on"] == "loader")
    assert [row["decoder"] for row in report["decode"]] == list(DECODERS)
    assert all(row["images"] == 32 and row["ms_per_image"] > 0 for row in report["decode"])


def test_tiny_bench_times_shard_writing_at_one_and_two_workers(tiny_report: tuple[dict, str]) -> None:
    report, markdown = tiny_report
    assert report["header"]["settings"]["shard_workers"] == [1, 2]
    assert [row["workers"] for row in report["shards"]] == [1, 2]
    for row in report["shards"]:
        assert (row["images"], row["shards"]) == (32, 8)  # every generated image, max_count 32 // 8
        assert row["seconds"] > 0
        assert row["img_per_s"] == pytest.approx(row["images"] / row["seconds"])
        assert row["img_per_s_per_worker"] == pytest.approx(row["img_per_s"] / row["workers"])
    table = markdown[markdown.index("| shard-writing workers |"):].splitlines()
    assert [line.split("|")[1].strip() for line in table[2:4]] == ["1", "2"]


def test_tiny_bench_counts_the_mae_train_step_flops_of_its_layers(tiny_report: tuple[dict, str]) -> None:
    report, _ = tiny_report
    mae_row = next(row for row in report["methods"] if row["method"] == "mae")
    method = MAE(backbone=dict(size="micro", img_size=32, patch_size=4), **mae_row["method_args"])
    assert mae_row["method_args"] == {key: METHOD_ARGS[key] for key in ("decoder_dim", "decoder_depth",
                                                                        "decoder_heads")}
    assert mae_row["gflops_per_img"] * 1e9 == pytest.approx(mae_flops_per_image(method)[1], rel=1e-9)


def test_tiny_bench_markdown_has_one_row_per_method(tiny_report: tuple[dict, str]) -> None:
    _, markdown = tiny_report
    methods = sorted(bench_methods())
    table = markdown.split("\n\n")[2].splitlines()
    assert table[0].startswith("| method | params (M) |")
    assert sorted(line.split("|")[1].strip() for line in table[2:]) == methods


def test_saved_storage_bytes_counts_what_autograd_keeps() -> None:
    from benchmarks.memory import saved_storage_bytes

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    inputs = torch.randn(4, 16)
    # the first Linear keeps its input (for its weight's gradient), GELU its input, the second Linear its input
    expected = 4 * 16 * 4 + 4 * 32 * 4 + 4 * 32 * 4
    assert saved_storage_bytes(lambda: model(inputs), model.parameters()) == expected
    # a checkpointed block saves nothing inside; its input is what the checkpoint keeps
    block = model[1:]
    hidden = model[0](inputs)

    def checkpointed() -> None:
        torch.utils.checkpoint.checkpoint(block, hidden, use_reentrant=False)

    assert saved_storage_bytes(checkpointed, model.parameters(), [block]) == 4 * 32 * 4


def test_memory_estimate_is_linear_in_the_batch_and_smaller_with_checkpointing(tmp_path: Path) -> None:
    from benchmarks.memory import main as memory_main

    common = ["--methods", "all", "--size", "micro", "--img-size", "32", "--patch-size", "4", "--precision", "32",
              "--method-args", json.dumps(METHOD_ARGS),
              "--batches", "8,16,32"]
    plain = memory_main([*common, "--out", str(tmp_path)])
    checkpointed = memory_main([*common, "--grad-checkpointing"])
    assert set(plain) == set(available_methods())
    for name, row in plain.items():
        cls = available_methods()[name]
        method = build_method(cls, argparse.Namespace(size="micro", img_size=32, patch_size=4,
                                                      grad_checkpointing=False, method_args=METHOD_ARGS))
        trainable = sum(p.numel() for p in method.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in method.parameters() if not p.requires_grad)
        buffer_bytes = sum(b.numel() * b.element_size() for b in method.buffers())
        assert row["static_gib"] * 2**30 == 16 * trainable + 4 * frozen + buffer_bytes
        estimates = row["estimated_gib"]
        assert estimates[32] - estimates[16] == pytest.approx(2 * (estimates[16] - estimates[8]))
        assert row["activations_mib_per_image"] > 0
        assert checkpointed[name]["activations_mib_per_image"] < row["activations_mib_per_image"]
    assert "estimate at batch 32" in (tmp_path / "memory.md").read_text()
    assert json.loads((tmp_path / "memory.json").read_text())["methods"].keys() == plain.keys()
