"""tether: fine-tune a language model on a narrow task without losing what it already knew.

``tether.api`` mirrors the CLI; ``tether.GuardCallback`` adds the forgetting guard to a training run
of your own. Imports are lazy, so ``import tether`` loads no torch.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "GuardCallback":
        from .training.guard import GuardCallback

        return GuardCallback
    raise AttributeError(f"module 'tether' has no attribute {name!r}")
