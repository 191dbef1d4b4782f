"""OPLoRA: a LoRA update projected off the base weight's top-k singular subspaces.

"OPLoRA: Orthogonal Projection LoRA Prevents Catastrophic Forgetting during Parameter-Efficient
Fine-Tuning", 2025, https://arxiv.org/abs/2510.13003. For a frozen weight ``W`` (``d_out x d_in``)
with top-``k`` singular vectors ``U_k`` (``d_out x k``) and ``V_k`` (``d_in x k``)::

    dW = s (I - U_k U_k^T) B A (I - V_k V_k^T),      s = alpha / r

so ``(W + dW) V_k = W V_k`` and ``U_k^T (W + dW) = U_k^T W``: the top-k singular triplets of ``W``,
where most of the pre-trained knowledge sits, stay exact singular triplets of the merged weight.
The projectors are never formed: the forward computes ``x -> x - (x V_k) V_k^T`` before ``A``
and ``y -> y - U_k (U_k^T y)`` after ``B`` (``O((d_in + d_out) k)`` extra per token).

Wiring: PEFT has no hook for a projection inside the LoRA branch, so this file injects its own
small wrapper, `OPLoRALinear` (not PEFT's ``LoraLayer``), into the target ``nn.Linear`` modules
and freezes everything else. ``merge`` folds ``dW`` into ``W`` and puts plain ``nn.Linear``
modules back; ``save_model`` saves such a merged copy. ``U_k, V_k`` come from
``torch.svd_lowrank`` (exact ``torch.linalg.svd`` when ``k + oversample`` covers the smaller
side), computed once per weight and cached in memory and optionally on disk.
"""

from __future__ import annotations

import copy
import logging
import math
import re
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import field_validator
from torch import nn

from ..io import atomic_path
from ..registry import register_method
from ._lora_family import LoraFamilyConfig, lora_layers, match_targets, replace_module
from .base import Context, Method

log = logging.getLogger(__name__)


class OPLoRAConfig(LoraFamilyConfig):
    """OPLoRA (https://arxiv.org/abs/2510.13003).

    Attributes:
        r, alpha, dropout, target_modules: as in `LoraFamilyConfig`; every target must be an ``nn.Linear``.
        k (int): singular directions of ``W`` protected on each side; ``< min(d_out, d_in)``.
        svd_niter (int): power iterations of the randomised SVD (more: more accurate).
        oversample (int): extra random directions beyond ``k`` in the randomised SVD.
        svd_cache_dir (str | None): directory for the ``U_k, V_k`` cache; ``None`` keeps it in memory.
    """

    key: ClassVar[str] = "oplora"

    k: int = 16
    svd_niter: int = 4
    oversample: int = 10
    svd_cache_dir: str | None = None

    @field_validator("k")
    @classmethod
    def _k(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("oplora.k must be > 0")
        return v

    @field_validator("svd_niter", "oversample")
    @classmethod
    def _non_negative(cls, v: int, info) -> int:
        if v < 0:
            raise ValueError(f"oplora.{info.field_name} must be >= 0")
        return v


def top_k_singular(W: torch.Tensor, k: int, *, niter: int = 4, oversample: int = 10,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U_k, S_k, V_k)`` of ``W`` in float32: randomised (seeded, global RNG untouched) unless
    ``k + oversample`` reaches ``min(W.shape)``, where the exact SVD is as cheap."""
    W = W.detach().float()
    q = k + oversample
    if q >= min(W.shape):
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return U[:, :k].contiguous(), S[:k].contiguous(), Vh[:k].T.contiguous()
    devices = [W.device] if W.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(W, q=q, niter=niter)
    return U[:, :k].contiguous(), S[:k].contiguous(), V[:, :k].contiguous()


def project_out(h: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``h (I - Q Q^T)`` for row vectors ``h`` and orthonormal columns ``Q``, without ``Q Q^T``."""
    return h - (h @ basis) @ basis.transpose(0, 1)


@torch.no_grad()
def subspace_energy(B: torch.Tensor, A: torch.Tensor, U: torch.Tensor,
                    V: torch.Tensor) -> tuple[float, float]:
    """Share of ``||B A||_F^2`` inside ``span(U)`` on the left and ``span(V)`` on the right.

    ``(||U^T B A||_F^2, ||B A V||_F^2) / ||B A||_F^2`` from ``r x r`` and ``k x r`` products only
    (``||X Y||_F^2 = <X^T X, Y Y^T>``), never forming the ``d_out x d_in`` product.
    """
    gram_a, gram_b = A @ A.T, B.T @ B
    total = float((gram_b * gram_a).sum())
    if total <= 0:
        return 0.0, 0.0
    UB, AV = U.T @ B, A @ V
    return float(((UB.T @ UB) * gram_a).sum()) / total, float((gram_b * (AV @ AV.T)).sum()) / total


class OPLoRALinear(nn.Module):
    """``y = W x + s P_U B A P_V x`` around a frozen ``nn.Linear`` (OPLoRA's adapter, not PEFT's).

    Args:
        base: the wrapped layer; its parameters are frozen.
        r, alpha: LoRA rank and scale numerator.
        U_k, V_k: orthonormal ``d_out x k`` and ``d_in x k`` bases to project out.
        dropout: dropout on the branch's input.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, U_k: torch.Tensor, V_k: torch.Tensor,
                 dropout: float = 0.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        d_out, d_in = base.weight.shape
        if U_k.shape[0] != d_out or V_k.shape[0] != d_in:
            raise ValueError(f"U_k {tuple(U_k.shape)} / V_k {tuple(V_k.shape)} do not fit a "
                             f"{d_out}x{d_in} weight")
        # adapter in float32 even under a bf16/fp16 base (as PEFT's autocast_adapter_dtype does)
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, d_in, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(d_out, r, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default: B = 0, so dW = 0 at start
        self.register_buffer("U_k", U_k.detach().float().to(dev), persistent=False)
        self.register_buffer("V_k", V_k.detach().float().to(dev), persistent=False)
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        h = project_out(self.dropout(x).to(self.lora_A.dtype), self.V_k)
        h = project_out(h @ self.lora_A.T @ self.lora_B.T, self.U_k)
        return y + (self.scaling * h).to(y.dtype)

    @torch.no_grad()
    def projected_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P_U B, A P_V)``: ``dW = s (P_U B)(A P_V)``."""
        return project_out(self.lora_B.T, self.U_k).T, project_out(self.lora_A, self.V_k)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """``dW`` (``d_out x d_in``, the weight's own size), for merging and checks."""
        Bp, Ap = self.projected_factors()
        return self.scaling * (Bp @ Ap)

    def rho_k(self) -> tuple[float, float]:
        """``rho_k`` of the applied update, left and right: ``||U_k^T dW||^2 / ||dW||^2`` (should be ~0)."""
        return subspace_energy(*self.projected_factors(), self.U_k, self.V_k)

    def raw_share(self) -> float:
        """Share of the *unprojected* ``B A`` in the protected left subspace: what the projection strips."""
        return subspace_energy(self.lora_B.detach(), self.lora_A.detach(), self.U_k, self.V_k)[0]


def merge(model: nn.Module) -> nn.Module:
    """Fold every ``dW`` into its base weight and put the plain ``nn.Linear`` back (in place)."""
    for name, layer in lora_layers(model, of=OPLoRALinear).items():
        base = layer.base
        base.weight.data += layer.delta_weight().to(base.weight.dtype)
        replace_module(model, name, base)
    return model


@register_method("oplora")
class OPLoRA(Method):
    """Inject `OPLoRALinear` into the targets; log ``rho_k``; save a merged model.

    Hooks: ``prepare_model`` (SVD + injection, idempotent: a second task keeps training the same
    adapter, still orthogonal to the *original* weight's subspaces), ``before_optimizer_step``
    (``rho_k`` per layer), ``save_model`` (merged copy, loadable by ``from_pretrained``).
    """

    config_class = OPLoRAConfig
    trains = "adapters"
    order = 10

    def __init__(self, config: OPLoRAConfig | dict | None = None):
        cfg = config if isinstance(config, OPLoRAConfig) else OPLoRAConfig.model_validate(config or {})
        super().__init__(cfg)
        self.svd_cache_: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.rho_: dict[str, tuple[float, float]] = {}
        self.raw_: dict[str, float] = {}

    def _targets(self, model: nn.Module) -> dict[str, nn.Linear]:
        found = match_targets(model, list(self.config.target_modules), "oplora")
        bad = [n for n, m in found.items() if not isinstance(m, nn.Linear)]
        if bad:
            raise ValueError(f"oplora.target_modules matched non-Linear modules {bad[:3]}")
        return found

    def singular_vectors(self, name: str, W: torch.Tensor, seed: int = 0):
        """``(U_k, S_k, V_k)`` of ``W``, from the memory cache, the disk cache, or a fresh SVD."""
        c = self.config
        key = f"{name}|{W.shape[0]}x{W.shape[1]}|k{c.k}"
        check = torch.tensor([float(W.double().sum()), float(W.double().abs().sum())], dtype=torch.float64)
        path = None
        if c.svd_cache_dir:
            path = Path(c.svd_cache_dir) / (re.sub(r"[^A-Za-z0-9_.-]", "_", key) + ".pt")
            if key not in self.svd_cache_ and path.exists():
                saved = torch.load(path, map_location="cpu", weights_only=True)
                # the checksum makes it the same weight, not just the same name and shape
                if torch.allclose(saved["check"], check, rtol=1e-9, atol=0):
                    self.svd_cache_[key] = (saved["U"], saved["S"], saved["V"])
        if key not in self.svd_cache_:
            self.svd_cache_[key] = tuple(t.cpu() for t in top_k_singular(
                W, c.k, niter=c.svd_niter, oversample=c.oversample, seed=seed))
            if path is not None:
                U, S, V = self.svd_cache_[key]
                with atomic_path(path) as tmp:
                    torch.save({"U": U, "S": S, "V": V, "check": check}, tmp)
        return self.svd_cache_[key]

    def prepare_model(self, model: nn.Module, ctx: Context) -> nn.Module:
        if lora_layers(model, of=OPLoRALinear):
            return model
        c = self.config
        targets = self._targets(model)
        small = {n: tuple(m.weight.shape) for n, m in targets.items() if c.k >= min(m.weight.shape)}
        if small:
            raise ValueError(f"oplora.k={c.k} must be < min(d_out, d_in) of every target; too small: {small}")
        model.requires_grad_(False)
        for name, lin in targets.items():
            U, _, V = self.singular_vectors(name, lin.weight, seed=ctx.seed)
            replace_module(model, name, OPLoRALinear(lin, c.r, c.alpha, U, V, c.dropout))
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()  # reentrant gradient checkpointing needs a grad-carrying input
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("oplora: %d modules wrapped, top-%d singular directions protected; %d parameters trainable",
                 len(targets), c.k, n_train)
        return model

    def before_optimizer_step(self, model: nn.Module, ctx: Context) -> None:
        layers = lora_layers(model, of=OPLoRALinear)
        self.rho_ = {n: m.rho_k() for n, m in layers.items()}
        self.raw_ = {n: m.raw_share() for n, m in layers.items()}

    def on_task_end(self, model: nn.Module, ctx: Context) -> None:
        self.before_optimizer_step(model, ctx)
        worst = max(self.rho_.items(), key=lambda kv: max(kv[1]), default=None)
        if worst is not None:
            log.info("oplora: task %d done; largest rho_k %.2e (%s)", ctx.task_index, max(worst[1]), worst[0])

    def metrics(self) -> dict[str, float]:
        if not self.rho_:
            return {}
        left = [v[0] for v in self.rho_.values()]
        right = [v[1] for v in self.rho_.values()]
        return {"rho_k_max": max(left), "rho_k_mean": sum(left) / len(left), "rho_k_right_max": max(right),
                "raw_topk_share_mean": sum(self.raw_.values()) / max(len(self.raw_), 1)}

    def save_model(self, model: nn.Module, out_dir: str | Path) -> Path:
        """Save a merged copy (plain ``nn.Linear`` weights); the training model keeps its adapters."""
        out = Path(out_dir)
        merge(copy.deepcopy(model)).save_pretrained(out, safe_serialization=True)
        log.info("oplora: saved the merged model to %s", out)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"rho": {n: list(v) for n, v in self.rho_.items()}, "raw": dict(self.raw_)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rho_ = {n: (float(v[0]), float(v[1])) for n, v in state.get("rho", {}).items()}
        self.raw_ = {n: float(v) for n, v in state.get("raw", {}).items()}
