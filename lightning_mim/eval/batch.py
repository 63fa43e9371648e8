"""A recipe's effective batch on any number of devices: the per-device batch and gradient accumulation whose product
with the device count is exactly the recipe's batch, so that the lr, which the recipe's rule computes from the
effective batch (`ClassifierModule.effective_batch_size` counts accumulation), is the recipe's too."""
from __future__ import annotations


class BatchSplitError(ValueError):
    """The effective batch cannot be reached exactly on this many devices."""


def split_batch(effective_batch: int, per_device_most: int, devices: int) -> tuple[int, int]:
    """(per-device batch, accumulation) with per-device x devices x accumulation == effective_batch: the largest
    per-device batch not above `per_device_most` (the recipe's, what fits one device) that divides the share of
    each device."""
    if effective_batch < 1 or per_device_most < 1 or devices < 1:
        raise BatchSplitError(f"effective batch, per-device batch and devices must be positive, got "
                              f"{effective_batch}, {per_device_most}, {devices}")
    if effective_batch % devices:
        fitting = [count for count in (1, 2, 4, 8, 16, 32, 64) if effective_batch % count == 0]
        raise BatchSplitError(f"the effective batch {effective_batch} does not split over {devices} devices: use a "
                              f"device count (GPUS x NODES) dividing it, e.g. {', '.join(map(str, fitting))}")
    per_rank = effective_batch // devices
    per_device = next(size for size in range(min(per_device_most, per_rank), 0, -1) if per_rank % size == 0)
    return per_device, per_rank // per_device


__all__ = ["BatchSplitError", "split_batch"]
