"""The benchmark report as Markdown: header, train-step table, data-pipeline, decoder and shard-writing tables."""
from __future__ import annotations

from typing import Any

from benchmarks.step import CPU_TARGET_RATIO


def to_markdown(report: dict[str, Any]) -> str:
    header, settings = report["header"], report["header"]["settings"]
    on_cpu = header["device_type"] == "cpu"
    lines = [
        f"# lightning_mim benchmark: ViT-{settings['size']}/{settings['patch_size']} at {settings['img_size']} px, "
        f"batch {settings['batch']}, {'bf16' if settings['precision'] == 'bf16' else 'fp32'}, {header['device_type']}",
        "",
        f"- device: {header['device']}; torch threads {header['torch_threads']}, CPUs {header['cpu_count']}; "
        + (", ".join(f"{key}={value}" for key, value in header["openmp_env"].items() if value is not None)
           or "no OpenMP environment variables set"),
        f"- load average (1, 5, 15 min): start {_triple(header['loadavg_start'])}, "
        f"end {_triple(header['loadavg_end'])}",
        f"- torch {header['torch']}, timm {header['timm']}, lightning {header['lightning']}, "
        f"python {header['python']}; {header['time_utc']}",
        "- settings: " + ", ".join(f"{key}={value}" for key, value in settings.items()),
        f"- dense matmul reference: {header['matmul']}, measured before and after each method's timed steps",
        "",
    ]
    memory_kind = report["methods"][0]["peak_mem_kind"]
    columns = ["method", "params (M)", "step (ms)", "img/s", "GFLOPs/img (fwd+bwd)", "achieved TFLOP/s",
               "matmul TFLOP/s", "MFU vs matmul", f"{memory_kind} (MiB)",
               "compile (s)" if settings["compile"] else "first step (s)", "attention share", "SDPA kernel"]
    if on_cpu:
        columns.append(f"CPU target (>= {CPU_TARGET_RATIO:.0%} of matmul)")
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in report["methods"]:
        cells = [row["method"], f"{row['params_m']:.1f}", f"{row['step_ms']:.1f}", _rate(row["img_per_s"]),
                 f"{row['gflops_per_img']:.2f}", f"{row['achieved_tflops']:.4f}", f"{row['matmul_tflops']:.4f}",
                 f"{row['mfu_vs_matmul']:.1%}", f"{row['peak_mem_mib']:.0f}", f"{row['first_step_s']:.1f}",
                 f"{row['attention_share']:.0%}", row["sdpa_kernels"]]
        if on_cpu:
            cells.append("met" if row["cpu_target_met"] else "not met")
        lines.append("| " + " | ".join(cells) + " |")
    if on_cpu and (settings["size"], settings["patch_size"]) != ("small", 16):
        lines += ["", "The CPU target is defined for ViT-S/16 (`--size small --patch-size 16`); this run uses "
                      "another model, so its target column is indicative only."]
    if report["data"]:
        data = header["data"]
        origin = (f"{settings['data_images']} generated JPEGs, 256-500 px, mean {data['mean_file_kb']:.0f} KB"
                  if data["generated"] else f"up to {settings['data_images']} images of "
                  f"{' and '.join(str(path) for path in (data['image_folder'], data['shards']) if path)}")
        lines += ["", f"Data pipeline: decode + the method's views through the MIMDataModule train loader, "
                      f"{settings['workers']} worker(s), {origin}; worker start-up included; median of "
                      f"{settings['data_repeats']} pass(es). augment_on loader: the whole view per image in the "
                      f"workers (PIL decode, the reference); device: the workers decode to tensors and crop (a "
                      f"RandomResizedCrop decodes only its region of a JPEG), and the rest runs batched on the "
                      f"{header['device_type']} (its time per batch in the last column); device_whole: the same "
                      f"with whole JPEGs decoded before the crop (crop_decode off); "
                      f"device_decode: the workers read the files, and the {header['device_type']} also decodes "
                      f"the JPEGs and crops.",
                  "",
                  "| method | source | augment on | images | seconds | img/s | img/s per worker | img/s per core | "
                  "data / train-step img/s | workers per device at the step rate | device part (ms / batch) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in report["data"]:
            device_ms = "-" if row["device_ms_per_batch"] is None else f"{row['device_ms_per_batch']:.1f}"
            lines.append(f"| {row['method']} | {row['source']} | {row['augment_on']} | {row['images']} | "
                         f"{row['seconds']:.2f} | {_rate(row['img_per_s'])} | {_rate(row['img_per_s_per_worker'])} | "
                         f"{_rate(row['img_per_cpu_s'])} | {row['data_vs_train']:.2f} | {row['workers_per_device']} | "
                         f"{device_ms} |")
    if report.get("decode"):
        lines += ["", "CPU decoders, file bytes to a uint8 tensor, one process (median of 3 passes):", "",
                  "| decoder | images | ms / image |", "|---|---|---|"]
        for row in report["decode"]:
            lines.append(f"| {row['decoder']} | {row['images']} | {row['ms_per_image']:.3f} |")
    if report["shards"]:
        lines += ["", f"Shard writing (`make-shards`: read, decode check, tar writing) of the "
                      f"{settings['data_images']} generated JPEGs, max_count {report['shards'][0]['max_count']}, "
                      f"process pool start-up included.", "",
                  "| shard-writing workers | images | shards | seconds | img/s | img/s per worker |",
                  "|---|---|---|---|---|---|"]
        for row in report["shards"]:
            lines.append(f"| {row['workers']} | {row['images']} | {row['shards']} | {row['seconds']:.2f} | "
                         f"{_rate(row['img_per_s'])} | {_rate(row['img_per_s_per_worker'])} |")
    return "\n".join(lines) + "\n"


def _triple(values: list[float]) -> str:
    return ", ".join(f"{value:.2f}" for value in values)


def _rate(value: float) -> str:
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"
