"""O-LoRA: one LoRA adapter per task, each new one pushed orthogonal to the earlier ones' subspaces.

Wang et al., "Orthogonal Subspace Learning for Language Model Continual Learning", 2023,
https://arxiv.org/abs/2310.14152. Not PEFT's ``init_lora_weights="olora"``, which is an
*initialisation* (orthonormal LoRA) with no continual-learning role.

Task ``t`` trains a fresh adapter ``task{t}`` while ``task0..task{t-1}`` stay frozen but active,
so ``h = W x + sum_s (alpha / r) B_s A_s x``. The loss adds, over every adapted module::

    lambda1 * sum_{j,k} |A_old A_t^T|_{jk}  +  lambda2 * (||A_t||^2 + ||B_t||^2)

where ``A_old`` stacks the rows of every earlier ``A_s`` (``sum_s r x d_in``) and ``A_t`` is the
current one (``r x d_in``). The orthogonality term can also be shrunk by scaling ``A_t`` towards
zero, which satisfies it trivially; a guard therefore tracks the scale-free overlap
``||A_old A_t^T||_F / (||A_old||_F ||A_t||_F)`` and the new update's size ``||s B_t A_t||_F``
against the previous task's (against its own peak for task 0), plus ``||A_t||_F`` against its
initial value, and warns or stops when either ratio falls below ``min_norm_ratio``.
"""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar, Literal

import torch
from pydantic import field_validator

from ..registry import register_method
from ._lora_family import LoraFamilyConfig, lora_layers, match_targets
from .base import Batch, Context, Method

log = logging.getLogger(__name__)


class OLoRAConfig(LoraFamilyConfig):
    """O-LoRA (https://arxiv.org/abs/2310.14152).

    Attributes:
        r, alpha, dropout, target_modules: every task's adapter, as in `LoraFamilyConfig`.
        lambda1 (float): weight of the orthogonality term ``sum |A_old A_t^T|``.
        lambda2 (float): weight of the L2 penalty on the new adapter.
        min_norm_ratio (float): collapse guard threshold on the norm ratios (0 disables it).
        collapse_warmup_steps (int): optimizer steps into a task before the guard may fire (the
            new ``B`` starts at zero, so the update is tiny at first).
        on_collapse ("warn" | "stop"): log a warning, or raise `OLoRACollapse` to stop training.
    """

    key: ClassVar[str] = "olora"

    lambda1: float = 0.5
    lambda2: float = 0.0
    min_norm_ratio: float = 0.05
    collapse_warmup_steps: int = 20
    on_collapse: Literal["warn", "stop"] = "warn"

    @field_validator("lambda1", "lambda2", "min_norm_ratio", "collapse_warmup_steps")
    @classmethod
    def _non_negative(cls, v, info):
        if v < 0:
            raise ValueError(f"olora.{info.field_name} must be >= 0")
        return v


class OLoRACollapse(RuntimeError):
    """The new adapter shrank towards zero (``on_collapse="stop"``)."""


def orthogonality_loss(A_old: torch.Tensor, A_new: torch.Tensor) -> torch.Tensor:
    """``sum_{j,k} |A_old A_new^T|``: zero iff every row of ``A_new`` is orthogonal to every old row."""
    return (A_old @ A_new.transpose(0, 1)).abs().sum()


def subspace_overlap(A_old: torch.Tensor, A_new: torch.Tensor) -> torch.Tensor:
    """Scale-free overlap ``||A_old A_new^T||_F / (||A_old||_F ||A_new||_F)`` in ``[0, 1]``."""
    denom = torch.linalg.norm(A_old) * torch.linalg.norm(A_new)
    return torch.linalg.norm(A_old @ A_new.transpose(0, 1)) / denom.clamp_min(1e-30)


def delta_norm_sq(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``||B A||_F^2 = trace((B^T B)(A A^T))`` from two ``r x r`` products, never forming ``B A``."""
    return ((B.transpose(0, 1) @ B) * (A @ A.transpose(0, 1))).sum()


@register_method("olora")
class OLoRA(Method):
    """One PEFT named adapter per task; old ones frozen yet active; orthogonality loss on the new one.

    Hooks: ``prepare_model`` and ``on_task_start`` (both idempotent) wrap the model / add
    ``task{t}``, activate every task adapter and re-freeze the old ones; ``extra_loss`` returns
    ``orth`` and ``l2``; ``before_optimizer_step`` runs the collapse guard; ``on_task_end``
    records the finished adapter's update norm as the next task's reference. The active set is
    exactly ``task0..task{t}``: an adapter another method added to the same model is deactivated,
    so O-LoRA does not compose with ``lora``.
    """

    config_class = OLoRAConfig
    trains = "adapters"
    base_view = True
    order = 10

    def __init__(self, config: OLoRAConfig | dict | None = None):
        cfg = config if isinstance(config, OLoRAConfig) else OLoRAConfig.model_validate(config or {})
        super().__init__(cfg)
        self.adapters_: list[str] = []
        self.a_init_: dict[str, float] = {}  # ||A_t||_F at creation, per adapter
        self.ref_norm_: float | None = None  # the previous task's final update norm
        self.peak_norm_ = 0.0
        self.steps_ = 0
        self.last_: dict[str, float] = {}
        self.history_: list[dict[str, float]] = []

    # -- wiring ------------------------------------------------------------------------------------
    def _peft_config(self):
        from peft import LoraConfig

        c = self.config
        return LoraConfig(r=c.r, lora_alpha=c.alpha, lora_dropout=c.dropout,
                          target_modules=list(c.target_modules), task_type="CAUSAL_LM", bias="none")

    def _setup(self, model: torch.nn.Module, task: int) -> torch.nn.Module:
        from peft import get_peft_model

        name = f"task{task}"
        if not (hasattr(model, "peft_config") and hasattr(model, "base_model")):
            match_targets(model, list(self.config.target_modules), "olora")
            model = get_peft_model(model, self._peft_config(), adapter_name=name)
        elif name not in model.peft_config:
            model.add_adapter(name, self._peft_config())
        if name not in self.adapters_:
            self.adapters_.append(name)
            self.a_init_[name] = math.sqrt(sum(float(m.lora_A[name].weight.detach().float().pow(2).sum())
                                               for m in lora_layers(model, name).values()))
            self.steps_, self.peak_norm_ = 0, 0.0
            log.info("olora: adapter %r on %d modules; frozen and active: %s", name, len(lora_layers(model)),
                     self.adapters_[:-1] or "none")
        # PEFT's set_adapter with a list activates all of them *and* marks them all trainable ...
        model.base_model.set_adapter(list(self.adapters_))
        for layer in lora_layers(model).values():  # ... so the earlier ones are frozen again here
            for old in (o for o in self.adapters_[:-1] if o in layer.lora_A):
                layer.lora_A[old].requires_grad_(False)
                layer.lora_B[old].requires_grad_(False)
        return model

    def _layers(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """LoRA layers carrying this task's adapter (another method's adapters may live elsewhere)."""
        return list(lora_layers(model, self.adapters_[-1]).values())

    def prepare_model(self, model: torch.nn.Module, ctx: Context) -> torch.nn.Module:
        return self._setup(model, ctx.task_index)

    def on_task_start(self, model: torch.nn.Module, ctx: Context) -> None:
        self._setup(model, ctx.task_index)

    # -- maths hooked in ---------------------------------------------------------------------------
    def extra_loss(self, model: torch.nn.Module, batch: Batch, outputs: Any,
                   ctx: Context) -> dict[str, torch.Tensor]:
        c = self.config
        if not self.adapters_ or (c.lambda1 == 0 and c.lambda2 == 0):
            return {}
        new, old = self.adapters_[-1], self.adapters_[:-1]
        orth, l2 = [], []
        for layer in self._layers(model):
            A_new = layer.lora_A[new].weight
            if c.lambda1 and old:
                A_old = torch.cat([layer.lora_A[o].weight.detach() for o in old])
                orth.append(orthogonality_loss(A_old, A_new))
            if c.lambda2:
                l2.append(A_new.pow(2).sum() + layer.lora_B[new].weight.pow(2).sum())
        terms = {}
        if orth:
            terms["orth"] = c.lambda1 * torch.stack(orth).sum()
        if l2:
            terms["l2"] = c.lambda2 * torch.stack(l2).sum()
        return terms

    @torch.no_grad()
    def adapter_stats(self, model: torch.nn.Module) -> dict[str, float]:
        """Overlap with the old subspaces, the new update's norm, ``||A_t||_F`` (no ``d x d`` product)."""
        new, old = self.adapters_[-1], self.adapters_[:-1]
        overlaps, dn2, an2 = [], 0.0, 0.0
        for layer in self._layers(model):
            A, B = layer.lora_A[new].weight.float(), layer.lora_B[new].weight.float()
            dn2 += float(delta_norm_sq(B, A)) * float(layer.scaling[new]) ** 2
            an2 += float(A.pow(2).sum())
            if old:
                A_old = torch.cat([layer.lora_A[o].weight.float() for o in old])
                overlaps.append(float(subspace_overlap(A_old, A)))
        out = {"delta_norm": math.sqrt(dn2), "a_norm": math.sqrt(an2)}
        if overlaps:
            out["overlap"] = sum(overlaps) / len(overlaps)
        return out

    def before_optimizer_step(self, model: torch.nn.Module, ctx: Context) -> None:
        if not self.adapters_:
            return
        self.steps_ += 1
        s = self.adapter_stats(model)
        self.peak_norm_ = max(self.peak_norm_, s["delta_norm"])
        ref = self.ref_norm_ if self.ref_norm_ else self.peak_norm_
        s["norm_ratio"] = s["delta_norm"] / ref if ref > 0 else 1.0
        a0 = self.a_init_.get(self.adapters_[-1], 0.0)
        s["a_norm_ratio"] = s["a_norm"] / a0 if a0 > 0 else 1.0
        c = self.config
        collapsed = (self.steps_ > c.collapse_warmup_steps
                     and min(s["norm_ratio"], s["a_norm_ratio"]) < c.min_norm_ratio)
        s["collapsed"] = float(collapsed)
        self.last_ = s
        if collapsed:
            msg = (f"olora: adapter {self.adapters_[-1]!r} is collapsing at step {ctx.step}: update norm "
                   f"{s['norm_ratio']:.3g}x its reference, ||A|| {s['a_norm_ratio']:.3g}x its initial value "
                   f"(olora.min_norm_ratio={c.min_norm_ratio}); the orthogonality term may be satisfied "
                   f"trivially, try a lower olora.lambda1")
            if c.on_collapse == "stop":
                raise OLoRACollapse(msg)
            log.warning(msg)

    def on_task_end(self, model: torch.nn.Module, ctx: Context) -> None:
        if not self.adapters_:
            return
        s = self.adapter_stats(model)
        collapsed = self.last_.get("collapsed", 0.0)
        self.history_.append({"task": float(ctx.task_index), **s, "collapsed": collapsed})
        log.info("olora: %s done: %s", self.adapters_[-1], {k: round(v, 4) for k, v in s.items()})
        self.ref_norm_ = s["delta_norm"] or None

    def metrics(self) -> dict[str, float]:
        return {**self.last_, "n_adapters": float(len(self.adapters_))}

    def state_dict(self) -> dict[str, Any]:
        return {"adapters": list(self.adapters_), "a_init": dict(self.a_init_), "ref_norm": self.ref_norm_,
                "peak_norm": self.peak_norm_, "steps": self.steps_, "last": dict(self.last_),
                "history": [dict(h) for h in self.history_]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.adapters_ = list(state["adapters"])
        self.a_init_ = dict(state["a_init"])
        self.ref_norm_ = state["ref_norm"]
        self.peak_norm_ = float(state["peak_norm"])
        self.steps_ = int(state["steps"])
        self.last_ = dict(state["last"])
        self.history_ = [dict(h) for h in state["history"]]
