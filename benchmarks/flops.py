"""Model FLOPs of a step (torch's FlopCounterMode, the CPU attention kernel added) and the dense matmul reference
rate that MFU is measured against."""
from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.device import synchronize


def _attention_flops(query_shape: torch.Size, key_shape: torch.Size, value_shape: torch.Size) -> int:
    """Q K^T and P V of one attention call at 2 FLOPs per multiply-add (torch's formula for the CUDA kernels)."""
    *batch_heads, queries, head_dim = query_shape
    keys, value_dim = key_shape[-2], value_shape[-1]
    return 2 * math.prod(batch_heads) * queries * keys * (head_dim + value_dim)


def _cpu_sdpa_flops(query_shape: torch.Size, key_shape: torch.Size, value_shape: torch.Size, *args: Any,
                    **kwargs: Any) -> int:
    return _attention_flops(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(grad_out_shape: torch.Size, query_shape: torch.Size, key_shape: torch.Size,
                             value_shape: torch.Size, *args: Any, **kwargs: Any) -> int:
    # dV, dP, dQ, dK: four products of the forward's two sizes; the recomputed Q K^T is not counted, as in torch
    return 2 * _attention_flops(query_shape, key_shape, value_shape)


# FlopCounterMode knows the CUDA attention kernels but not the CPU one that F.scaled_dot_product_attention uses.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs that torch's FlopCounterMode records while running `fn`: matmul, conv and attention ops at 2 per
    multiply-add (elementwise ops, norms and softmax are not counted), the CPU attention kernel included."""
    counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
    with counter:
        fn()
    return int(counter.get_total_flops())


def matmul_flops_per_s(rows: int, width: int, dtype: torch.dtype, device: torch.device,
                       min_seconds: float) -> float:
    """Rate of (rows x width) @ (width x 4 width), the ViT MLP's first matmul, in FLOP/s, over a block of repeats
    that lasts at least `min_seconds` (synchronised only at the block's edges)."""
    a = torch.randn(rows, width, device=device, dtype=dtype)
    b = torch.randn(width, 4 * width, device=device, dtype=dtype)
    out = torch.matmul(a, b)
    reps = 1
    while True:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b, out=out)
        synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return 2.0 * rows * width * 4 * width * reps / elapsed
        reps = max(2 * reps, math.ceil(1.2 * reps * min_seconds / max(elapsed, 1e-9)))
