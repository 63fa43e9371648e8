"""Peak memory of one benchmarked method: CUDA's allocator peak, or on the CPU the process's peak RSS (VmHWM)."""
from __future__ import annotations

import resource
from pathlib import Path

import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _vm_hwm_mib() -> float | None:
    """Linux peak resident set size of this process (VmHWM), MiB."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_memory(device: torch.device) -> bool:
    """Reset the peak-memory counter; False on CPU when the OS does not allow resetting the peak RSS."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        _CLEAR_REFS.write_text("5")  # Linux: "5" resets the peak RSS (VmHWM) to the current RSS
    except OSError:
        return False
    return _vm_hwm_mib() is not None


def peak_memory(device: torch.device, was_reset: bool) -> tuple[float, str]:
    """Peak memory in MiB since the last reset, and what it measures."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "CUDA max allocated"
    if was_reset:
        return float(_vm_hwm_mib()), "peak RSS per method"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS (whole run)"
