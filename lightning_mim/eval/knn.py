"""Weighted k-NN evaluation of frozen features (InstDisc / DINO): cosine similarity to a labelled bank, the k nearest
neighbours vote for their class with weight exp(similarity / temperature).

Usable offline (`extract_features` + `knn_accuracy`) and under DDP: every rank extracts its share of the batches and
`gather_features` rebuilds the full set on every rank.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.classification import multiclass_accuracy


def extract_features(feature_fn: Callable[[Tensor], Tensor], loader: Iterable, device: torch.device | str,
                     rank: int = 0, world_size: int = 1, normalize: bool = True) -> tuple[Tensor, Tensor]:
    """float32 features (N, D), L2-normalised unless `normalize` is false, and int64 labels (N,) on the CPU for the
    `(image, label)` batches of `loader`, keeping only the batches with index % world_size == rank.

    Runs under `torch.no_grad()` (not `inference_mode`: the results may go through `all_gather`). A rank without any
    batch returns tensors of shape (0, 0) and (0,).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    features, labels = [], []
    with torch.no_grad():
        for index, (images, targets) in enumerate(loader):
            if index % world_size != rank:
                continue
            output = feature_fn(images.to(device, non_blocking=True))
            output = output.float()
            features.append((F.normalize(output, dim=1) if normalize else output).cpu())
            labels.append(torch.as_tensor(targets).to("cpu", torch.int64))
    if not features:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.int64)
    return torch.cat(features), torch.cat(labels)


def _distributed_all_gather(tensor: Tensor) -> Tensor:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.stack(parts)


def gather_features(features: Tensor, labels: Tensor, all_gather: Callable[[Tensor], Tensor] | None = None,
                    world_size: int | None = None, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Concatenate every rank's `features` (n_r, D) and `labels` (n_r,), of possibly different lengths n_r, on every
    rank, in rank order; returns CPU tensors.

    `all_gather` maps a tensor to the stack (world, ...) of that tensor over ranks, e.g. a LightningModule's
    `all_gather`; by default `torch.distributed` is used. `world_size` defaults to the `torch.distributed` world
    size (1 when it is not initialised); with 1 the inputs are returned unchanged. Tensors are moved to `device`
    for the collective (NCCL needs CUDA tensors).
    """
    if world_size is None:
        world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world_size == 1:
        return features, labels
    if all_gather is None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"gather_features: world size {world_size} but no all_gather function was given and "
                               "torch.distributed is not initialised")
        all_gather = _distributed_all_gather
    device = features.device if device is None else device
    # A rank without batches has features of shape (0, 0): the feature width comes from the other ranks.
    sizes = all_gather(torch.tensor([features.shape[0], features.shape[-1]], device=device)).reshape(world_size, 2)
    lengths = sizes[:, 0].tolist()
    max_length, width = max(lengths), int(sizes[:, 1].max())
    padded_features = torch.zeros(max_length, width, dtype=torch.float32, device=device)
    padded_labels = torch.zeros(max_length, dtype=torch.int64, device=device)
    if features.shape[0]:
        padded_features[: features.shape[0]] = features.to(device, torch.float32)
        padded_labels[: labels.shape[0]] = labels.to(device)
    all_features = all_gather(padded_features).reshape(world_size, max_length, width)
    all_labels = all_gather(padded_labels).reshape(world_size, max_length)
    return (torch.cat([all_features[r, :n] for r, n in enumerate(lengths)]).cpu(),
            torch.cat([all_labels[r, :n] for r, n in enumerate(lengths)]).cpu())


def knn_classify(train_features: Tensor, train_labels: Tensor, test_features: Tensor, num_classes: int, k: int = 20,
                 temperature: float = 0.07, chunk_size: int = 1024) -> Tensor:
    """Class scores (N_test, num_classes) of the weighted k-NN vote.

    Features must be L2-normalised (the dot product is the cosine similarity). Each test sample's `k` most similar
    bank samples (k is clipped to the bank size) add exp(similarity / temperature) to their class. Test samples are
    processed `chunk_size` at a time so the similarity matrix never exceeds chunk_size x N_train. Computed on the
    device of `train_features`.
    """
    if k < 1 or temperature <= 0 or chunk_size < 1:
        raise ValueError(f"need k >= 1, temperature > 0 and chunk_size >= 1, got {k}, {temperature}, {chunk_size}")
    if train_features.shape[0] == 0:
        raise ValueError("knn_classify: the feature bank is empty")
    device = train_features.device
    bank = train_features.float()
    bank_labels = train_labels.to(device, torch.int64)
    k = min(k, bank.shape[0])
    scores = torch.zeros(test_features.shape[0], num_classes, device=device)
    for start in range(0, test_features.shape[0], chunk_size):
        queries = test_features[start:start + chunk_size].to(device, torch.float32)
        similarity, index = (queries @ bank.T).topk(k, dim=1)
        scores[start:start + chunk_size].scatter_add_(1, bank_labels[index], (similarity / temperature).exp())
    return scores


def knn_accuracy(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
                 num_classes: int, k: int = 20, temperature: float = 0.07, chunk_size: int = 1024) -> dict[str, float]:
    """Weighted k-NN accuracy in percent: `{"top1": ...}`, plus `"top5"` when num_classes >= 5."""
    if test_features.shape[0] == 0:
        raise ValueError("knn_accuracy: the test set is empty")
    scores = knn_classify(train_features, train_labels, test_features, num_classes, k, temperature, chunk_size)
    targets = test_labels.to(scores.device, torch.int64)
    result = {"top1": 100.0 * float(multiclass_accuracy(scores, targets, num_classes, average="micro", top_k=1))}
    if num_classes >= 5:
        result["top5"] = 100.0 * float(multiclass_accuracy(scores, targets, num_classes, average="micro", top_k=5))
    return result
