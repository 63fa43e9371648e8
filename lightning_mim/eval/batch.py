"""A recipe's effective batch on any number of devices: the per-device batch and gradient accumulation whose product
with the device count is exactly the recipe's batch, so that the lr, which the recipe's rule computes from the
effective batch (`ClassifierModule.effective_batch_size` counts accumulation), is the recipe's too."""
from __future__ import annotations

from typing import Any


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


def trained_batch(recipe: dict[str, Any], devices: str | int, num_nodes: int, batch_size: int | None,
                  accumulation: int | None) -> tuple[int | None, int | None]:
    """(per-device batch, gradient accumulation) of `evaluate`'s linear probe or fine-tuning, None where the recipe
    and data config decide. A recipe stating `effective_batch` (the paper's) keeps it on any number of devices:
    per-device batch (at most `batch_size`, else the recipe's `data.batch_size`) x devices x nodes x accumulation =
    effective_batch exactly, or a clear error; a given `accumulation` must complete that product."""
    effective = recipe.get("effective_batch")
    if effective is None:
        return batch_size, accumulation
    if "accumulate_grad_batches" in (recipe.get("trainer") or {}):
        raise ValueError("the recipe sets both effective_batch and trainer.accumulate_grad_batches: drop the "
                         "latter, evaluate derives it from effective_batch and the device count")
    try:
        world = int(devices) * num_nodes
    except ValueError:
        raise ValueError(f"the recipe's effective batch {effective} is split over the devices: give their number "
                         f"(--devices N, not {devices!r})") from None
    per_device_most = batch_size or int((recipe.get("data") or {}).get("batch_size", effective))
    if accumulation is None:
        return split_batch(int(effective), per_device_most, world)
    if per_device_most * world * accumulation != effective:
        raise ValueError(f"--batch-size {per_device_most} x {world} devices x --accumulate-grad-batches "
                         f"{accumulation} = {per_device_most * world * accumulation}, but the recipe's effective "
                         f"batch is {effective}: leave --accumulate-grad-batches out to derive it")
    return per_device_most, accumulation


__all__ = ["BatchSplitError", "split_batch", "trained_batch"]
