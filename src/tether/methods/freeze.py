"""Freeze the bottom transformer blocks (and optionally embeddings or any named weights).

Lower layers carry general features and upper layers task-specific ones (Yosinski et al., "How
transferable are features in deep neural networks?", https://arxiv.org/abs/1411.1792); leaving
the bottom of an LM untouched keeps more of what it knew (Lee et al., "What would Elsa do?
Freezing layers during transformer fine-tuning", https://arxiv.org/abs/1911.03090).
"""

from __future__ import annotations

import logging
import re

import torch
from pydantic import BaseModel, ConfigDict, field_validator

from ..models import find_blocks
from ..registry import register_method
from .base import Context, Method

log = logging.getLogger(__name__)


class FreezeConfig(BaseModel):
    """Layer freezing (https://arxiv.org/abs/1911.03090).

    Attributes:
        fraction (float): share of the decoder blocks to freeze, counted from the input side, in
            ``[0, 1)``; the number frozen is ``floor(fraction * n_blocks)``.
        freeze_embeddings (bool): also freeze the input embeddings (and a tied output head).
        patterns (list[str]): extra regular expressions searched in parameter names (as
            ``model.named_parameters()`` spells them, so PEFT-wrapped names carry a
            ``base_model.model.`` prefix); each must match at least one parameter.
    """

    model_config = ConfigDict(extra="forbid")

    fraction: float = 0.25
    freeze_embeddings: bool = False
    patterns: list[str] = []

    @field_validator("fraction")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError("freeze.fraction must be in [0, 1)")
        return v

    @field_validator("patterns")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        for p in v:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"freeze.patterns: {p!r} is not a regular expression ({e})") from None
        return v


def select_frozen(model: torch.nn.Module, fraction: float, freeze_embeddings: bool,
                  patterns: list[str]) -> dict[str, list[str]]:
    """Names of the parameters to freeze, grouped by the rule that picked them.

    Raises:
        ValueError: a pattern matches no parameter name.
    """
    names = [n for n, _ in model.named_parameters()]
    groups: dict[str, list[str]] = {}
    prefix, blocks = find_blocks(model)
    n_frozen = int(fraction * len(blocks))
    if n_frozen:
        heads = tuple(f"{prefix}.{i}." for i in range(n_frozen))
        rule = f"blocks 0-{n_frozen - 1} of {len(blocks)} ({prefix})"
        groups[rule] = [n for n in names if n.startswith(heads)]
    if freeze_embeddings:
        emb = {id(p) for p in model.get_input_embeddings().parameters()}
        groups["input embeddings"] = [n for n, p in model.named_parameters() if id(p) in emb]
    for pat in patterns:
        rx = re.compile(pat)
        hits = [n for n in names if rx.search(n)]
        if not hits:
            raise ValueError(f"freeze.patterns: {pat!r} matched no parameter (names look like {names[0]!r})")
        groups[f"pattern {pat!r}"] = hits
    return groups


@register_method("freeze")
class Freeze(Method):
    """Set ``requires_grad=False`` on the bottom blocks, embeddings or named weights.

    Hooks: ``prepare_model``. Put it after ``lora`` to freeze the LoRA weights of the bottom blocks
    too (before it, the base weights are frozen by PEFT anyway). Frozen tensors get no gradient,
    so optimizers skip them (weight decay included) and they stay bit-identical.
    """

    config_class = FreezeConfig
    order = 20

    def __init__(self, config: FreezeConfig | dict | None = None):
        super().__init__(FreezeConfig.model_validate(config or {}))
        self.frozen_: list[str] = []

    def prepare_model(self, model: torch.nn.Module, ctx: Context) -> torch.nn.Module:
        c = self.config
        groups = select_frozen(model, c.fraction, c.freeze_embeddings, list(c.patterns))
        params = dict(model.named_parameters())
        frozen: dict[str, None] = {}
        for rule, names in groups.items():
            n_el = sum(params[n].numel() for n in names)
            log.info("freeze: %s -> %d tensors, %d parameters", rule, len(names), n_el)
            for n in names:
                params[n].requires_grad_(False)
                frozen[n] = None
        self.frozen_ = list(frozen)
        left = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("freeze: %d tensors frozen; %d parameters still trainable", len(self.frozen_), left)
        if left == 0:
            raise ValueError("freeze: nothing left to train; lower freeze.fraction or narrow freeze.patterns")
        return model

    def metrics(self) -> dict[str, float]:
        return {"frozen_tensors": float(len(self.frozen_))}

    def state_dict(self) -> dict:
        return {"frozen": list(self.frozen_)}

    def load_state_dict(self, state: dict) -> None:
        self.frozen_ = list(state.get("frozen", []))
