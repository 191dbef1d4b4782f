"""Elastic Weight Consolidation: a quadratic pull toward the old weights, weighted by the Fisher.

Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks",
https://arxiv.org/abs/1612.00796; online EWC from Schwarz et al., "Progress & Compress",
https://arxiv.org/abs/1805.06370.

    L(θ) = L_task(θ) + (λ / 2) Σ_i F_i (θ_i − θ*_i)²

θ* is the anchor (the weights before the task), F the diagonal empirical Fisher,
F_i = (1/N) Σ_n (∂ℓ_n/∂θ_i)², from per-example gradients of ℓ_n, example n's mean token
cross-entropy (the square of a *batch* gradient would be a different, much smaller quantity).
Only trainable parameters get an F and an anchor: under LoRA that is the adapter, a few MB.

Per-example gradients: one forward/backward per example. ``torch.func`` (``functional_call`` +
``vmap(grad)``) works on HF Llama only without an attention mask (right padding keeps causal
positions exact), and on the 2-layer test Llama (SmolLM2 vocabulary, 16 examples of 32 tokens,
2 CPU threads) it was slower: full model 18-25 ms/example (chunk 4 / unchunked) against
11.5 ms for the loop; LoRA 14-17 ms against 11 ms. vmap materialises a per-example gradient for
every weight (the 49k x d embedding dominates) and falls back to a slow path for SDPA, while the
loop needs no padding at all. So the loop it is.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..models import unwrap_parallel  # parameter names as the Fisher's
from ..registry import register_method
from .base import Batch, Context, Method, eval_mode

log = logging.getLogger(__name__)


class EWCConfig(BaseModel):
    """EWC / online EWC (https://arxiv.org/abs/1612.00796, https://arxiv.org/abs/1805.06370).

    Attributes:
        lambda_ (float): ``λ``, written ``lambda`` in a recipe. Near the anchor the penalty is
            ``λ`` times the rise in general-data loss (nats per token) that the Fisher predicts
            (F approximates the Hessian there). Measured on SmolLM2-135M full fine-tuning
            (bench/tradeoff.py): ``λ = 100`` changed nothing (penalty 0.015 vs task loss 0.29),
            ``λ = 1e4`` cut drift from -45% to -32% at 83% of the task gain. The per-example
            Fisher of a well-trained model is tiny per parameter, so useful λ run 1e3-1e5.
        fisher_samples (int): examples the Fisher is averaged over.
        gamma (float): online-EWC decay: ``F <- gamma * F + F_new`` at each task end (1 = plain
            sum over tasks, 0 = only the last task).
        max_length (int): examples are truncated to this many tokens for the Fisher.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    lambda_: float = Field(1.0e4, alias="lambda")
    fisher_samples: int = 64
    gamma: float = 1.0
    max_length: int = 512

    @field_validator("lambda_")
    @classmethod
    def _lam(cls, v: float) -> float:
        if v < 0:
            raise ValueError("ewc.lambda must be >= 0")
        return v

    @field_validator("fisher_samples", "max_length")
    @classmethod
    def _positive(cls, v: int, info) -> int:
        if v <= 0:
            raise ValueError(f"ewc.{info.field_name} must be > 0")
        return v

    @field_validator("gamma")
    @classmethod
    def _gamma(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError("ewc.gamma must be in [0, 1]")
        return v


def ewc_penalty(params: list[torch.Tensor], anchor: torch.Tensor | list[torch.Tensor],
                fisher: torch.Tensor | list[torch.Tensor], lam: float) -> torch.Tensor:
    """``(λ/2) Σ F (θ − θ*)²`` over one flat view of ``params`` (gradient: ``λ F (θ − θ*)``).

    ``anchor`` and ``fisher`` are flat buffers in ``params`` order (or lists, flattened here). Why
    flat: one ``cat`` and four element-wise kernels whatever the tensor count, where a ``_foreach``
    chain still reduced each tensor on its own (336 under LoRA on Qwen2-0.5B; that version cost +28%
    of tether's LoRA step on an H200 in bf16). The sum runs in float32 for low-precision weights.
    """
    if not params:
        return torch.zeros(())
    anchor, fisher = _flat(anchor), _flat(fisher)
    diff = torch.cat([p.reshape(-1) for p in params]).float() - anchor
    return 0.5 * lam * torch.dot(diff * fisher, diff)


def _flat(t: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([x.reshape(-1) for x in t]) if isinstance(t, (list, tuple)) else t


def empirical_fisher(model: torch.nn.Module, examples: list,
                     max_length: int = 512) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher ``mean_n g_n²`` of the trainable parameters, one backward per example.

    ``g_n`` is the gradient of example ``n``'s mean token cross-entropy over its target tokens
    (labels != -100). Examples with no target token are skipped. Runs in ``eval()`` (no dropout)
    and restores every module's mode; uses ``autograd.grad`` so ``.grad`` buffers are untouched.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("ewc: the model has no trainable parameters to protect")
    params = [p for _, p in named]
    acc = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    device = params[0].device
    count = 0
    with eval_mode(list(model.modules())), torch.enable_grad():
        for ex in examples:
            ids = torch.as_tensor(list(ex.input_ids)[:max_length], device=device)[None]
            labels = torch.as_tensor(list(ex.labels)[:max_length], device=device)[None]
            if (labels[:, 1:] != -100).sum() == 0:
                continue
            logits = model(input_ids=ids).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(),
                                                     ignore_index=-100)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            grads = [torch.zeros_like(a) if g is None else g.float() for a, g in zip(acc, grads)]
            torch._foreach_addcmul_(acc, grads, grads)
            count += 1
    if count == 0:
        raise ValueError("ewc: no example with a target token to estimate the Fisher on")
    torch._foreach_div_(acc, count)
    return {n: f.to(p.dtype) for (n, p), f in zip(named, acc)}


def _sample(examples: list, k: int, seed: int) -> list:
    idx = list(range(len(examples)))
    random.Random(seed).shuffle(idx)
    return [examples[i] for i in idx[:k]]


@register_method("ewc")
class EWC(Method):
    """Penalise moving trainable weights that mattered for general data (online EWC over tasks).

    Hooks: ``on_task_start`` (first time: Fisher on ``ctx.general_examples``, anchor = current
    weights), ``extra_loss`` (``{"ewc": penalty}``), ``on_task_end`` (online consolidation on
    ``ctx.task_examples``: ``F <- gamma F + F_new``, anchor <- current weights, in place).

    Gradient accumulation: ``extra_loss`` returns the *undivided* penalty for every micro-batch.
    The trainer divides the total loss by ``grad_accum_steps``, so N micro-batches add N copies of
    ``grad / N`` -- the same gradient as one big batch, at any N.
    """

    config_class = EWCConfig
    needs_general = True  # the Fisher is estimated on general data
    general_optional = True  # without it, the penalty starts after the first task's consolidation

    def __init__(self, config: EWCConfig | dict | None = None):
        super().__init__(EWCConfig.model_validate(config or {}))
        self.fisher_: dict[str, torch.Tensor] = {}
        self.anchor_: dict[str, torch.Tensor] = {}
        self.tasks_consolidated_ = 0
        self._packed: tuple[torch.nn.Module, list] | None = None  # (model, [(params, anchor, fisher)])

    def _estimate(self, model: torch.nn.Module, examples: list, seed: int) -> dict[str, torch.Tensor]:
        sample = _sample(examples, self.config.fisher_samples, seed)
        return empirical_fisher(model, sample, self.config.max_length)

    def on_task_start(self, model: torch.nn.Module, ctx: Context) -> None:
        model = unwrap_parallel(model)
        if self.fisher_:
            return
        if not ctx.general_examples:
            log.warning("ewc: no general data; the penalty starts after the first task's consolidation")
            return
        self.fisher_ = self._estimate(model, ctx.general_examples, ctx.seed)
        self.anchor_ = {n: p.detach().clone() for n, p in model.named_parameters() if n in self.fisher_}
        self._packed = None
        log.info("ewc: Fisher of %d tensors from %d general examples; %.1f MB extra",
                 len(self.fisher_), min(len(ctx.general_examples), self.config.fisher_samples),
                 self.metrics()["ewc_memory_mb"])

    def on_task_end(self, model: torch.nn.Module, ctx: Context) -> None:
        model = unwrap_parallel(model)
        self._packed = None  # holds the parameters: let them go with the task
        if not ctx.task_examples:
            log.warning("ewc: no task examples at task end; nothing consolidated")
            return
        new = self._estimate(model, ctx.task_examples, ctx.seed + ctx.task_index + 1)
        params = dict(model.named_parameters())
        if not self.fisher_:
            self.fisher_ = new
            self.anchor_ = {n: params[n].detach().clone() for n in new}
        else:  # in place: constant memory
            names = list(self.fisher_)
            fisher = [self.fisher_[n] for n in names]
            torch._foreach_mul_(fisher, self.config.gamma)
            torch._foreach_add_(fisher, [new[n] for n in names])
            torch._foreach_copy_([self.anchor_[n] for n in names], [params[n].detach() for n in names])
        self.tasks_consolidated_ += 1

    def extra_loss(self, model, batch: Batch, outputs, ctx: Context) -> dict[str, torch.Tensor]:
        if not self.fisher_:
            return {}
        total = None
        for params, anchor, fisher in self._pack(unwrap_parallel(model)):
            pen = ewc_penalty(params, anchor, fisher, self.config.lambda_)
            total = pen if total is None else total + pen.to(total.device)
        return {"ewc": total}

    def _pack(self, model: torch.nn.Module) -> list:
        """The covered parameters with the anchor and Fisher as one flat buffer per (device, dtype).

        Built at a task's first step; ``fisher_`` and ``anchor_`` then hold views into the buffers,
        so memory does not double.
        """
        if self._packed is not None and self._packed[0] is model:
            return self._packed[1]
        params = dict(model.named_parameters())
        missing = [n for n in self.fisher_ if n not in params]
        if missing:
            raise KeyError(f"ewc: the model lost parameters the Fisher covers, e.g. {missing[0]!r}")
        by_group: dict[tuple, list[str]] = {}
        for n in self.fisher_:
            by_group.setdefault((params[n].device, params[n].dtype), []).append(n)
        groups = []
        for (device, dtype), names in by_group.items():
            buffers = []
            for store in (self.anchor_, self.fisher_):
                flat = torch.cat([store[n].detach().reshape(-1).to(device, dtype) for n in names])
                views = flat.split([params[n].numel() for n in names])
                store.update({n: v.view(params[n].shape) for n, v in zip(names, views)})
                buffers.append(flat)
            groups.append(([params[n] for n in names], *buffers))
        self._packed = (model, groups)
        return groups

    def metrics(self) -> dict[str, float]:
        nbytes = sum(t.numel() * t.element_size() for d in (self.fisher_, self.anchor_) for t in d.values())
        return {"ewc_memory_mb": nbytes / 2**20}

    def state_dict(self) -> dict:
        return {"fisher": dict(self.fisher_), "anchor": dict(self.anchor_),
                "tasks_consolidated": self.tasks_consolidated_}

    def load_state_dict(self, state: dict) -> None:
        self.fisher_ = dict(state.get("fisher", {}))
        self.anchor_ = dict(state.get("anchor", {}))
        self._packed = None
        self.tasks_consolidated_ = int(state.get("tasks_consolidated", 0))

    def save(self, out_dir: str | Path) -> Path:
        """Write ``ewc_fisher.safetensors`` (``fisher/<name>``, ``anchor/<name>``) into ``out_dir``."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        # clones: views into one packed buffer share storage, which safetensors refuses
        tensors = {f"fisher/{n}": t.detach().clone() for n, t in self.fisher_.items()}
        tensors.update({f"anchor/{n}": t.detach().clone() for n, t in self.anchor_.items()})
        meta = {"lambda": str(self.config.lambda_), "gamma": str(self.config.gamma),
                "tasks_consolidated": str(self.tasks_consolidated_)}
        save_file(tensors, str(out / "ewc_fisher.safetensors"), metadata=meta)
        return out / "ewc_fisher.safetensors"

    def load(self, path: str | Path, device: str = "cpu") -> None:
        """Read back what ``save`` wrote (a file or the directory holding it)."""
        from safetensors import safe_open

        path = Path(path)
        path = path / "ewc_fisher.safetensors" if path.is_dir() else path
        fisher, anchor = {}, {}
        with safe_open(str(path), framework="pt", device=device) as f:
            for key in f.keys():
                kind, name = key.split("/", 1)
                (fisher if kind == "fisher" else anchor)[name] = f.get_tensor(key)
            self.tasks_consolidated_ = int((f.metadata() or {}).get("tasks_consolidated", 0))
        self.fisher_, self.anchor_ = fisher, anchor
        self._packed = None
