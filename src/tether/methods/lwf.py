"""Learning without Forgetting: distil the base model's next-token distributions while training.

Li & Hoiem, "Learning without Forgetting", https://arxiv.org/abs/1606.09282: keep the new model's
outputs on the new task's inputs close to the old model's, using the old model as a teacher.

    L_lwf = α T² · mean_{t: mask_t = 1} KL( softmax(z_t^old / T) || softmax(z_t / T) )

z_t are the logits at position t, T the temperature (the T² keeps gradient scale independent of
T, as in Hinton et al., https://arxiv.org/abs/1503.02531), and the mean runs over the batch's
non-padding positions. The teacher is the base model's view: under PEFT the *same* model with its
adapters disabled (no second copy), otherwise a frozen copy.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from .. import prefix
from ..data.collate import Collator
from ..data.formats import IGNORE_INDEX
from ..registry import register_method
from ._distill import lwf_kl, nontarget_kl, untrained_positions
from .base import Batch, Context, Method, Reference

log = logging.getLogger(__name__)


class LwFConfig(BaseModel):
    """Learning without Forgetting (https://arxiv.org/abs/1606.09282).

    Attributes:
        alpha (float): ``α``, weight of the distillation term.
        temperature (float): ``T`` > 0; higher values match more of the teacher's tail.
        on ("task" | "general" | "task+general"): where to distil: the task batch (the paper's LwF:
            it also pulls the task's own answers toward the base's, which slows learning the task),
            a mini-batch of general data drawn in a fixed, seeded order (the base's behaviour is
            kept where it matters and the task is learnt freely; one student and one teacher
            forward of ``general_batch_size`` examples per step), both, or ``replay``: the batch's
            own replay rows (needs the replay method; the student's logits are the ones the task
            loss already computed, so the only extra work is a teacher forward over those rows, and
            every position of them is distilled, prompts included, where replay's loss sees only
            the answers), or ``inputs``: every position of the batch whose next token the task loss
            does not train: the task rows' system prompt, chat template and user text (their answer
            positions stay free to learn the task) plus every position of replay rows. The student's
            logits are reused; the extra work is one teacher forward over the whole batch.
            ``inputs+general``: both ``inputs`` and a general mini-batch (more general positions held
            each step than the batch's few replay rows, at one more student and teacher forward).
        general_batch_size (int): examples per general mini-batch.
        general_alpha (float | None): ``α`` of the general mini-batch's term (default: ``alpha``).
        nontarget_alpha (float): weight of a further term at the task rows' *answer* positions: the
            KL between the base's and the model's distributions over the tokens no task answer uses,
            each renormalised (the non-target part of decoupled knowledge distillation, Zhao et al.,
            https://arxiv.org/abs/2203.08679, with "target" widened to the task's answer vocabulary:
            every token of its training answers, EOS included). Those tokens are left to the task
            loss, so the term does not resist learning the answers or telling them apart; it resists
            what learning them does to the ranking of everything else (after a one-word-label task:
            content words over the "The ..." / "a ..." openings the base gives other questions). A
            task whose answers are free text uses much of the vocabulary, and the term then sees
            little. With ``on: inputs`` or ``task`` it reuses their teacher forward over the batch;
            with the others it costs one. 0 (the default): off.
    """

    model_config = ConfigDict(extra="forbid")

    alpha: float = 1.0
    temperature: float = 2.0
    on: Literal["task", "general", "task+general", "replay", "inputs", "inputs+general"] = "task"
    general_batch_size: int = 4
    general_alpha: float | None = None
    nontarget_alpha: float = 0.0

    @field_validator("alpha", "general_alpha", "nontarget_alpha")
    @classmethod
    def _alpha(cls, v: float | None, info) -> float | None:
        if v is not None and v < 0:
            raise ValueError(f"lwf.{info.field_name} must be >= 0")
        return v

    @property
    def parts(self) -> frozenset[str]:
        """What ``on`` distils: ``"inputs+general"`` is ``{"inputs", "general"}``."""
        return frozenset(self.on.split("+"))

    @model_validator(mode="after")
    def _general_alpha_needs_a_general_batch(self) -> "LwFConfig":
        if self.general_alpha is not None and "general" not in self.parts:
            raise ValueError(f"lwf.general_alpha weighs the general mini-batch, which lwf.on {self.on!r} does not "
                             "distil; use on: general, task+general or inputs+general, or drop general_alpha")
        return self

    @field_validator("temperature")
    @classmethod
    def _t(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("lwf.temperature must be > 0")
        return v

    @field_validator("general_batch_size")
    @classmethod
    def _gbs(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("lwf.general_batch_size must be > 0")
        return v


def _logits(outputs) -> torch.Tensor | None:
    if outputs is None:
        return None
    return outputs["logits"] if isinstance(outputs, dict) else getattr(outputs, "logits", None)


def _student(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """The student's logits on ``batch`` (each of its prefix groups' shared prefix run once)."""
    return prefix.logits(model, batch.input_ids, batch.attention_mask, batch.prefix_groups)


def _rows(batch: Batch, rows: torch.Tensor) -> Batch:
    """The batch's ``rows`` alone, as a forward needs them (no prefix groups: the trainer planned the whole batch)."""
    mask = batch.attention_mask
    return Batch(input_ids=batch.input_ids[rows], labels=batch.labels[rows],
                 attention_mask=None if mask is None else mask[rows])


def _regrouped(batch: Batch, sharing: bool) -> Batch:
    """``batch`` (rows picked from the trainer's batch, or another batch; no groups yet) with prefix groups
    of its own when the trainer shares prefixes, so the extra forwards share theirs too."""
    if sharing:
        groups = prefix.plan(batch.input_ids, batch.attention_mask)
        if prefix.saves(groups, batch.input_ids.shape[1]):
            return dataclasses.replace(batch, prefix_groups=groups)
    return batch


@register_method("lwf")
class LwF(Method):
    """Distil the base model's next-token distributions into the model being trained.

    Hooks: ``extra_loss`` only -> ``{"lwf": ...}`` (task batch), ``{"lwf_general": ...}`` (general
    mini-batch), ``{"lwf_replay": ...}`` or ``{"lwf_inputs": ...}``, as ``on`` says. The teacher is
    ``ctx.reference`` (a `Reference`; the trainer builds it). Terms are per-token means and are returned
    undivided; the trainer's division by ``grad_accum_steps`` makes them scale like the task loss.
    """

    config_class = LwFConfig
    needs_reference = True

    def __init__(self, config: LwFConfig | dict | None = None):
        super().__init__(LwFConfig.model_validate(config or {}))
        self.general_cursor_ = 0
        self.answer_vocab_: torch.Tensor | None = None
        self.reference_: Reference | None = None  # the last teacher asked, for its metrics

    def check(self, others: dict[str, Method]) -> None:
        if "replay" in self.config.parts and not any("replay_rows" in m.provides() for m in others.values()):
            raise ValueError("methods.lwf.on: 'replay' distils on the batch's replay rows, but replay is off "
                             "(no method mixes replay rows in); switch replay on, or set lwf.on=general, or lwf=false")

    def on_task_start(self, model, ctx: Context) -> None:
        """With ``nontarget_alpha``: the task's answer vocabulary, which the non-target term leaves alone."""
        if not self.config.nontarget_alpha:
            return
        ids = sorted({t for e in ctx.task_examples for t in e.labels if t != IGNORE_INDEX})
        self.answer_vocab_ = torch.tensor(ids, dtype=torch.long)
        log.info("lwf: the non-target term leaves the %d token ids the task's answers use to the task loss", len(ids))

    @property
    def needs_general(self) -> bool:
        """Only a general mini-batch reads the replay split here; replay rows come from the replay method
        (which loads it), task and inputs distil the batch itself."""
        return "general" in self.config.parts

    def general_batch(self, ctx: Context) -> Batch | None:
        """The next general mini-batch, in a seeded order that does not depend on the task data."""
        pool = ctx.general_examples
        if not pool:
            return None
        order = list(range(len(pool)))
        random.Random(ctx.seed).shuffle(order)
        k = self.config.general_batch_size
        picked = [pool[order[(self.general_cursor_ + i) % len(pool)]] for i in range(min(k, len(pool)))]
        self.general_cursor_ = (self.general_cursor_ + k) % len(pool)
        return Batch.from_inputs(Collator.for_tokenizer(ctx.tokenizer)(picked))

    def extra_loss(self, model, batch: Batch, outputs, ctx: Context) -> dict[str, torch.Tensor]:
        if ctx.reference is None:
            raise RuntimeError("lwf needs ctx.reference (the base model's logits); build it with "
                               "tether.training.teacher.make_reference(model)")
        c = self.config
        on = c.parts
        terms = {}
        student, teacher = _logits(outputs), None
        nontarget = bool(c.nontarget_alpha)
        if "task" in on or "inputs" in on or nontarget:
            student = _student(model, batch) if student is None else student
            teacher = self._batch_teacher(model, batch, ctx)
        if "task" in on:
            terms["lwf"] = self._distil(model, batch, student, ctx, teacher=teacher)
        if "replay" in on:
            terms["lwf_replay"] = self._replay_term(model, batch, outputs, ctx)
        if "inputs" in on:
            mask = untrained_positions(batch.input_ids, batch.attention_mask, batch.labels, batch.is_replay)
            terms["lwf_inputs"] = self._distil(model, batch, student, ctx, mask=mask, teacher=teacher)
        if nontarget:
            task_rows = None if batch.is_replay is None else ~batch.is_replay.bool()
            terms["lwf_nontarget"] = c.nontarget_alpha * nontarget_kl(student, teacher, batch.labels, task_rows,
                                                                      c.temperature, self.answer_vocab_)
        if "general" in on:
            gb = self.general_batch(ctx)
            if gb is None:
                raise ValueError(f"lwf.on is {c.on!r} but there is no general data")
            device = next(model.parameters()).device
            gb = dataclasses.replace(gb, input_ids=gb.input_ids.to(device), labels=gb.labels.to(device),
                                     attention_mask=gb.attention_mask.to(device))
            terms["lwf_general"] = self._distil(model, _regrouped(gb, batch.prefix_groups is not None), None, ctx,
                                                alpha=c.general_alpha)
        return terms

    def _batch_teacher(self, model, batch: Batch, ctx: Context) -> torch.Tensor:
        """The teacher's logits on the whole batch. Where the student ran its rows whole only because of
        dropout, the teacher (eval mode) runs each shared prefix once (the trainer's
        ``teacher_prefix_groups``); it then cannot start from the student's activations."""
        groups = batch.teacher_prefix_groups
        if groups and batch.prefix_groups is None:
            return self._reference(model, dataclasses.replace(batch, prefix_groups=groups), ctx, same=False)
        return self._reference(model, batch, ctx)

    def _reference(self, model, batch: Batch, ctx: Context, same: bool = True) -> torch.Tensor:
        """The teacher's logits on ``batch``, asked right after the student's forward; ``same``: that
        forward ran exactly ``batch``, so the teacher may start from its activations."""
        ref = self.reference_ = ctx.reference
        return ref(model, batch, student_ran=same and model.training)

    def _distil(self, model, batch: Batch, student: torch.Tensor | None, ctx: Context,
                mask: torch.Tensor | None = None, same: bool = True, alpha: float | None = None,
                teacher: torch.Tensor | None = None) -> torch.Tensor:
        """``α · lwf_kl`` of the student's logits (the ones given, else a forward of ``batch``)
        against the teacher's on ``batch`` (``teacher``, else computed), over ``mask`` (default: the
        non-padding positions).
        ``same``: the student's forward ran exactly ``batch`` (not a subset of its rows)."""
        ran = student is not None
        if student is None:
            student = _student(model, batch)
        if teacher is None:
            teacher = self._reference(model, batch, ctx, same=same or not ran)
        if mask is None:
            mask = batch.attention_mask
        alpha = self.config.alpha if alpha is None else alpha
        return alpha * lwf_kl(student, teacher, mask, self.config.temperature)

    def _replay_term(self, model, batch: Batch, outputs, ctx: Context) -> torch.Tensor:
        flags = batch.is_replay
        if flags is None:
            raise ValueError("lwf.on is 'replay' but the batch marks no replay rows: add the replay method "
                             "(methods: {replay: {ratio: 0.2}}) or use lwf.on: general")
        rows = flags.to(batch.input_ids.device).nonzero().squeeze(-1)
        if rows.numel() == 0:
            return torch.zeros((), device=batch.input_ids.device)
        student = _logits(outputs)
        return self._distil(model, _regrouped(_rows(batch, rows), batch.prefix_groups is not None),
                            None if student is None else student[rows], ctx, same=student is None)

    def metrics(self) -> dict[str, float]:
        out = {} if self.reference_ is None else {"teacher_skips_blocks": float(self.reference_.skipped_blocks)}
        if self.answer_vocab_ is not None:
            out["nontarget_answer_vocab"] = float(self.answer_vocab_.numel())
        return out

    def state_dict(self) -> dict:
        return {"general_cursor": self.general_cursor_}

    def load_state_dict(self, state: dict) -> None:
        self.general_cursor_ = int(state.get("general_cursor", 0))
