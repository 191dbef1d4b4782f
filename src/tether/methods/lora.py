"""LoRA: train a low-rank update ``W + (alpha / r) * B A`` and leave the base weights untouched.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", https://arxiv.org/abs/2106.09685.
Biderman et al., "LoRA Learns Less and Forgets Less", https://arxiv.org/abs/2405.09673, is why it
sits in a forgetting library. The wrapping itself is PEFT's; this file only validates the recipe,
logs what matched, and saves the result.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, field_validator

from ..data.formats import IGNORE_INDEX
from ..models import is_peft_model
from ..registry import register_method
from .base import Context, Method

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
        init_batches (int): task batches EVA's incremental SVD may read.
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
    init: Literal["default", "eva"] = "default"
    init_batches: int = 16
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
            if f".lora_A.{c.adapter_name}." in name or f".lora_B.{c.adapter_name}." in name:
                p.requires_grad_(True)
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
