"""Memory-strength adaptive replay (MSSR): replay what is being forgotten, space out what is not.

Each replay example ``i`` carries a memory strength ``S_i`` (in optimizer steps) and the step
``t_i`` it was last replayed. Its retention follows an Ebbinghaus forgetting curve
(Ebbinghaus, 1885; the spaced-repetition idea of Pimsleur 1967 and SuperMemo's SM-2)::

    R_i(t) = exp(-(t - t_i) / S_i)          (R_i = 0 for an example never replayed)

`MemoryStrengthScheduler.select` replays the ``k`` examples of *lowest* retention first. After a
replay, `MemoryStrengthScheduler.update` revises ``S_i`` from the observed loss ``l_i``::

    l_i kept as the example's latest loss;  lbar = mean over replayed examples of their latest loss
    if l_i <= lbar:   S_i <- S_i * growth * (1 + gain_i),  gain_i = clip((l_prev_i - l_i) / l_prev_i, 0, 1)
    else:             S_i <- S_i * decay
    S_i <- clip(S_i, min_strength, max_strength);   t_i <- step;   l_prev_i <- l_i

so an example recalled well (loss at or below the pool's, more so if still improving) waits
``growth``-times longer before it next falls to the front (expanding intervals), and a forgotten one
comes back sooner.
`UniformScheduler` has the same interface (random order, without replacement within a pass), and
both count ``tokens_replayed`` so the two can be compared at an equal replay budget.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from typing import Any

import numpy as np


class _Scheduler(abc.ABC):
    """Shared token accounting: ``tokens_replayed`` / ``items_replayed`` over every selection."""

    def __init__(self, n_items: int, lengths: Sequence[int] | None, seed: int):
        if n_items <= 0:
            raise ValueError("replay scheduler needs n_items > 0")
        if lengths is not None and len(lengths) != n_items:
            raise ValueError(f"lengths has {len(lengths)} entries for {n_items} items")
        self.n_items = n_items
        self.lengths = None if lengths is None else [int(x) for x in lengths]
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.tokens_replayed = 0
        self.items_replayed = 0

    @abc.abstractmethod
    def _order(self, step: int) -> list[int]:
        """All item indices, most urgent first."""

    def _take(self, chosen: list[int], step: int) -> list[int]:
        self.items_replayed += len(chosen)
        if self.lengths is not None:
            self.tokens_replayed += sum(self.lengths[i] for i in chosen)
        return chosen

    def select(self, k: int, step: int) -> list[int]:
        """The next ``k`` examples to replay at ``step`` (at most ``n_items``, no duplicates)."""
        if k < 0:
            raise ValueError("select: k must be >= 0")
        return self._take(self._order(step)[: min(k, self.n_items)], step)

    def select_tokens(self, budget: int, step: int) -> list[int]:
        """Examples in priority order until ``budget`` tokens are used.

        Stops at the first example that would overflow the budget, but always takes one so a
        budget smaller than every example cannot stall training; ``tokens_replayed`` records what
        was really spent.
        """
        if self.lengths is None:
            raise ValueError("select_tokens needs the examples' lengths")
        chosen, used = [], 0
        for i in self._order(step):
            if chosen and used + self.lengths[i] > budget:
                break
            chosen.append(i)
            used += self.lengths[i]
        return self._take(chosen, step)

    def update(self, indices: Sequence[int], losses: Sequence[float], step: int) -> None:  # noqa: B027
        """Observed losses of replayed examples (ignored by schedulers that do not adapt)."""

    def stats(self) -> dict[str, float]:
        return {"items_replayed": float(self.items_replayed), "tokens_replayed": float(self.tokens_replayed)}

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state, "tokens_replayed": self.tokens_replayed,
                "items_replayed": self.items_replayed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.tokens_replayed = int(state["tokens_replayed"])
        self.items_replayed = int(state["items_replayed"])


class UniformScheduler(_Scheduler):
    """Uniform replay: a seeded random permutation per pass, every example once per pass."""

    def __init__(self, n_items: int, *, lengths: Sequence[int] | None = None, seed: int = 0):
        super().__init__(n_items, lengths, seed)
        self.queue: list[int] = []  # what is left of the current pass, then whole later passes
        self.passes = 0

    def _order(self, step: int) -> list[int]:
        if len(self.queue) < self.n_items:
            self.queue += [int(i) for i in self.rng.permutation(self.n_items)]
            self.passes += 1
        # the rest of this pass, then the start of the next one, skipping repeats within a call
        return list(dict.fromkeys(self.queue))

    def _take(self, chosen: list[int], step: int) -> list[int]:
        for i in chosen:
            self.queue.remove(i)  # first occurrence: the current pass's copy
        return super()._take(chosen, step)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "queue": list(self.queue), "passes": self.passes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.queue, self.passes = [int(i) for i in state["queue"]], int(state["passes"])


class MemoryStrengthScheduler(_Scheduler):
    """Replay the weakest memories first, with strengths learned from replay losses (formula above).

    Args:
        n_items: size of the replay pool.
        init_strength: ``S_i`` before any replay, in optimizer steps.
        decay: factor (< 1) applied to ``S_i`` when a replayed example's loss is above the mean.
        growth: factor (> 1) applied to ``S_i`` when it is at or below the mean.
        min_strength, max_strength: clip range of ``S_i``.
        lengths: token count per example, for ``select_tokens`` and ``tokens_replayed``.
        seed: seeds the tie-break between equal retentions (e.g. the never-replayed).
    """

    def __init__(self, n_items: int, *, init_strength: float = 1.0, decay: float = 0.5, growth: float = 2.0,
                 min_strength: float = 0.5, max_strength: float = 1e6,
                 lengths: Sequence[int] | None = None, seed: int = 0):
        super().__init__(n_items, lengths, seed)
        if init_strength <= 0 or min_strength <= 0 or max_strength < min_strength:
            raise ValueError("mssr: strengths must be > 0 and min_strength <= max_strength")
        if not 0 < decay < 1 or growth <= 1:
            raise ValueError("mssr: need 0 < decay < 1 and growth > 1")
        self.decay, self.growth = decay, growth
        self.min_strength, self.max_strength = min_strength, max_strength
        self.strength = np.full(n_items, float(init_strength))
        self.last_step = np.full(n_items, -1.0)  # -1: never replayed
        self.last_loss = np.full(n_items, np.nan)
        self.reviews = np.zeros(n_items, dtype=np.int64)

    def retention(self, step: int) -> np.ndarray:
        """``R_i(step)`` for every example; 0 for those never replayed."""
        age = np.maximum(step - self.last_step, 0.0)
        r = np.exp(-age / self.strength)
        r[self.last_step < 0] = 0.0
        return r

    def next_due(self, i: int, threshold: float = 0.5) -> float:
        """The step where example ``i``'s retention falls to ``threshold``: ``t_i + S_i ln(1/threshold)``."""
        if self.last_step[i] < 0:
            return -math.inf
        return float(self.last_step[i] + self.strength[i] * math.log(1.0 / threshold))

    def _order(self, step: int) -> list[int]:
        tie = self.rng.random(self.n_items)
        return [int(i) for i in np.lexsort((tie, self.retention(step)))]

    def _take(self, chosen: list[int], step: int) -> list[int]:
        # the clock starts at selection: a batch drawn ahead of the loss update must not pick the
        # same never-replayed example again before its loss comes back
        self.last_step[chosen] = np.maximum(self.last_step[chosen], step)
        return super()._take(chosen, step)

    def update(self, indices: Sequence[int], losses: Sequence[float], step: int) -> None:
        """Revise ``S_i`` from the losses just observed for ``indices`` at ``step`` (see module doc)."""
        idx = np.asarray(indices, dtype=np.int64)
        loss = np.asarray(losses, dtype=float)
        if idx.shape != loss.shape:
            raise ValueError(f"update: {idx.size} indices but {loss.size} losses")
        if idx.size == 0:
            return
        prev_losses = self.last_loss[idx].copy()
        self.last_loss[idx] = loss
        # the pool's latest losses, not a running mean of replays: weak examples are replayed more
        # often and would otherwise drag the reference up until everything else looks "easy"
        lbar = float(np.nanmean(self.last_loss))
        for i, li, prev in zip(idx.tolist(), loss.tolist(), prev_losses.tolist(), strict=True):
            if li <= lbar:
                gain = 0.0 if not np.isfinite(prev) or prev <= 0 else min(max((prev - li) / prev, 0.0), 1.0)
                s = self.strength[i] * self.growth * (1.0 + gain)
            else:
                s = self.strength[i] * self.decay
            self.strength[i] = min(max(s, self.min_strength), self.max_strength)
            self.last_step[i] = step
            self.reviews[i] += 1

    def stats(self) -> dict[str, float]:
        seen = self.last_step >= 0
        return {**super().stats(), "coverage": float(seen.mean()),
                "mean_strength": float(self.strength[seen].mean()) if seen.any() else float("nan"),
                "mean_loss": float(np.nanmean(self.last_loss)) if np.isfinite(self.last_loss).any() else float("nan")}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "strength": self.strength.tolist(),
                "last_step": self.last_step.tolist(), "last_loss": self.last_loss.tolist(),
                "reviews": self.reviews.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.strength = np.asarray(state["strength"], dtype=float)
        self.last_step = np.asarray(state["last_step"], dtype=float)
        self.last_loss = np.asarray(state["last_loss"], dtype=float)
        self.reviews = np.asarray(state["reviews"], dtype=np.int64)
