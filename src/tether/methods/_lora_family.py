"""What LoRA, O-LoRA and OPLoRA share: their common settings, target matching and layer lookup.

Why one place: the three wrap the same ``nn.Linear`` targets with a rank-``r`` branch scaled by
``alpha / r``, so a recipe's ``r``, ``alpha``, ``dropout`` and ``target_modules`` mean, validate and
fail the same way whichever method reads them.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, field_validator

log = logging.getLogger(__name__)


class LoraFamilyConfig(BaseModel):
    """Settings every LoRA-style method has. Subclasses set ``key``, their recipe key, which every
    error message starts with (``olora.r must be > 0``), and may change the defaults.

    Attributes:
        r (int): rank of ``A`` (``r x d_in``) and ``B`` (``d_out x r``).
        alpha (float): scale numerator; the update is multiplied by ``alpha / r``.
        dropout (float): dropout on the branch's input, in ``[0, 1)``.
        target_modules (list[str]): module-name suffixes to adapt (``q_proj`` matches
            ``model.layers.3.self_attn.q_proj``); each must match at least one module.
    """

    model_config = ConfigDict(extra="forbid")

    key: ClassVar[str] = "lora"
    #: what ``target_modules`` may be, for its error message
    targets_are: ClassVar[str] = "a non-empty list of module names"

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = ["q_proj", "v_proj"]

    @field_validator("r", "alpha")
    @classmethod
    def _positive(cls, v: float, info) -> float:
        if v <= 0:
            raise ValueError(f"{cls.key}.{info.field_name} must be > 0")
        return v

    @field_validator("dropout")
    @classmethod
    def _dropout(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError(f"{cls.key}.dropout must be in [0, 1)")
        return v

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v):
        if isinstance(v, list) and (not v or any(not t for t in v)):
            raise ValueError(f"{cls.key}.target_modules must be {cls.targets_are}")
        return v


def match_targets(model: torch.nn.Module, targets: list[str], key: str) -> dict[str, torch.nn.Module]:
    """The modules whose name ends with one of ``targets`` (a whole name component), by name, target by
    target in model order; raise naming every target that matches nothing.

    Why: PEFT raises only when *nothing* matches, so a typo in one of seven names went unnoticed.
    """
    modules = dict(model.named_modules())
    hits = {t: [n for n in modules if n == t or n.endswith("." + t)] for t in targets}
    missing = [t for t, names in hits.items() if not names]
    if missing:
        raise ValueError(f"{key}.target_modules: {', '.join(map(repr, missing))} matched no module of the model")
    log.debug("%s: target_modules matched %s", key,
              "; ".join(f"{t} x{len(names)} ({', '.join(names)})" for t, names in hits.items()))
    return {n: modules[n] for names in hits.values() for n in names}


def lora_layers(model: torch.nn.Module, adapter: str | None = None,
                of: type[torch.nn.Module] | None = None) -> dict[str, torch.nn.Module]:
    """The modules carrying a LoRA branch, by name in model order.

    Default: PEFT's LoRA layers (their ``lora_A`` a ``ModuleDict`` of adapters), those holding
    ``adapter`` when given, else those holding any. ``of``: instances of that class instead (a
    method's own wrapper, OPLoRA's). Duck-typed: no PEFT import.
    """
    if of is not None:
        return {n: m for n, m in model.named_modules() if isinstance(m, of)}
    found = {}
    for n, m in model.named_modules():
        a = getattr(m, "lora_A", None)
        if isinstance(a, torch.nn.ModuleDict) and (adapter in a if adapter is not None else len(a) > 0):
            found[n] = m
    return found


def replace_module(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` is (its parent found by name)."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)
