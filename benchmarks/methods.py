"""The benchmark's rows: every concrete method (and Beyond Masking per objective), built at the benchmark's size."""
from __future__ import annotations

import argparse
import inspect
import tempfile
from pathlib import Path
from typing import Any

import torch

import lightning_mim.methods as methods_module
from lightning_mim.backbone import MIMViT
from lightning_mim.methods import BeyondMasking, MIMMethod
from lightning_mim.methods.beyond_masking import OBJECTIVES
from lightning_mim.targets.kmeans import random_pixel_codebook


def available_methods() -> dict[str, type[MIMMethod]]:
    """Concrete MIMMethod subclasses exported by `lightning_mim.methods.__all__`, keyed by lower-case name."""
    found: dict[str, type[MIMMethod]] = {}
    for name in methods_module.__all__:
        obj = getattr(methods_module, name)
        if isinstance(obj, type) and issubclass(obj, MIMMethod) and not getattr(obj, "__abstractmethods__", None):
            found[name.lower()] = obj
    return found


def bench_methods() -> dict[str, tuple[type[MIMMethod], dict[str, Any]]]:
    """Every row of the benchmark: (class, constructor arguments) of each concrete method with its defaults, and of
    Beyond Masking once per other objective (`beyondmasking:<objective>`, each its own pre-training; de-colourisation
    with its 1-channel encoder)."""
    rows: dict[str, tuple[type[MIMMethod], dict[str, Any]]] = {name: (cls, {})
                                                               for name, cls in available_methods().items()}
    default = inspect.signature(BeyondMasking).parameters["objective"].default
    for objective in OBJECTIVES:
        if objective != default:
            grey = {"backbone": {"in_chans": 1}} if objective == "decolorize" else {}
            rows[f"beyondmasking:{objective}"] = (BeyondMasking, {"objective": objective, **grey})
    return rows


def method_kwargs(cls: type[MIMMethod], method_args: dict[str, Any]) -> dict[str, Any]:
    """The `--method-args` entries that `cls`'s constructor takes (one JSON object serves every method)."""
    parameters = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return dict(method_args)
    return {key: value for key, value in method_args.items() if key in parameters}


def build_method(cls: type[MIMMethod], args: argparse.Namespace, row_args: dict[str, Any] | None = None
                 ) -> MIMMethod:
    """The method at the benchmark's size, resolution and patch size; other arguments default, from --method-args
    (a "backbone" entry adds backbone options) or from the row's own (`bench_methods`), which take precedence.
    A token-predicting method without a `tokenizer` there tokenises in the step with a pixel k-means codebook of
    8192 random centroids (`bench_codebook`): the nearest-code search of a real k-means tokenizer's last stage."""
    kwargs = method_kwargs(cls, args.method_args)
    row_args = dict(row_args or {})
    backbone = {**kwargs.pop("backbone", {}), **row_args.pop("backbone", {})}
    kwargs.update(row_args)
    if "tokenizer" in inspect.signature(cls).parameters and "tokenizer" not in kwargs:
        kwargs["tokenizer"] = {"kind": "kmeans", "path": str(bench_codebook(args.img_size, args.patch_size))}
    return cls(backbone=dict(size=args.size, img_size=args.img_size, patch_size=args.patch_size,
                             grad_checkpointing=args.grad_checkpointing, **backbone), **kwargs)


def bench_codebook(img_size: int, patch_size: int, vocab_size: int = 8192, in_chans: int = 3) -> Path:
    """A pixel codebook of random centroids for the benchmark's size, written once per setting."""
    return random_pixel_codebook(Path(tempfile.gettempdir()) / "lightning_mim_bench" /
                                 f"pixels_p{patch_size}_{img_size}px_v{vocab_size}.st",
                                 patch_size, img_size, in_chans, vocab_size)


def example_views(method: MIMMethod, batch: int, device: torch.device) -> Any:
    """What `method.compute_losses` takes, built from one batch of random normalised images."""
    images = torch.randn(batch, method.in_chans, method.image_size, method.image_size, device=device)
    return method.validation_views(images)


def set_grad_checkpointing(method: MIMMethod, enabled: bool) -> None:
    for module in method.modules():
        if isinstance(module, MIMViT):
            module.set_grad_checkpointing(enabled)
