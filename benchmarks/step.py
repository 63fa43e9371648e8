"""The train step's timing: throughput, model FLOPs and MFU against the dense matmul, peak memory, attention share."""
from __future__ import annotations

import argparse
import re
import time
from typing import Any, Callable

import torch

from benchmarks.device import synchronize
from benchmarks.flops import count_flops, matmul_flops_per_s
from benchmarks.methods import example_views, set_grad_checkpointing
from benchmarks.peak_memory import peak_memory, reset_peak_memory
from lightning_mim.methods import MIMMethod

CPU_TARGET_RATIO = 0.5
FLOP_COUNT_BATCH = 2  # >= 2: BatchNorm in train mode (LUT heads) needs two samples
_SDPA_KERNEL = re.compile(r"aten::_(scaled_dot_product_\w+|efficient_attention_forward|flash_attention_forward)$")


def attention_profile(step: Callable[[], None], device: torch.device) -> tuple[float, str]:
    """Share of one step's wall time spent in `scaled_dot_product_attention` (forward and backward, inclusive of the
    kernels it calls) and the SDPA kernels that ran, from torch.profiler. A math fallback (an attention mask the
    fused kernels refuse) shows as `scaled_dot_product_attention_math`; its backward runs as plain matmuls and
    softmax, which this share leaves out."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    synchronize(device)
    with torch.profiler.profile(activities=activities) as profile:
        start = time.perf_counter()
        step()
        synchronize(device)
        wall_us = 1e6 * (time.perf_counter() - start)
    events = profile.key_averages()
    inclusive = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    attention_us = sum(getattr(event, inclusive) for event in events
                       if event.key == "aten::scaled_dot_product_attention"
                       or ("ScaledDotProduct" in event.key and "Backward" in event.key
                           and not event.key.startswith("autograd::engine")))
    kernels = sorted({event.key.removeprefix("aten::_") for event in events
                      if _SDPA_KERNEL.match(event.key) and "backward" not in event.key})
    return attention_us / wall_us, ", ".join(kernels) or "none"


def make_optimizer(method: MIMMethod, device: torch.device) -> torch.optim.AdamW:
    """AdamW on the method's parameter groups, fused as its `configure_optimizers` decides, else foreach."""
    config = method.optim_config
    fused = config.fused_on(device)
    return torch.optim.AdamW(method.parameter_groups(), lr=1e-4, betas=config.betas, eps=config.eps, fused=fused,
                             foreach=None if fused else True)


def bench_train_step(name: str, method: MIMMethod, args: argparse.Namespace, device: torch.device
                     ) -> dict[str, Any]:
    """Time `--steps` train steps after `--warmup` (the first warm-up step, which compiles, is timed on its own)."""
    torch.manual_seed(0)
    method.to(device).train()
    optimizer = make_optimizer(method, device)
    bf16 = args.precision == "bf16"
    compute = torch.compile(method.compute_losses) if args.compile else method.compute_losses

    def forward_backward(losses_fn: Callable[[Any], dict[str, torch.Tensor]], views: Any) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            total = method.weighted_total(losses_fn(views))
        total.backward()

    # Model FLOPs, per image: eager, without the recomputation that gradient checkpointing adds, on a small batch
    # (every counted op scales linearly with the batch) so that it neither costs a full step nor sets the peak memory.
    set_grad_checkpointing(method, False)
    flop_views = example_views(method, FLOP_COUNT_BATCH, device)
    flops_per_image = count_flops(lambda: forward_backward(method.compute_losses, flop_views)) / FLOP_COUNT_BATCH
    method.zero_grad(set_to_none=True)
    del flop_views
    set_grad_checkpointing(method, args.grad_checkpointing)

    rows = args.batch * ((args.img_size // args.patch_size) ** 2 + 1)
    width = method.backbone.embed_dim
    matmul_dtype = torch.bfloat16 if bf16 else torch.float32
    matmul_before = matmul_flops_per_s(rows, width, matmul_dtype, device, args.matmul_seconds)

    memory_reset = reset_peak_memory(device)
    views = example_views(method, args.batch, device)

    def step() -> None:
        forward_backward(compute, views)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    first_step_s = time.perf_counter() - start
    for _ in range(args.warmup - 1):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    elapsed = time.perf_counter() - start
    memory_mib, memory_kind = peak_memory(device, memory_reset)
    attention_share, sdpa_kernels = attention_profile(step, device)
    # allocated plus the caching allocator's reserve: what has to fit on the card
    reserved_mib = torch.cuda.max_memory_reserved(device) / 2**20 if device.type == "cuda" else None
    del views

    matmul_after = matmul_flops_per_s(rows, width, matmul_dtype, device, args.matmul_seconds)
    matmul_rate = (matmul_before + matmul_after) / 2
    images_per_s = args.batch * args.steps / elapsed
    achieved = flops_per_image * images_per_s
    row = {
        "method": name,
        "params_m": sum(p.numel() for p in method.parameters() if p.requires_grad) / 1e6,
        "step_ms": 1000 * elapsed / args.steps,
        "img_per_s": images_per_s,
        "gflops_per_img": flops_per_image / 1e9,
        "achieved_tflops": achieved / 1e12,
        "matmul_tflops": matmul_rate / 1e12,
        "matmul_tflops_before": matmul_before / 1e12,
        "matmul_tflops_after": matmul_after / 1e12,
        "mfu_vs_matmul": achieved / matmul_rate,
        "peak_mem_mib": memory_mib,
        "peak_mem_kind": memory_kind,
        "first_step_s": first_step_s,
        "attention_share": attention_share,
        "sdpa_kernels": sdpa_kernels,
        "cpu_target_met": achieved / matmul_rate >= CPU_TARGET_RATIO,
    }
    if args.compile:
        row["compile_s"] = first_step_s
    if device.type == "cuda":
        row["cuda_max_reserved_mib"] = reserved_mib
    return row
