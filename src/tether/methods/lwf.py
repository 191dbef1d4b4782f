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

import copy
import logging
import random
from collections.abc import Callable
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from .. import prefix, trunk
from ..data.collate import Collator
from ..data.formats import IGNORE_INDEX
from ..models import adapter_layers, adapters_off, unwrap_parallel
from ..registry import register_method
from .base import Context, Method, eval_mode

log = logging.getLogger(__name__)

# (model, batch) -> the base model's logits; ``student_ran=True`` says the student has just run exactly
# this batch (its rows, its prefix groups) in training mode, so the teacher may start from its activations
Reference = Callable[..., torch.Tensor]


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


def _softmax_lse(logits: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``softmax(x/T)``, ``logsumexp(x/T)`` per row and ``x/T``, with a single ``exp`` pass."""
    scaled = logits.float() / temperature
    peak = scaled.amax(dim=-1, keepdim=True)
    e = (scaled - peak).exp_()
    z = e.sum(dim=-1, keepdim=True)
    return e.div_(z), (peak + z.log()).squeeze(-1), scaled


class _DistilKL(torch.autograd.Function):
    """``T² · Σ_r w_r KL(softmax(t_r/T) || softmax(s_r/T))`` over ``[R, V]`` logits, in chunks: over
    ``rows`` (every row when ``None``), weighted by ``weights`` (1 when ``None``).

    Why not ``F.kl_div`` on log-softmaxes: on a 49k vocabulary that materialises five full
    ``[B, L, V]`` float32 tensors forward and as many backward, which together cost about as much as
    the teacher's forward pass. Here a few rows at a time are reduced while they sit in cache, and
    the gradient ``T · (softmax(s/T) - softmax(t/T))`` is written once, so backward is one multiply.
    """

    @staticmethod
    def forward(ctx, student, teacher, rows: torch.Tensor | None, weights: torch.Tensor | None,
                temperature: float, chunk: int):
        grad = torch.zeros(student.shape, dtype=torch.float32, device=student.device)
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        n = student.shape[0] if rows is None else rows.numel()
        for i in range(0, n, chunk):
            if rows is None:
                s_rows, t_rows = student[i:i + chunk], teacher[i:i + chunk]
            else:
                idx = rows[i:i + chunk]
                s_rows, t_rows = student.index_select(0, idx), teacher.index_select(0, idx)
            # one exp per element per side: KL_row = Σ p·(t - s)/T - lse(t/T) + lse(s/T)
            p, lse_p, t_scaled = _softmax_lse(t_rows, temperature)
            q, lse_q, s_scaled = _softmax_lse(s_rows, temperature)
            kl = (p * t_scaled.sub_(s_scaled)).sum(-1) - lse_p + lse_q
            g = q.sub_(p).mul_(temperature)
            if weights is not None:
                kl = kl * weights[i:i + chunk]
                g.mul_(weights[i:i + chunk, None])
            total += kl.sum()
            if rows is None:
                grad[i:i + chunk] = g
            else:
                grad.index_copy_(0, idx, g)
        ctx.save_for_backward(grad)
        ctx.student_dtype = student.dtype
        return total * (temperature * temperature)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * grad_out).to(ctx.student_dtype), None, None, None, None, None


def lwf_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None,
           temperature: float, chunk: int | None = None, gather: bool | None = None) -> torch.Tensor:
    """``T² · mean over mask`` of ``KL(softmax(teacher/T) || softmax(student/T))``; [B, L, V] inputs.

    In float32; the teacher is detached, so only the student gets a gradient. ``chunk`` rows are
    reduced at a time: by default 8 on a CPU (they stay in cache) and ~32M logits' worth elsewhere,
    where the kernel count is what costs (8 rows at a time was ~1,000 kernel launches for one batch
    of 8 x 94 tokens). ``gather`` (default: on a CPU) computes only the unmasked rows; finding them
    makes the host wait for the GPU, so there every row is computed and masked rows weigh 0.
    """
    vocab = student_logits.shape[-1]
    cpu = student_logits.device.type == "cpu"
    if chunk is None:
        chunk = 8 if cpu else max(8, (1 << 25) // vocab)
    student, teacher = student_logits.reshape(-1, vocab), teacher_logits.detach().reshape(-1, vocab)
    gather = cpu if gather is None else gather
    rows = weights = None
    if mask is None:
        count = student.shape[0]
    elif gather:
        rows = mask.reshape(-1).nonzero().squeeze(-1).to(student.device)
        count = rows.numel()
        if count == 0:
            return student_logits.sum() * 0.0
    else:
        weights = mask.reshape(-1).to(student.device, torch.float32)
        count = weights.sum().clamp_min(1.0)
    return _DistilKL.apply(student, teacher, rows, weights, float(temperature), chunk) / count


def next_labels(labels: torch.Tensor) -> torch.Tensor:
    """``[B, L]``: at position ``t`` the label of token ``t + 1``, the one its logits predict (``IGNORE_INDEX``
    at the last position)."""
    out = torch.full_like(labels, IGNORE_INDEX)
    out[:, :-1] = labels[:, 1:]
    return out


def nontarget_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                 rows: torch.Tensor | None, temperature: float, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """``T² · mean`` over the positions predicting a target token of ``rows`` (every row when ``None``)
    of ``KL(p̂ || q̂)``, where ``p̂``, ``q̂`` are ``softmax(teacher/T)``, ``softmax(student/T)`` with the
    target token and the ``exclude`` ids removed and the rest renormalised. Those logits get no
    gradient: the term is blind to how sure the model is of the answer and sees only how it ranks
    the alternatives."""
    vocab = student_logits.shape[-1]
    target = next_labels(labels)
    predicts = target != IGNORE_INDEX
    if rows is not None:
        predicts &= rows.to(labels.device, torch.bool)[:, None]
    idx = predicts.reshape(-1).nonzero().squeeze(-1)
    if idx.numel() == 0:
        return student_logits.sum() * 0.0
    target = target.reshape(-1)[idx].to(student_logits.device)[:, None]
    idx = idx.to(student_logits.device)
    s = student_logits.reshape(-1, vocab).index_select(0, idx).float() / temperature
    t = teacher_logits.detach().reshape(-1, vocab).index_select(0, idx).float() / temperature
    # a finite floor, not -inf: the target's probability underflows to exactly 0 and 0 * finite stays 0
    s = s.scatter(1, target, -1e9)
    t = t.scatter(1, target, -1e9)
    if exclude is not None and exclude.numel():
        cols = exclude.to(s.device)
        s, t = s.index_fill(1, cols, -1e9), t.index_fill(1, cols, -1e9)
    logp, logq = t.log_softmax(-1), s.log_softmax(-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    return kl.mean() * (temperature * temperature)


def untrained_positions(batch: dict) -> torch.Tensor:
    """``[B, L]`` bool: the non-padding positions whose next token the task loss does not train.

    Logits at position ``t`` predict token ``t + 1``, so a position is excluded when ``labels[t + 1]``
    is a target, except on replay rows (``is_replay``), which are kept whole: their targets are
    general text the base model should go on predicting as it did.
    """
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    labels = batch.get("labels")
    if labels is None:
        return keep
    predicts_target = next_labels(labels) != IGNORE_INDEX
    flags = batch.get("is_replay")
    if flags is not None:
        predicts_target &= ~flags.to(ids.device)[:, None]
    return keep & ~predicts_target


def _forward_inputs(batch: dict) -> dict:
    """What a forward of ``batch`` needs: its ids and mask, and the trainer's ``prefix_groups`` if any."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "prefix_groups") if k in batch}


def _regrouped(inputs: dict, sharing: bool) -> dict:
    """``inputs`` (rows picked from a batch, or another batch; no groups yet) with prefix groups of
    their own when the trainer shares prefixes, so the extra forwards share theirs too."""
    if sharing:
        groups = prefix.plan(inputs["input_ids"], inputs.get("attention_mask"))
        if prefix.saves(groups, inputs["input_ids"].shape[1]):
            inputs["prefix_groups"] = groups
    return inputs


def run_logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """``model``'s logits on ``batch``; rows in ``batch["prefix_groups"]`` run their shared prefix once."""
    groups = batch.get("prefix_groups")
    if groups:
        return prefix.forward(model, batch["input_ids"], batch.get("attention_mask"), groups)
    return model(**{k: v for k, v in batch.items() if k != "prefix_groups"}).logits


class TrunkState:
    """Whether the teacher starts from the student's activations (`tether.trunk`), and from which block."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.trunk: trunk.Trunk | None = None
        self.key: tuple | None = None
        self.verified = False

    @property
    def depth(self) -> int:
        """Blocks the teacher skips (0: it runs them all)."""
        return self.trunk.k if self.enabled and self.trunk is not None and self.verified else 0

    def off(self, why: str, warn: bool = False) -> None:
        (log.warning if warn else log.info)("lwf: the teacher runs every block from now on (%s)", why)
        self.enabled = False
        if self.trunk is not None:
            self.trunk.close()
            self.trunk = None


def _distributed_unsafe(m: torch.nn.Module) -> bool:
    """Sharded models (FSDP, DeepSpeed) gather weights per block in step on every rank: a rank that
    skipped blocks another ran would hang them. Plain DDP (or one process) runs the teacher locally."""
    if isinstance(m, torch.nn.parallel.DistributedDataParallel):
        return False
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _teacher(run: Callable[[], torch.Tensor], model: torch.nn.Module, teacher: torch.nn.Module | None, batch: dict,
             state: TrunkState, student_ran: bool) -> torch.Tensor:
    """``run()`` (the teacher's logits on ``batch``), started at the first block the student (``model``, as
    the trainer holds it) trains where that is exact; the first such run is checked against a whole one.
    ``teacher``: a frozen copy, or ``None`` for the student itself with its adapters off."""
    if not (student_ran and state.enabled) or _distributed_unsafe(model):
        return run()
    student = unwrap_parallel(model)
    teacher = student if teacher is None else teacher
    key = (id(student), id(teacher), sum(p.requires_grad for p in student.parameters()))
    if state.key != key:  # a new model, or another task's adapters: look again
        if state.trunk is not None:
            state.trunk.close()
        state.key, state.verified = key, False
        state.trunk = trunk.Trunk.build(student, teacher)
        return run()  # the student's forward ran before the hook existed
    if state.trunk is None:
        return run()
    try:
        records = state.trunk.take(trunk.calls(batch.get("prefix_groups")))
        with state.trunk.replaying(records):
            logits = run()
    except trunk.Mismatch as e:
        state.off(str(e))
        return run()
    if not state.verified:
        whole = run()
        mask = batch.get("attention_mask")
        mask = torch.ones(whole.shape[:2], dtype=torch.bool, device=whole.device) if mask is None else mask.bool()
        err = prefix.relative_error(whole[mask], logits[mask])
        if err > prefix.RTOL:
            state.off(f"starting at block {state.trunk.k} changed its logits by {err:.3g} of their spread", warn=True)
            return whole
        state.verified = True
        log.info("lwf: the teacher starts at block %d; blocks 0-%d compute what the student's did (frozen, "
                 "adapters at zero)", state.trunk.k, state.trunk.k - 1)
    return logits


def make_reference(model: torch.nn.Module, frozen_copy: torch.nn.Module | None = None,
                   share_trunk: bool = True) -> Reference:
    """Build ``ctx.reference``: ``(model, batch, student_ran=False) -> logits`` of the base model's view of ``batch``.

    Contract: returns detached ``[B, L, V]`` logits for ``batch["input_ids"]`` (and its
    ``attention_mask``), computed under ``no_grad`` in ``eval()`` mode; leaves weights, ``.grad``
    and every module's train/eval mode as it found them.

    - ``frozen_copy`` given: it is evaluated (the ``model`` argument is ignored).
    - PEFT model (has ``disable_adapter``): the same model runs inside ``disable_adapter()``, so
      the teacher costs no memory.
    - otherwise: a frozen deep copy of ``model`` is made now (one more model in memory).

    ``share_trunk``: with ``student_ran=True``, skip the leading blocks whose activations the teacher
    shares with the student (`tether.trunk`); the same logits to float rounding. ``reference.trunk``
    says how many blocks it skips.
    """
    if frozen_copy is None and not hasattr(model, "disable_adapter"):
        frozen_copy = copy.deepcopy(model)
        mb = sum(p.numel() * p.element_size() for p in frozen_copy.parameters()) / 2**20
        log.info("lwf: teacher is a frozen copy of the model (%.1f MB)", mb)
    shared = TrunkState(share_trunk)
    if frozen_copy is not None:
        frozen_copy.eval()
        frozen_copy.requires_grad_(False)

        def reference(m: torch.nn.Module, batch: dict, student_ran: bool = False) -> torch.Tensor:
            inputs = _forward_inputs(batch)

            def run() -> torch.Tensor:
                with torch.no_grad():
                    return run_logits(frozen_copy, inputs).detach()

            return _teacher(run, m, frozen_copy, inputs, shared, student_ran)

        reference.trunk = shared
        return reference

    state: dict = {}

    def reference(model: torch.nn.Module, batch: dict, student_ran: bool = False) -> torch.Tensor:
        m = unwrap_parallel(model)  # disable_adapter lives on the PeftModel inside
        if state.get("model") is not m:  # once per model: the walks below are most of the cost
            state.update(model=m, modules=list(m.modules()), layers=adapter_layers(m))
        inputs = _forward_inputs(batch)

        def run() -> torch.Tensor:
            with torch.no_grad(), eval_mode(state["modules"]), adapters_off(m, state["layers"]):
                return run_logits(m, inputs).detach()

        return _teacher(run, model, None, inputs, shared, student_ran)

    reference.trunk = shared
    return reference


def _logits(outputs) -> torch.Tensor | None:
    if outputs is None:
        return None
    return outputs["logits"] if isinstance(outputs, dict) else getattr(outputs, "logits", None)


@register_method("lwf")
class LwF(Method):
    """Distil the base model's next-token distributions into the model being trained.

    Hooks: ``extra_loss`` only -> ``{"lwf": ...}`` (task batch), ``{"lwf_general": ...}`` (general
    mini-batch), ``{"lwf_replay": ...}`` or ``{"lwf_inputs": ...}``, as ``on`` says. Needs
    ``ctx.reference`` (see ``make_reference``). Terms are per-token means and are returned undivided;
    the trainer's division by ``grad_accum_steps`` makes them scale like the task loss.
    """

    config_class = LwFConfig
    needs_reference = True
    def __init__(self, config: LwFConfig | dict | None = None):
        super().__init__(LwFConfig.model_validate(config or {}))
        self.general_cursor_ = 0
        self.answer_vocab_: torch.Tensor | None = None

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

    def general_batch(self, ctx: Context) -> dict | None:
        """The next general mini-batch, in a seeded order that does not depend on the task data."""
        pool = ctx.general_examples
        if not pool:
            return None
        order = list(range(len(pool)))
        random.Random(ctx.seed).shuffle(order)
        k = self.config.general_batch_size
        picked = [pool[order[(self.general_cursor_ + i) % len(pool)]] for i in range(min(k, len(pool)))]
        self.general_cursor_ = (self.general_cursor_ + k) % len(pool)
        return Collator.for_tokenizer(ctx.tokenizer)(picked)

    def extra_loss(self, model, batch: dict, outputs, ctx: Context) -> dict[str, torch.Tensor]:
        if ctx.reference is None:
            raise RuntimeError("lwf needs ctx.reference (the base model's logits); build it with "
                               "tether.methods.lwf.make_reference(model)")
        c = self.config
        on = c.parts
        terms = {}
        device = next(model.parameters()).device
        inputs, student, teacher = _forward_inputs(batch), _logits(outputs), None
        nontarget = bool(c.nontarget_alpha) and batch.get("labels") is not None
        if "task" in on or "inputs" in on or nontarget:
            student = run_logits(model, inputs) if student is None else student
            teacher = self._batch_teacher(model, inputs, batch, ctx)
        if "task" in on:
            terms["lwf"] = self._distil(model, inputs, student, ctx, teacher=teacher)
        if "replay" in on:
            terms["lwf_replay"] = self._replay_term(model, batch, outputs, ctx)
        if "inputs" in on:
            terms["lwf_inputs"] = self._distil(model, inputs, student, ctx, mask=untrained_positions(batch),
                                               teacher=teacher)
        if nontarget:
            flags = batch.get("is_replay")
            task_rows = None if flags is None else ~flags.bool()
            terms["lwf_nontarget"] = c.nontarget_alpha * nontarget_kl(student, teacher, batch["labels"], task_rows,
                                                                      c.temperature, self.answer_vocab_)
        if "general" in on:
            gb = self.general_batch(ctx)
            if gb is None:
                raise ValueError(f"lwf.on is {c.on!r} but there is no general data")
            gb = {k: v.to(device) for k, v in _forward_inputs(gb).items()}
            terms["lwf_general"] = self._distil(model, _regrouped(gb, "prefix_groups" in batch), None, ctx,
                                                alpha=c.general_alpha)
        return terms

    def _batch_teacher(self, model, inputs: dict, batch: dict, ctx: Context) -> torch.Tensor:
        """The teacher's logits on the whole batch. Where the student ran its rows whole only because of
        dropout, the teacher (eval mode) runs each shared prefix once (the trainer's
        ``teacher_prefix_groups``); it then cannot start from the student's activations."""
        groups = batch.get("teacher_prefix_groups")
        if groups and "prefix_groups" not in inputs:
            return self._reference(model, {**inputs, "prefix_groups": groups}, ctx, same=False)
        return self._reference(model, inputs, ctx)

    def _reference(self, model, inputs: dict, ctx: Context, same: bool = True) -> torch.Tensor:
        """The teacher's logits on ``inputs``, called right after the student's forward; ``same``: that
        forward ran exactly ``inputs``, so a trunk-sharing reference may start from its activations."""
        ref = self.reference_ = ctx.reference
        if hasattr(ref, "trunk"):  # make_reference's: it may start from the student's activations
            return ref(model, inputs, student_ran=same and model.training)
        return ref(model, inputs)  # any (model, batch) -> logits callable

    def _distil(self, model, inputs: dict, student: torch.Tensor | None, ctx: Context,
                mask: torch.Tensor | None = None, same: bool = True, alpha: float | None = None,
                teacher: torch.Tensor | None = None) -> torch.Tensor:
        """``α · lwf_kl`` of the student's logits (the ones given, else a forward of ``inputs``)
        against the teacher's on ``inputs`` (``teacher``, else computed), over ``mask`` (default: the
        non-padding positions).
        ``same``: the student's forward ran exactly ``inputs`` (not a subset of its rows)."""
        ran = student is not None
        if student is None:
            student = run_logits(model, inputs)
        if teacher is None:
            teacher = self._reference(model, inputs, ctx, same=same or not ran)
        if mask is None:
            mask = inputs.get("attention_mask")
        alpha = self.config.alpha if alpha is None else alpha
        return alpha * lwf_kl(student, teacher, mask, self.config.temperature)

    def _replay_term(self, model, batch: dict, outputs, ctx: Context) -> torch.Tensor:
        flags = batch.get("is_replay")
        if flags is None:
            raise ValueError("lwf.on is 'replay' but the batch marks no replay rows: add the replay method "
                             "(methods: {replay: {ratio: 0.2}}) or use lwf.on: general")
        rows = flags.to(batch["input_ids"].device).nonzero().squeeze(-1)
        if rows.numel() == 0:
            return torch.zeros((), device=batch["input_ids"].device)
        student = _logits(outputs)
        picked = {k: v[rows] for k, v in _forward_inputs(batch).items() if k != "prefix_groups"}
        return self._distil(model, _regrouped(picked, "prefix_groups" in batch),
                            None if student is None else student[rows], ctx, same=student is None)

    def metrics(self) -> dict[str, float]:
        shared = getattr(getattr(self, "reference_", None), "trunk", None)
        out = {} if shared is None else {"teacher_skips_blocks": float(shared.depth)}
        if self.answer_vocab_ is not None:
            out["nontarget_answer_vocab"] = float(self.answer_vocab_.numel())
        return out

    def state_dict(self) -> dict:
        return {"general_cursor": self.general_cursor_}

    def load_state_dict(self, state: dict) -> None:
        self.general_cursor_ = int(state.get("general_cursor", 0))
