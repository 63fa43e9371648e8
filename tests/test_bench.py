"""The benchmark runs end to end on a tiny configuration, and its FLOP counting matches the textbook count."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from benchmarks.bench import available_methods, count_flops, main


def test_count_flops_linear_forward_is_2mnk() -> None:
    m, k, n = 8, 16, 32
    layer = torch.nn.Linear(k, n)
    inputs = torch.randn(m, k)
    with torch.no_grad():
        assert count_flops(lambda: layer(inputs)) == 2 * m * n * k


def test_count_flops_counts_cpu_attention_forward_and_backward() -> None:
    query = torch.randn(2, 3, 10, 8, requires_grad=True)
    key, value = torch.randn(2, 3, 12, 8, requires_grad=True), torch.randn(2, 3, 12, 8, requires_grad=True)
    forward = 2 * 2 * 3 * 10 * 12 * (8 + 8)
    assert count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(query, key, value)) == forward
    assert count_flops(
        lambda: torch.nn.functional.scaled_dot_product_attention(query, key, value).sum().backward()
    ) == 3 * forward


def test_tiny_bench_writes_positive_columns_and_one_row_per_method(tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    main(["--methods", "all", "--size", "micro", "--img-size", "32", "--patch-size", "4", "--batch", "4",
          "--steps", "2", "--warmup", "1", "--data", "imagefolder,webdataset", "--data-images", "16",
          "--workers", "0", "--device", "cpu", "--out", str(out)])
    report = json.loads((out / "bench.json").read_text())
    methods = sorted(available_methods())
    assert methods and sorted(row["method"] for row in report["methods"]) == methods
    assert report["header"]["matmul_tflops"] > 0
    for row in report["methods"]:
        for column in ("params_m", "step_ms", "img_per_s", "gflops_per_img", "achieved_tflops", "mfu_vs_matmul",
                       "peak_mem_mib", "first_step_s"):
            assert row[column] > 0, (row["method"], column)
        assert isinstance(row["target_met"], bool)
    assert [row["source"] for row in report["data"]] == ["imagefolder", "webdataset"]
    for row in report["data"]:
        assert row["images"] == 16 and row["img_per_s"] > 0 and row["img_per_s_per_worker"] > 0
    table_rows = [line for line in (out / "bench.md").read_text().splitlines()
                  if line.startswith("| ") and line.split("|")[1].strip() in methods]
    assert sorted(line.split("|")[1].strip() for line in table_rows) == methods
