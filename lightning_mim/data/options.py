"""The option types of `MIMDataModule`, the checks of their values when it is built (each error naming the fix), and
the per-device batch size that a global batch gives."""
from __future__ import annotations

from typing import Literal, get_args

Source = Literal["fashion_mnist", "imagefolder", "webdataset", "synthetic"]
Place = Literal["loader", "device"]  # where part of the training views is made


def check_options(*, source: str, batch_size: int, num_workers: int, global_batch_size: int | None,
                  token_ids_key: str | None, eval_resize_ratio: float, augment_on: str, decode_on: str) -> None:
    """Raise ValueError naming the option and the fix when a value is out of range or the combination is invalid."""
    if source not in get_args(Source):
        raise ValueError(f"unknown source {source!r}; choose one of {', '.join(get_args(Source))}")
    if batch_size <= 0 or num_workers < 0:
        raise ValueError(f"need batch_size > 0 and num_workers >= 0, got {batch_size} and {num_workers}")
    if global_batch_size is not None and global_batch_size <= 0:
        raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
    if token_ids_key is not None and source != "webdataset":
        raise ValueError(f"token_ids_key reads ids stored in WebDataset shards (`lightning-mim tokenizer encode`), "
                         f"not source {source!r}: use --data.source webdataset --data.train_shards PATTERN, or "
                         f"drop token_ids_key to tokenise in the training step")
    if not 0.0 < eval_resize_ratio <= 1.0:
        raise ValueError(f"eval_resize_ratio must be in (0, 1], got {eval_resize_ratio}")
    if augment_on not in get_args(Place):
        raise ValueError(f"unknown augment_on {augment_on!r}; choose 'device' (batched on the training device) "
                         f"or 'loader' (per image in the loader workers)")
    if decode_on not in get_args(Place):
        raise ValueError(f"unknown decode_on {decode_on!r}; choose 'loader' (in the loader workers) or 'device' "
                         f"(JPEGs decoded on the training device)")
    if decode_on == "device" and (augment_on != "device" or source not in ("imagefolder", "webdataset")):
        raise ValueError(f"decode_on 'device' decodes JPEG files before the device-side views: it needs "
                         f"augment_on 'device' and source 'imagefolder' or 'webdataset' (got augment_on "
                         f"{augment_on!r}, source {source!r}); set decode_on 'loader' otherwise")


def per_device_batch_size(global_batch_size: int, world: int, accumulate: int) -> int:
    """The images each device loads a step: global_batch_size / (world x accumulate), which must divide exactly."""
    shares = world * accumulate
    if global_batch_size % shares:
        raise ValueError(f"global_batch_size={global_batch_size} does not split over {world} device(s) x "
                         f"{accumulate} accumulation step(s) = {shares} shares; choose a multiple of {shares} "
                         f"or change trainer.devices / num_nodes / accumulate_grad_batches")
    return global_batch_size // shares
