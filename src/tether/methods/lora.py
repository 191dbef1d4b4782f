"""LoRA: train a low-rank update ``W + (alpha / r) * B A`` and leave the base weights untouched.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", https://arxiv.org/abs/2106.09685.
Biderman et al., "LoRA Learns Less and Forgets Less", https://arxiv.org/abs/2405.09673, is why it
sits in a forgetting library. The wrapping itself is PEFT's; this file only validates the recipe,
logs what matched, and saves the result.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import Counter
from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import field_validator

from ..data.collate import Collator
from ..data.formats import IGNORE_INDEX
from ..models import is_peft_model
from ..registry import register_method
from ._contrast_init import sample_batches, set_contrast_directions
from ._lora_family import LoraFamilyConfig, lora_layers, match_targets, replace_module
from .base import Context, Method

log = logging.getLogger(__name__)

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoraMethodConfig(LoraFamilyConfig):
    """LoRA (https://arxiv.org/abs/2106.09685): ``h = W x + (alpha / r) * B A x``.

    Attributes:
        r, alpha, dropout: as in `LoraFamilyConfig` (defaults 16, 32, 0.05).
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

    key: ClassVar[str] = "lora"
    targets_are: ClassVar[str] = "'all-linear' or a non-empty list of module names"

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

    @field_validator("adapter_name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or "." in v:
            raise ValueError("lora.adapter_name must be a non-empty name without dots")
        return v


@register_method("lora")
class LoRA(Method):
    """Wrap the model with a PEFT LoRA adapter.

    Hooks: ``prepare_model`` (wrap; on an already-wrapped model, add or reuse the named adapter and
    make it trainable), ``lr_scale`` (LoRA+: ``lr_ratio`` on this adapter's ``B``). ``save`` writes
    the adapter in PEFT format or, with ``merge``, a merged full model loadable by
    ``AutoModelForCausalLM.from_pretrained``.
    """

    config_class = LoraMethodConfig
    trains = "adapters"
    base_view = True
    order = 10

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
            match_targets(model, list(c.target_modules), "lora")
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
        name = self.config.adapter_name
        config = model.peft_config[name]
        if isinstance(config.exclude_modules, str):  # a user's regex: leave the module set as PEFT built it
            return
        inner = model.get_base_model()
        dead = []
        for key, mod in lora_layers(inner, name).items():
            if set(mod.lora_A) != {name}:
                continue
            a, b = mod.lora_A[name].weight, mod.lora_B[name].weight
            if a.requires_grad or b.requires_grad or bool(b.detach().any()) or getattr(mod, "merged", False):
                continue
            if getattr(mod, "lora_magnitude_vector", None) and name in mod.lora_magnitude_vector:
                continue  # DoRA: not this method's adapter type, leave it
            dead.append(key)
        for key in dead:
            replace_module(inner, key, inner.get_submodule(key).get_base_layer())
        if dead:
            config.exclude_modules = sorted(set(config.exclude_modules or ()) | set(dead))
            log.info("lora: adapter %r taken off %d modules nothing trains (frozen, B = 0); %d keep it", name,
                     len(dead), len(lora_layers(model)))

    def _contrast(self, model: torch.nn.Module, ctx: Context) -> None:
        """Set each trained ``A`` to its layer's task-over-general input directions (see ``init``)."""
        name = self.config.adapter_name
        for what, rows in (("task", ctx.task_examples), ("general", ctx.general_examples)):
            if not rows:
                raise ValueError(f"lora.init 'contrast' needs {what} data to initialise from; none was given"
                                 + ("" if what == "task" else " (set general: with a replay split)"))
        layers = {n: m for n, m in lora_layers(model, name).items() if m.lora_B[name].weight.requires_grad}
        collate = Collator.for_tokenizer(ctx.tokenizer)
        size, n_batches, t0 = max(1, ctx.batch_size), self.config.init_batches, time.perf_counter()
        task, general = (sample_batches(rows, collate, size, n_batches, ctx.seed)
                         for rows in (ctx.task_examples, ctx.general_examples))
        read = set_contrast_directions(model, layers, name, task, general)
        log.info("lora: adapter %r's A set to task-over-general input directions on %d modules (%d task, "
                 "%d general positions, %.1f s)", name, len(layers), read["task"], read["general"],
                 time.perf_counter() - t0)

    def lr_scale(self, name: str, param: torch.nn.Parameter) -> float:
        return self.config.lr_ratio if f".lora_B.{self.config.adapter_name}." in name else 1.0

    def _log_matches(self, model: torch.nn.Module) -> None:
        mods = list(lora_layers(model))
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
