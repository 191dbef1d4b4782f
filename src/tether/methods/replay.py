"""Replay: mix general data into every batch at a fixed ratio.

Rehearsal of old data is the oldest defence against catastrophic forgetting (Robins, "Catastrophic
forgetting, rehearsal and pseudorehearsal", 1995, https://doi.org/10.1080/09540099550039318);
for LLMs, Ibrahim et al., "Simple and Scalable Strategies to Continually Pre-train Large Language
Models", https://arxiv.org/abs/2403.08763, find a few percent of replay enough. Concatenating and
shuffling only gives the ratio *on average*; here every batch is planned so the mix is exact.
"""

from __future__ import annotations

import functools
import logging
import math
import random
import time
from collections.abc import Callable
from fractions import Fraction
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, field_validator

from ..data.mssr import MemoryStrengthScheduler
from ..registry import register_method
from .base import Batch, Context, Method, example_nll

log = logging.getLogger(__name__)

Slot = tuple[str, int]  # ("task", i) or ("replay", j)


class ReplayConfig(BaseModel):
    """Replay of general data (https://arxiv.org/abs/2403.08763).

    Attributes:
        ratio (float): share of each batch that is general data, in ``[0, 1)``.
        by ("examples" | "tokens"): what the ratio counts. ``examples``: replay examples / batch
            size. ``tokens``: replay *target* tokens (labels != -100, i.e. the tokens the loss is
            averaged over, so this is the replay share of the gradient) / all target tokens.
        schedule ("uniform" | "mssr"): which general examples fill the replay slots. ``uniform``:
            shuffled passes over the pool. ``mssr``: memory-strength adaptive replay
            (`tether.data.mssr`): the examples whose estimated retention is lowest go first, and
            well-remembered ones come back at expanding intervals. Both fill the same slots, so
            they cost the same replay tokens per batch.
        balance_loss (bool): make replay ``ratio`` of the *loss*, not only of the examples. With
            ``by: examples`` each example's loss is averaged over its own target tokens and examples
            weigh equally; otherwise HF's per-token mean lets a 100-token general answer outweigh a
            one-word task label 30 to 1, so 20% replay examples become ~90% of the gradient. With
            ``by: tokens`` the per-token mean already is the ratio, so this changes nothing.
        answers ("data" | "model"): what the replayed general examples answer with. ``data``: the
            dataset's answers. ``model``: at task start the model answers each replay prompt itself
            (greedy, up to ``max_new_tokens``) and those answers are replayed, so replay keeps what
            *this* model said rather than pulling it toward the dataset's style (self-synthesised
            rehearsal, https://arxiv.org/abs/2403.01244). Only as many examples as the plan uses
            are answered; plain-text examples (no prompt) keep their text.
        max_new_tokens (int): longest self-answer, with ``answers: model``.
        growth, decay (float): MSSR strength update factors (see `tether.data.mssr`).
        seed (int | None): seed for shuffling both pools; ``None`` uses the run seed.
        mode ("replace" | "add"): where the replay rows go. ``replace``: they take ``ratio`` of the
            batch's ``batch_size`` slots, so each step sees ``(1 - ratio)`` as many task examples as
            without replay. ``add``: every batch keeps ``batch_size`` task examples and replay rows are
            added on top until they are ``ratio`` of the larger batch (Avalanche's replay loader
            works this way): the task learns from as many examples per step as without replay, at
            the cost of a longer step (ratio 0.2, batch 8: 8 task + 2 general rows).
    """

    model_config = ConfigDict(extra="forbid")

    ratio: float = 0.2
    by: Literal["examples", "tokens"] = "examples"
    schedule: Literal["uniform", "mssr"] = "uniform"
    balance_loss: bool = True
    answers: Literal["data", "model"] = "data"
    max_new_tokens: int = 96
    growth: float = 2.0
    decay: float = 0.5
    seed: int | None = None
    mode: Literal["replace", "add"] = "replace"

    @field_validator("max_new_tokens")
    @classmethod
    def _mnt(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("replay.max_new_tokens must be > 0")
        return v

    @field_validator("ratio")
    @classmethod
    def _ratio(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError("replay.ratio must be in [0, 1)")
        return v


class _Stream:
    """Indices ``0..n-1`` in shuffled passes: without replacement within a pass, reshuffled after."""

    def __init__(self, n: int, rng: random.Random):
        self.n, self.rng, self.order, self.pos, self.taken = n, rng, [], 0, 0

    def peek(self) -> int:
        if self.pos == len(self.order):
            self.order, self.pos = list(range(self.n)), 0
            self.rng.shuffle(self.order)
        return self.order[self.pos]

    def next(self) -> int:
        i = self.peek()
        self.pos += 1
        self.taken += 1
        return i


def replay_counts(ratio: float | Fraction, batch_size: int, num_batches: int) -> list[int]:
    """Replay examples per batch so that after ``b`` batches exactly ``floor(b * ratio * B)`` are replay.

    When ``ratio * B`` is an integer ``k`` every batch holds exactly ``k``; otherwise batches hold
    ``floor(ratio * B)`` or one more, in a fixed Bresenham pattern, so the running ratio is
    never more than one example off (no rounding drift as with ``round(ratio * B)`` per batch).
    """
    rb = (ratio if isinstance(ratio, Fraction) else Fraction(repr(ratio))) * batch_size  # exact: 0.29 * 100 is 29
    cum = [math.floor(b * rb) for b in range(num_batches + 1)]
    return [cum[b + 1] - cum[b] for b in range(num_batches)]


def _per_slot(ratio: float, mode: str) -> Fraction:
    """Replay rows per ``batch_size`` slot, exactly: ``ratio`` when replay takes slots (``replace``),
    ``ratio / (1 - ratio)`` when it comes on top of them (``add``), so it is ``ratio`` of the batch."""
    r = Fraction(repr(ratio))
    return r / (1 - r) if mode == "add" else r


def plan_batches(n_task: int, replay_lengths: list[int], task_lengths: list[int] | None, batch_size: int,
                 num_batches: int, ratio: float, by: str = "examples", seed: int = 0,
                 mode: str = "replace") -> list[list[Slot]]:
    """Plan every batch as a list of ``("task", i)`` / ``("replay", j)`` slots.

    Args:
        n_task: number of task examples; they are cycled in shuffled epochs.
        replay_lengths: target tokens of each replay-pool example (only read with ``by="tokens"``);
            its length is the pool size. Replay is drawn without replacement within a pass.
        task_lengths: target tokens of each task example (needed with ``by="tokens"``).
        batch_size: ``B``. With ``by="examples"`` every batch holds ``B`` examples (see
            ``replay_counts``); with ``by="tokens"`` it holds ``max(1, round((1 - ratio) * B))``
            task examples, then replay examples are added while each one brings the batch's
            replay-token share closer to ``ratio`` (so it ends within one example of it).
            With ``mode="add"`` every batch holds ``B`` task examples and the replay rows come on
            top: ``ratio / (1 - ratio) * B`` of them per batch (Bresenham, as above) by examples,
            or as many as bring the token share closest to ``ratio`` by tokens.
        num_batches: batches to plan; ``<= 0`` plans until one epoch of the task data is used.
        ratio: replay share in ``[0, 1)``.
        by: ``"examples"`` or ``"tokens"``.
        seed: shuffling seed; the plan is a pure function of the arguments.
        mode: ``"replace"`` (replay takes batch slots) or ``"add"`` (replay comes on top).
    """
    if mode not in ("replace", "add"):
        raise ValueError(f"replay: mode must be 'replace' or 'add', not {mode!r}")
    if n_task <= 0 or batch_size <= 0:
        raise ValueError("replay: need task examples and batch_size > 0")
    if ratio > 0 and not replay_lengths:
        raise ValueError("replay: replay.ratio > 0 but there is no general data to replay")
    if by == "tokens" and (task_lengths is None or len(task_lengths) != n_task):
        raise ValueError("replay: by='tokens' needs the target-token length of every task example")
    rng = random.Random(seed)
    tasks = _Stream(n_task, random.Random(rng.random()))
    pool = _Stream(len(replay_lengths), random.Random(rng.random()))
    limit = num_batches if num_batches > 0 else n_task * batch_size  # generous bound; stops at one epoch
    add = mode == "add"
    counts = replay_counts(_per_slot(ratio, mode), batch_size, limit) if by == "examples" else []
    n_task_tok = batch_size if add else max(1, round((1 - ratio) * batch_size))
    plan: list[list[Slot]] = []
    for b in range(limit):
        if num_batches <= 0 and tasks.taken >= n_task:
            break
        if by == "examples":
            k = counts[b]
            batch = [("task", tasks.next()) for _ in range(batch_size if add else batch_size - k)]
            plan.append(batch + [("replay", pool.next()) for _ in range(k)])
            continue
        batch: list[Slot] = [("task", tasks.next()) for _ in range(n_task_tok)]
        t_tok = sum(task_lengths[i] for _, i in batch)
        r_tok = 0
        while ratio > 0:
            nxt = replay_lengths[pool.peek()]
            now = r_tok / (r_tok + t_tok) if r_tok + t_tok else 0.0
            then = (r_tok + nxt) / (r_tok + nxt + t_tok) if r_tok + nxt + t_tok else 0.0
            if abs(ratio - then) >= abs(ratio - now):
                break
            batch.append(("replay", pool.next()))
            r_tok += nxt
        plan.append(batch)
    return plan


def plan_ratios(plan: list[list[Slot]], task_lengths: list[int],
                replay_lengths: list[int]) -> tuple[float, float]:
    """(replay share of examples, replay share of target tokens) over a plan."""
    n = sum(len(b) for b in plan)
    n_r = sum(1 for b in plan for kind, _ in b if kind == "replay")
    tok = {"task": task_lengths, "replay": replay_lengths}
    t_all = sum(tok[k][i] for b in plan for k, i in b)
    t_r = sum(replay_lengths[i] for b in plan for k, i in b if k == "replay")
    return n_r / max(n, 1), t_r / max(t_all, 1)


class MixedDataset(torch.utils.data.Dataset):
    """Task examples followed by the replay pool; ``batches`` is the plan, as dataset indices.

    Feed ``batches`` to a ``DataLoader`` as its ``batch_sampler``. Items are dicts
    ``{"input_ids", "labels", "is_replay"}`` ready for ``tether.data.collate.Collator``.
    """

    def __init__(self, task: list, replay: list, plan: list[list[Slot]], ratio: float | None = None,
                 replan: Callable[[float], list[list[Slot]]] | None = None):
        self.items = [{"input_ids": list(e.input_ids), "labels": list(e.labels), "is_replay": flag,
                       "replay_index": j if flag else -1}
                      for pool, flag in ((task, False), (replay, True)) for j, e in enumerate(pool)]
        self._offset = {"task": 0, "replay": len(task)}
        self.plan = plan
        self.ratio = ratio
        self._replan = replan
        self.batches: list[list[int]] = [[self._offset[k] + i for k, i in b] for b in plan]

    def set_ratio(self, ratio: float, start: int) -> None:
        """Re-plan the batches from micro-batch ``start`` on at a new ratio (the guard's ``adapt``).

        ``batches`` is changed in place, so a DataLoader already iterating over it picks the new
        plan up for the batches it has not fetched yet.
        """
        if self._replan is None:
            raise ValueError("this dataset was built without a re-planner")
        plan = self._replan(ratio)
        self.plan[start:] = plan[start:]
        if isinstance(self.batches, list):
            self.batches[start:] = [[self._offset[k] + i for k, i in b] for b in plan[start:]]
        self.ratio = ratio

    def use_scheduler(self, scheduler) -> None:
        """Fill the replay slots at draw time from ``scheduler`` (MSSR) instead of the fixed plan."""
        self.batches = _AdaptivePlan(self.plan, self._offset["replay"], scheduler)

    def state_dict(self) -> dict:
        """The stream's position for a resumed run: the plan as re-planned (the guard's ``adapt``), and
        with MSSR the batches already drawn (their picks depended on losses the resumed run never sees)."""
        drawn = self.batches.drawn if isinstance(self.batches, _AdaptivePlan) else None
        return {"ratio": self.ratio, "plan": [list(b) for b in self.plan], "drawn": drawn}

    def load_state_dict(self, state: dict) -> None:
        self.ratio = state["ratio"]
        self.plan[:] = [[tuple(slot) for slot in b] for b in state["plan"]]
        if isinstance(self.batches, _AdaptivePlan):
            self.batches.drawn = [list(b) for b in state["drawn"] or []]
        else:
            self.batches[:] = [[self._offset[k] + i for k, i in b] for b in self.plan]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class _AdaptivePlan:
    """A batch sampler: the plan's task slots as planned, replay slots chosen when the batch is drawn.

    The DataLoader draws a batch one step ahead of the optimizer, so a selection sees the losses
    of all but the latest replayed batch.
    """

    def __init__(self, plan: list[list[Slot]], replay_offset: int, scheduler):
        self.plan, self.offset, self.scheduler = plan, replay_offset, scheduler
        self.drawn: list[list[int]] = []  # every batch drawn so far: a resumed run replays them as drawn

    def __len__(self) -> int:
        return len(self.plan)

    def __iter__(self):
        for b, slots in enumerate(self.plan):
            if b < len(self.drawn):
                yield self.drawn[b]
                continue
            k = sum(1 for kind, _ in slots if kind == "replay")
            picks = iter(self.scheduler.select(k, step=b))
            self.drawn.append([i if kind == "task" else self.offset + next(picks) for kind, i in slots])
            yield self.drawn[-1]


@register_method("replay")
class Replay(Method):
    """Mix ``ctx.general_examples`` into every batch of the task data.

    Hooks: ``prepare_data`` (returns a ``MixedDataset`` planned for ``ctx.num_batches`` batches of
    ``ctx.batch_size``) and ``extra_loss`` (returns nothing; it only counts the replay examples
    and tokens the trainer really fed, so ``metrics`` can show the realised ratio next to the plan);
    ``example_weights`` makes the loss an example-weighted mean (``balance_loss``).
    """

    config_class = ReplayConfig

    @property
    def needs_general(self) -> bool:
        return self.config.ratio > 0

    def provides(self) -> set[str]:
        return {"replay_rows"} if self.config.ratio > 0 else set()

    def __init__(self, config: ReplayConfig | dict | None = None):
        super().__init__(ReplayConfig.model_validate(config or {}))
        self.planned_: dict[str, float] = {}
        self.seen_ = {"examples": 0, "replay_examples": 0, "tokens": 0, "replay_tokens": 0}
        self.scheduler_: MemoryStrengthScheduler | None = None
        self.batches_seen_ = 0
        self.pool_: list | None = None  # self-answered general examples (answers: model)
        self.data_: MixedDataset | None = None  # the task's mixed stream, whose position a resume restores
        self.data_state_: dict | None = None  # a restored position, for the stream prepare_data builds next
        self.self_answered_ = 0

    def on_task_start(self, model, ctx: Context) -> None:
        c = self.config
        if c.answers != "model" or c.ratio <= 0 or not ctx.general_examples:
            return
        from ._rehearsal import self_rehearsal

        pool = list(ctx.general_examples)
        random.Random(ctx.seed if c.seed is None else c.seed).shuffle(pool)
        if ctx.num_batches > 0:  # answer only what the plan can use (by tokens: a generous bound)
            planned = math.ceil(_per_slot(c.ratio, c.mode) * ctx.batch_size * ctx.num_batches)
            need = planned * (1 if c.by == "examples" else 2)
            pool = pool[:max(need, ctx.batch_size)]
        t0 = time.perf_counter()
        # batched like the probes (32 prompts): greedy answers are the same as 8 at a time (all 120 of the
        # demo's), in half the time, since a CPU decode step costs about the same for 8 rows as for 32
        self.pool_, self.self_answered_ = self_rehearsal(model, ctx.tokenizer, pool, max_new_tokens=c.max_new_tokens,
                                                         batch_size=max(ctx.batch_size, 32))
        log.info("replay: the model answered %d of %d replay prompts itself in %.1f s", self.self_answered_,
                 len(pool), time.perf_counter() - t0)

    def prepare_data(self, dataset: list, ctx: Context) -> MixedDataset:
        c = self.config
        pool = (list(self.pool_) if self.pool_ is not None else list(ctx.general_examples)) if c.ratio > 0 else []
        task_len = [e.n_target_tokens for e in dataset]
        pool_len = [e.n_target_tokens for e in pool]
        seed = ctx.seed if c.seed is None else c.seed
        per_slot = _per_slot(c.ratio, c.mode)
        if c.by == "examples" and (per_slot * ctx.batch_size).denominator != 1:
            k = math.floor(per_slot * ctx.batch_size)
            hint = f" (some batches get none: use a batch size >= {math.ceil(1 / per_slot)})" if k == 0 else ""
            log.warning("replay: ratio %.3g (mode %s) x batch size %d is not a whole number of examples; batches "
                        "alternate between %d and %d replay examples so the running ratio stays exact%s",
                        c.ratio, c.mode, ctx.batch_size, k, k + 1, hint)
        plan = plan_batches(len(dataset), pool_len, task_len, ctx.batch_size, ctx.num_batches,
                            c.ratio, c.by, seed, c.mode)
        ex, tok = plan_ratios(plan, task_len, pool_len)
        self.planned_ = {"ratio": c.ratio, "examples": ex, "tokens": tok, "batches": float(len(plan))}
        log.info("replay: %d batches planned from %d task and %d general examples; replay share %.3f of "
                 "examples, %.3f of target tokens", len(plan), len(dataset), len(pool), ex, tok)
        replan = functools.partial(plan_batches, len(dataset), pool_len, task_len, ctx.batch_size, ctx.num_batches,
                                   by=c.by, seed=seed, mode=c.mode)
        mixed = MixedDataset(list(dataset), pool, plan, c.ratio, lambda r: replan(ratio=r))
        if c.schedule == "mssr" and pool:
            self.scheduler_ = MemoryStrengthScheduler(len(pool), growth=c.growth, decay=c.decay, lengths=pool_len,
                                                      seed=seed)
            mixed.use_scheduler(self.scheduler_)
        if self.data_state_ is not None:
            mixed.load_state_dict(self.data_state_)
            self.data_state_ = None
        self.data_ = mixed
        return mixed

    def extra_loss(self, model, batch: Batch, outputs, ctx: Context) -> dict[str, torch.Tensor]:
        flags = batch.is_replay
        if flags is not None:
            targets = (batch.labels != -100).sum(dim=1).cpu()
            flags = flags.cpu()
            self.seen_["examples"] += int(flags.numel())
            self.seen_["replay_examples"] += int(flags.sum())
            self.seen_["tokens"] += int(targets.sum())
            self.seen_["replay_tokens"] += int(targets[flags].sum())
            if self.scheduler_ is not None and bool(flags.any()) and batch.replay_index is not None:
                self._feed_scheduler(batch, outputs, flags)
            self.batches_seen_ += 1
        return {}

    def example_weights(self, batch: Batch, ctx: Context) -> torch.Tensor | None:
        if not self.config.balance_loss or self.config.by != "examples" or batch.is_replay is None:
            return None
        return torch.ones(batch.is_replay.shape[0])

    @torch.no_grad()
    def _feed_scheduler(self, batch: Batch, outputs, flags: torch.Tensor) -> None:
        """Per-example loss of the replayed rows -> the MSSR strength update (no extra forward)."""
        rows = flags.nonzero().flatten().to(outputs.logits.device)
        sums, counts = example_nll(outputs.logits[rows], batch.labels[rows.cpu()])
        losses = sums / counts.clamp_min(1)
        idx = batch.replay_index[rows.cpu()].tolist()
        self.scheduler_.update(idx, losses.cpu().tolist(), step=self.batches_seen_)

    def metrics(self) -> dict[str, float]:
        s = self.seen_
        out = {f"replay_planned_{k}": float(v) for k, v in self.planned_.items()}
        if s["examples"]:
            out["replay_realised_examples"] = s["replay_examples"] / s["examples"]
            out["replay_realised_tokens"] = s["replay_tokens"] / max(s["tokens"], 1)
            out["replay_tokens_total"] = float(s["replay_tokens"])
        if self.self_answered_:
            out["replay_self_answered"] = float(self.self_answered_)
        if self.scheduler_ is not None:
            out.update({f"mssr_{k}": float(v) for k, v in self.scheduler_.stats().items()})
        return out

    def state_dict(self) -> dict:
        state = {"planned": dict(self.planned_), "seen": dict(self.seen_), "batches_seen": self.batches_seen_}
        if self.scheduler_ is not None:
            state["scheduler"] = self.scheduler_.state_dict()
        data = self.data_.state_dict() if self.data_ is not None else self.data_state_
        if data is not None:
            state["data"] = data
        return state

    def load_state_dict(self, state: dict) -> None:
        self.planned_ = dict(state.get("planned", {}))
        self.seen_.update(state.get("seen", {}))
        self.batches_seen_ = int(state.get("batches_seen", 0))
        if self.scheduler_ is not None and "scheduler" in state:
            self.scheduler_.load_state_dict(state["scheduler"])
        if "data" in state:
            if self.data_ is not None:
                self.data_.load_state_dict(state["data"])
            else:
                self.data_state_ = state["data"]
