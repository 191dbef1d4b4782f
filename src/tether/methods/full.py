"""Full fine-tuning: every weight of the model is trained.

The baseline every forgetting-prevention method is measured against (Howard & Ruder, ULMFiT,
https://arxiv.org/abs/1801.06146, made fine-tuning the whole network the default).
"""

from __future__ import annotations

import logging

import torch
from pydantic import BaseModel, ConfigDict

from ..registry import register_method
from .base import Context, Method

log = logging.getLogger(__name__)


class FullConfig(BaseModel):
    """Full fine-tuning (https://arxiv.org/abs/1801.06146).

    Attributes:
        train_embeddings (bool): train the input embedding matrix too. ``False`` freezes it (and
            the output head when the model ties them), which saves optimizer memory on models
            whose vocabulary dominates the parameter count.
    """

    model_config = ConfigDict(extra="forbid")

    train_embeddings: bool = True


def trainable_summary(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters), counting tied tensors once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


@register_method("full")
class FullFineTune(Method):
    """Train all parameters; optionally keep the embeddings fixed.

    Hooks: ``prepare_model`` only. It does not switch ``requires_grad`` back on for anything, so
    it composes with ``freeze`` in either order: parameters start trainable in a freshly loaded
    model, and whatever another method froze stays frozen.
    """

    config_class = FullConfig
    trains = "all"
    order = 0

    def __init__(self, config: FullConfig | dict | None = None):
        super().__init__(FullConfig.model_validate(config or {}))

    def prepare_model(self, model: torch.nn.Module, ctx: Context) -> torch.nn.Module:
        if not self.config.train_embeddings:
            emb = model.get_input_embeddings()
            for p in emb.parameters():
                p.requires_grad_(False)
            log.info("full: froze the input embeddings %s (a tied output head follows them)",
                     tuple(emb.weight.shape))
        trainable, total = trainable_summary(model)
        log.info("full: %d of %d parameters trainable (%.1f%%)", trainable, total,
                 100.0 * trainable / max(total, 1))
        return model
