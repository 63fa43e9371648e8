"""`torch.compile` for any method: compiles its `compute_losses` (masking, encoder, heads and losses; the part every
step runs), leaving Lightning's loop, logging and the optimiser step eager."""
from __future__ import annotations

from typing import Any

import lightning as L
import torch


class CompileLosses(L.Callback):
    """With `enabled`, replaces `pl_module.compute_losses` by `torch.compile(compute_losses, ...)` at setup.

    `backend` / `mode` / `fullgraph` / `dynamic` go to `torch.compile` unchanged: the default inductor backend
    generates fused kernels (the speed-up on GPU); "aot_eager" only traces, which checks a method compiles without
    graph breaks (`fullgraph=True`) at no code-generation cost. The first steps pay the compile time.
    """

    def __init__(self, enabled: bool = False, backend: str = "inductor", mode: str | None = None,
                 fullgraph: bool = False, dynamic: bool | None = None) -> None:
        self.enabled = enabled
        self.options: dict[str, Any] = dict(backend=backend, mode=mode, fullgraph=fullgraph, dynamic=dynamic)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.enabled or getattr(pl_module.compute_losses, "_compiled_by_lightning_mim", False):
            return
        compiled = torch.compile(pl_module.compute_losses, **self.options)
        compiled._compiled_by_lightning_mim = True
        pl_module.compute_losses = compiled
