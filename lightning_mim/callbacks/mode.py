"""Save and restore the train/eval flag of every submodule."""
from __future__ import annotations

from types import TracebackType

import torch.nn as nn


class ModeGuard:
    """Context manager: puts `module` in eval mode on entry and gives every submodule its own previous `training`
    flag back on exit. Calling `module.train()` instead would wrongly switch submodules that must stay in eval mode
    (an EMA teacher, frozen tokenizers)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.saved: dict[str, bool] = {}

    def __enter__(self) -> nn.Module:
        self.saved = {name: sub.training for name, sub in self.module.named_modules()}
        self.module.eval()
        return self.module

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        for name, sub in self.module.named_modules():
            if name in self.saved:
                sub.training = self.saved[name]
