"""LoRA: train a low-rank update ``W + (alpha / r) * B A`` and leave the base weights untouched.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", https://arxiv.org/abs/2106.09685.
Biderman et al., "LoRA Learns Less and Forgets Less", https://arxiv.org/abs/2405.09673, is why it
sits in a forgetting library. The wrapping itself is PEFT's; this file only validates the recipe,
logs what matched, and saves the result.
"""

from __future__ import annotations

import copy
import logging
import random
import time
from collections import Counter
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, field_validator

from ..data.formats import IGNORE_INDEX
from ..models import is_peft_model
from ..registry import register_method
from .base import Context, Method, eval_mode

log = logging.getLogger(__name__)

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoraMethodConfig(BaseModel):
    """LoRA (https://arxiv.org/abs/2106.09685): ``h = W x + (alpha / r) * B A x``.

    Attributes:
        r (int): rank of ``A`` (``r x d_in``) and ``B`` (``d_out x r``).
        alpha (float): scale numerator; the update is multiplied by ``alpha / r``.
        dropout (float): dropout on the LoRA branch's input, in ``[0, 1)``.
        target_modules (list[str] | "all-linear"): module-name suffixes to adapt (``q_proj``
            matches ``model.layers.3.self_attn.q_proj``), or ``"all-linear"`` for every linear
            layer but the output head. Every listed name must match at least one module.
        lr_ratio (float): LoRA+ (Hayou et al., https://arxiv.org/abs/2402.12354): the ``B`` matrices
            learn at ``lr * lr_ratio``, ``A`` at ``lr``. Both start so that ``B A = 0`` but have
            different roles; one learning rate for both leaves ``B`` too slow, so LoRA learns less per
            step than full fine-tuning (the paper uses 2-16; 1 = plain LoRA). PEFT's
            ``create_loraplus_optimizer`` does the same grouping.
        init ("default" | "eva"): how ``A`` starts (``B`` starts at 0 either way, so the model
            starts as the base and the adapter-disabled view stays the base model). ``default``:
            PEFT's random ``A``. ``eva``: EVA (Paischer et al., https://arxiv.org/abs/2410.07170,
            PEFT's ``initialize_lora_eva_weights``): each ``A`` holds the leading right singular
            vectors of its layer's inputs on the task data, so the first steps move the directions
            the task's activations vary in. Costs forward passes over at most ``init_batches`` task
            batches before training; every layer keeps rank ``r`` (EVA's ``rho`` 1).
            ``contrast``: each ``A`` holds the directions in which its layer's inputs carry the most
            energy on the task data *relative to* the general data: the top ``r`` solutions of
            ``C_task v = lambda (C_general + eps I) v`` (``C``: uncentred second moments of the layer's
            inputs over ~4k non-padding positions of each, from at most ``init_batches`` batches of
            rows sampled with the run seed; ``eps``: 1% of ``C_general``'s mean eigenvalue). Only
            adapters that train (after ``freeze``) are set, once per run, at task start. Why: the
            update ``B A x`` is then small wherever ``x`` looks like general text, so what the
            adapter learns reaches general inputs less (the drift probe's KL and agreement). The
            same aim as CorDA's knowledge-preserved mode (Yang et al., https://arxiv.org/abs/2406.05223)
            and LoRA-Null (https://arxiv.org/abs/2503.02659), which start ``A`` outside the general
            data's principal subspace but rewrite the base weights (so the adapter-disabled view is no
            longer the base model, which LwF and drift rely on); this keeps ``W`` and ``B = 0``. Needs
            general data (the replay split).
        init_batches (int): task batches EVA's incremental SVD may read; with ``contrast``, the most
            task and general batches each may read for their second moments.
        freeze_a (bool): keep ``A`` at its initial value and train only ``B`` (LoRA-Null's v2, for
            ``contrast``: ``A`` stays in the task-over-general directions instead of drifting toward
            the gradient's, which general inputs share).
        trainable_tokens ("none" | "answers"): ``answers`` also trains the embedding rows of the
            tokens the task's answers are made of (special tokens excepted), through PEFT's
            ``trainable_token_indices``; with tied embeddings (SmolLM2, Qwen2, Llama 3.2) these are
            the output rows as well. Why: full fine-tuning moves the output rows of a narrow task's
            label words directly, while LoRA on the blocks can only steer the hidden state toward
            them. Costs those rows' weights (the demo task: 11 x 576 on SmolLM2) and a copy of the
            embedding matrix per forward (PEFT writes the rows into a merged weight): within the
            noise of a SmolLM2 step on CPU (bench/step_overhead.py).
        merge_on_save (bool): save a merged full model instead of the adapter.
        adapter_name (str): PEFT adapter name.
    """

    model_config = ConfigDict(extra="forbid")

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] | Literal["all-linear"] = DEFAULT_TARGETS.copy()
    lr_ratio: float = 1.0
    init: Literal["default", "eva", "contrast"] = "default"
    init_batches: int = 16
    freeze_a: bool = False
    trainable_tokens: Literal["none", "answers"] = "none"
    merge_on_save: bool = False
    adapter_name: str = "default"

    @field_validator("r")
    @classmethod
    def _r(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("lora.r must be > 0")
        return v

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("lora.alpha must be > 0")
        return v

    @field_validator("dropout")
    @classmethod
    def _dropout(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError("lora.dropout must be in [0, 1)")
        return v

    @field_validator("lr_ratio")
    @classmethod
    def _lr_ratio(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("lora.lr_ratio must be > 0")
        return v

    @field_validator("init_batches")
    @classmethod
    def _init_batches(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("lora.init_batches must be > 0")
        return v

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v):
        if isinstance(v, list) and (not v or any(not t for t in v)):
            raise ValueError("lora.target_modules must be 'all-linear' or a non-empty list of module names")
        return v

    @field_validator("adapter_name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or "." in v:
            raise ValueError("lora.adapter_name must be a non-empty name without dots")
        return v


def check_targets(model: torch.nn.Module, targets: list[str]) -> dict[str, int]:
    """Count the modules each target suffix matches; raise on a target that matches none.

    PEFT only raises when *nothing* matches, so a typo in one of seven names goes unnoticed.
    """
    names = [n for n, _ in model.named_modules()]
    counts = {t: sum(1 for n in names if n == t or n.endswith("." + t)) for t in targets}
    missing = [t for t, c in counts.items() if c == 0]
    if missing:
        listed = ", ".join(map(repr, missing))
        raise ValueError(f"lora.target_modules: {listed} matched no module of the model")
    return counts


#: bytes of second moments held at once by `lora.init: contrast` (two float64 ``d_in x d_in`` per layer);
#: more layers than fit are done in several passes over the same batches
MOMENT_BYTES = 2 * 2**30


def moment_chunks(layers: dict[str, torch.nn.Module], adapter: str, budget: int | None = None
                  ) -> list[dict[str, torch.nn.Module]]:
    """Consecutive groups of ``layers`` whose task and general moments fit ``budget`` (one layer at least).

    Counts every layer's own matrices, though q/k/v (and gate/up) share one: an 8B model's MLP input
    alone is 14336 wide (1.6 GB per moment), so all of them at once would not fit anywhere.
    """
    budget = MOMENT_BYTES if budget is None else budget
    chunks: list[dict[str, torch.nn.Module]] = [{}]
    used = 0
    for n, m in layers.items():
        cost = 2 * 8 * m.lora_A[adapter].in_features ** 2
        if chunks[-1] and used + cost > budget:
            chunks.append({})
            used = 0
        chunks[-1][n] = m
        used += cost
    return [c for c in chunks if c]


class _Enough(Exception):
    """Raised by the last hooked layer's pre-hook: nothing after it is needed."""


def input_moments(model: torch.nn.Module, layers: dict[str, torch.nn.Module], batches: list[dict],
                  positions: int = 4096) -> tuple[dict[str, torch.Tensor], int]:
    """Each layer's uncentred input second moment ``E[x x^T]`` (float64) over non-padding positions.

    Reads batches until ``positions`` non-padding positions are in (every position of each batch
    read): the forwards and the products cost ``positions * d^2`` per distinct input, and every
    position of 16 batches of long general rows took minutes on a CPU. Layers fed the same tensor
    (q/k/v, gate/up) share one product per batch and one result object, so callers can solve once
    per distinct input. Runs the decoder body only when it can (no output head: a vocabulary-wide
    product per position that no adapted layer reads), and stops each forward at the last hooked
    layer's input (``layers`` in execution order).
    """
    device = next(model.parameters()).device
    group: dict[str, int] = {}  # layer -> index of the input it reads (fixed by the first batch)
    sums: dict[int, torch.Tensor] = {}
    state: dict = {"rows": None, "seen": {}}
    count = 0

    def hook(name):
        def pre(mod, args):
            x = args[0]
            # the tensor is kept alive for the whole forward, so its address names it uniquely
            key = (x.data_ptr(), tuple(x.shape))
            if key not in state["seen"]:
                flat = x.reshape(-1, x.shape[-1])[state["rows"]].float()
                state["seen"][key] = (x, (flat.T @ flat).double(), len(state["seen"]))
            _, g, idx = state["seen"][key]
            if group.setdefault(name, idx) != idx:
                raise RuntimeError(f"lora: {name}'s input changed identity between batches")
            if idx not in state["added"]:
                sums[idx] = sums[idx] + g if idx in sums else g
                state["added"].add(idx)
            if name == last:
                raise _Enough
        return pre

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(base, getattr(base, "base_model_prefix", ""), None)
    run = body if isinstance(body, torch.nn.Module) and not any(
        n.startswith("lm_head") or ".lm_head" in n for n in layers) else model
    last = next(reversed(layers))
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        with torch.no_grad(), eval_mode(list(model.modules())):
            for b in batches:
                if count >= positions:
                    break
                b = {k: v.to(device) for k, v in b.items()}
                rows = b["attention_mask"].reshape(-1).nonzero().squeeze(1)
                state.update(rows=rows, seen={}, added=set())
                count += len(rows)
                try:
                    run(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                except _Enough:
                    pass
    finally:
        for h in handles:
            h.remove()
    means = {idx: g / max(count, 1) for idx, g in sums.items()}
    return {n: means[idx] for n, idx in group.items()}, count


def contrast_directions(c_task: torch.Tensor, c_general: torch.Tensor, r: int, eps: float = 1e-2) -> torch.Tensor:
    """The ``r`` unit vectors (columns, ``[d, r]``) maximising ``v' C_task v / v' (C_general + eps m I) v``.

    ``m`` is ``C_general``'s mean eigenvalue: the ridge keeps directions neither data set uses
    (ratio 0/0, noise) from winning. Solved as a symmetric eigenproblem after whitening by the
    Cholesky factor of the regularised general moment, in float64.
    """
    d = c_general.shape[0]
    reg = c_general + eps * float(torch.trace(c_general)) / d * torch.eye(d, dtype=c_general.dtype,
                                                                         device=c_general.device)
    chol = torch.linalg.cholesky(reg)
    inv = torch.linalg.solve_triangular(chol, torch.eye(d, dtype=reg.dtype, device=reg.device), upper=False)
    _, vecs = torch.linalg.eigh(inv @ c_task @ inv.T)  # ascending eigenvalues
    v = inv.T @ vecs[:, -r:].flip(-1)
    return (v / v.norm(dim=0, keepdim=True)).to(torch.float32)


def adapted_modules(model: torch.nn.Module) -> list[str]:
    """Names of the modules carrying a LoRA branch."""
    return [n for n, m in model.named_modules() if hasattr(m, "lora_A") and len(getattr(m, "lora_A", ())) > 0]


@register_method("lora")
class LoRA(Method):
    """Wrap the model with a PEFT LoRA adapter.

    Hooks: ``prepare_model`` (wrap; on an already-wrapped model, add or reuse the named adapter and
    make it trainable), ``lr_scale`` (LoRA+: ``lr_ratio`` on this adapter's ``B``). ``save`` writes
    the adapter in PEFT format or, with ``merge``, a merged full model loadable by
    ``AutoModelForCausalLM.from_pretrained``.
    """

    config_class = LoraMethodConfig

    def __init__(self, config: LoraMethodConfig | dict | None = None):
        super().__init__(LoraMethodConfig.model_validate(config or {}))
        self._contrasted = False

    def peft_config(self, token_ids: list[int] | None = None):
        from peft import LoraConfig

        c = self.config
        targets = c.target_modules if c.target_modules == "all-linear" else list(c.target_modules)
        extra = {}
        if c.init == "eva":
            from peft import EvaConfig

            # every non-padding position: a task row's label is a few tokens, too few for a stable SVD
            extra = {"init_lora_weights": "eva", "eva_config": EvaConfig(rho=1.0, use_label_mask=False)}
        if token_ids:
            extra["trainable_token_indices"] = list(token_ids)
        return LoraConfig(r=c.r, lora_alpha=c.alpha, lora_dropout=c.dropout, target_modules=targets,
                          task_type="CAUSAL_LM", bias="none", **extra)

    def answer_tokens(self, ctx: Context) -> list[int]:
        """The token ids the task's answers (label != -100) use, special tokens excepted, sorted."""
        if not ctx.task_examples:
            raise ValueError("lora.trainable_tokens 'answers' needs the task data to read the answers from; "
                             "none was given")
        special = set(getattr(ctx.tokenizer, "all_special_ids", None) or [])
        ids = sorted({int(t) for e in ctx.task_examples for t in e.labels if t != IGNORE_INDEX} - special)
        if not ids:
            raise ValueError("lora.trainable_tokens 'answers': the task's answers hold no non-special token")
        return ids

    def prepare_model(self, model: torch.nn.Module, ctx: Context) -> torch.nn.Module:
        from peft import get_peft_model

        c = self.config
        if c.target_modules != "all-linear":
            check_targets(model, list(c.target_modules))
        tokens = self.answer_tokens(ctx) if c.trainable_tokens == "answers" else None
        if not is_peft_model(model):
            model = get_peft_model(model, self.peft_config(tokens), adapter_name=c.adapter_name)
        elif c.adapter_name not in model.peft_config:
            if tokens:
                raise ValueError("lora.trainable_tokens 'answers' needs a model without an adapter yet (one run, "
                                 "or the first task of a sequence)")
            model.add_adapter(c.adapter_name, self.peft_config())
        if tokens:
            shown = ", ".join(repr(ctx.tokenizer.decode([t])) for t in tokens[:16])
            log.info("lora: training the embedding rows of %d answer tokens: %s%s", len(tokens), shown,
                     " ..." if len(tokens) > 16 else "")
        model.set_adapter(c.adapter_name)
        if c.init == "eva":
            self._eva(model, ctx)
        for name, p in model.named_parameters():
            if f".lora_B.{c.adapter_name}." in name or (f".lora_A.{c.adapter_name}." in name and not c.freeze_a):
                p.requires_grad_(True)
            elif f".lora_A.{c.adapter_name}." in name:
                p.requires_grad_(False)
        self._log_matches(model)
        return model

    def _eva(self, model: torch.nn.Module, ctx: Context) -> None:
        """EVA-initialise this adapter's ``A`` from the task data (PEFT does the SVD)."""
        from peft.tuners.lora.eva import initialize_lora_eva_weights

        from ..data.collate import Collator

        if not ctx.task_examples:
            raise ValueError("lora.init 'eva' needs the task data to initialise from; none was given")
        collate = Collator.for_tokenizer(ctx.tokenizer)
        device = next(model.parameters()).device
        rows, size = ctx.task_examples, max(1, ctx.batch_size)
        batches = [{k: v.to(device) for k, v in collate(rows[i:i + size]).items()}
                   for i in range(0, min(len(rows), size * self.config.init_batches), size)]
        with torch.random.fork_rng(devices=[]):  # its SVD is randomised: the run seed makes it repeatable
            torch.manual_seed(ctx.seed)
            initialize_lora_eva_weights(model, dataloader=batches, adapter_name=self.config.adapter_name,
                                        show_progress_bar=False)
        log.info("lora: EVA-initialised adapter %r from %d task batches", self.config.adapter_name, len(batches))

    @property
    def needs_general(self) -> bool:
        return self.config.init == "contrast"

    def on_task_start(self, model: torch.nn.Module, ctx: Context) -> None:
        # here, not in prepare_model: methods after this one (freeze) have decided which adapters train,
        # and only those are worth the second moments (half the blocks with the default recipe)
        if self.config.init == "contrast" and not self._contrasted:
            self._contrast(model, ctx)
            self._contrasted = True
        self._drop_dead(model)

    def _drop_dead(self, model: torch.nn.Module) -> None:
        """Take this adapter off the modules where it can change nothing: ``A`` and ``B`` frozen by a
        later method (freeze's lower blocks) and ``B`` zero. They cost a forward matmul each and half the
        saved adapter under the default recipe; ``exclude_modules`` in the PEFT config records them, so the
        saved adapter reloads with ``PeftModel.from_pretrained`` onto the same modules. A module holding
        another adapter too keeps its wrapper."""
        from peft.tuners.lora import LoraLayer
        from peft.utils import _get_submodules

        name = self.config.adapter_name
        config = model.peft_config[name]
        if isinstance(config.exclude_modules, str):  # a user's regex: leave the module set as PEFT built it
            return
        inner = model.get_base_model()
        dead = []
        for key, mod in inner.named_modules():
            if not isinstance(mod, LoraLayer) or name not in mod.lora_A or set(mod.lora_A) != {name}:
                continue
            a, b = mod.lora_A[name].weight, mod.lora_B[name].weight
            if a.requires_grad or b.requires_grad or bool(b.detach().any()) or getattr(mod, "merged", False):
                continue
            if getattr(mod, "lora_magnitude_vector", None) and name in mod.lora_magnitude_vector:
                continue  # DoRA: not this method's adapter type, leave it
            dead.append(key)
        for key in dead:
            parent, target, target_name = _get_submodules(inner, key)
            setattr(parent, target_name, target.get_base_layer())
        if dead:
            config.exclude_modules = sorted(set(config.exclude_modules or ()) | set(dead))
            log.info("lora: adapter %r taken off %d modules nothing trains (frozen, B = 0); %d keep it", name,
                     len(dead), len(adapted_modules(model)))

    def _contrast(self, model: torch.nn.Module, ctx: Context) -> None:
        """Set each trained ``A`` to its layer's task-over-general input directions (see ``init``)."""
        from ..data.collate import Collator

        name = self.config.adapter_name
        for what, rows in (("task", ctx.task_examples), ("general", ctx.general_examples)):
            if not rows:
                raise ValueError(f"lora.init 'contrast' needs {what} data to initialise from; none was given"
                                 + ("" if what == "task" else " (set general: with a replay split)"))
        layers = {n: m for n, m in model.named_modules()
                  if name in getattr(m, "lora_A", {}) and m.lora_B[name].weight.requires_grad}
        collate = Collator.for_tokenizer(ctx.tokenizer)
        size, n_batches, t0 = max(1, ctx.batch_size), self.config.init_batches, time.perf_counter()
        batches = {}
        for what, rows in (("task", ctx.task_examples), ("general", ctx.general_examples)):
            picked = random.Random(ctx.seed).sample(rows, min(len(rows), size * n_batches))
            batches[what] = [collate(picked[i:i + size]) for i in range(0, len(picked), size)]
        read = {}
        for chunk in moment_chunks(layers, name):
            moments = {}
            for what in ("task", "general"):
                moments[what], read[what] = input_moments(model, chunk, batches[what])
            solved: dict[tuple[int, int, int], torch.Tensor] = {}  # layers reading one input share the solve
            with torch.no_grad():
                for n, mod in chunk.items():
                    a = mod.lora_A[name].weight
                    key = (id(moments["task"][n]), id(moments["general"][n]), a.shape[0])
                    if key not in solved:
                        solved[key] = contrast_directions(moments["task"][n], moments["general"][n], a.shape[0])
                    a.copy_(solved[key].T.to(a.dtype))
        log.info("lora: adapter %r's A set to task-over-general input directions on %d modules (%d task, "
                 "%d general positions, %.1f s)", name, len(layers), read["task"], read["general"],
                 time.perf_counter() - t0)

    def lr_scale(self, name: str, param: torch.nn.Parameter) -> float:
        return self.config.lr_ratio if f".lora_B.{self.config.adapter_name}." in name else 1.0

    def _log_matches(self, model: torch.nn.Module) -> None:
        mods = adapted_modules(model)
        kinds = Counter(n.rsplit(".", 1)[-1] for n in mods)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        log.info("lora: adapter %r on %d modules (%s); %d of %d parameters trainable (%.2f%%)",
                 self.config.adapter_name, len(mods),
                 ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items())),
                 n_train, n_all, 100.0 * n_train / max(n_all, 1))
        log.debug("lora: adapted modules: %s", mods)

    def save_model(self, model: torch.nn.Module, out_dir: str | Path, merge: bool | None = None) -> Path:
        """Save the adapter (PEFT format) or, with ``merge``, the merged full model.

        Args:
            model: the PEFT-wrapped model returned by ``prepare_model``.
            out_dir: target directory (created).
            merge: merge ``B A`` into the base weights first; ``None`` means ``merge_on_save``.
                Merging works on a copy so the training model keeps its adapter (costs one
                extra model's worth of memory, once, at the end).
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        merge = self.config.merge_on_save if merge is None else merge
        if not is_peft_model(model):
            raise ValueError("lora.save_model needs the PEFT-wrapped model that prepare_model returned")
        if merge:
            merged = copy.deepcopy(model).merge_and_unload()
            merged.save_pretrained(out)
            log.info("lora: saved the merged model to %s", out)
        else:
            model.save_pretrained(out, selected_adapters=[self.config.adapter_name])
            log.info("lora: saved adapter %r to %s", self.config.adapter_name, out)
        return out
