"""Continual-learning metrics from an accuracy matrix, and its heat map.

``R[i][j]`` is the score on task ``j`` after training tasks ``0..i`` (shape ``T x T``); ``b[j]`` is
the untrained base model's score on task ``j``.

- average accuracy ``ACC = mean_j R[T-1][j]``;
- backward transfer ``BWT = mean_{j<T-1} (R[T-1][j] - R[j][j])`` and forward transfer
  ``FWT = mean_{j>0} (R[j-1][j] - b[j])`` (Lopez-Paz & Ranzato, "Gradient Episodic Memory for
  Continual Learning", 2017, https://arxiv.org/abs/1706.08840);
- forgetting ``f_j = max_{j<=i<T-1} R[i][j] - R[T-1][j]`` for ``j < T-1`` (Chaudhry et al.,
  "Riemannian Walk for Incremental Learning", 2018, https://arxiv.org/abs/1801.10112).

A negative BWT and a positive forgetting both mean the sequence erased earlier skills. The
general-ability row (a general probe scored after every task) is reported as relative change
against the base, see `general_ability_change`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io import atomic_path


def _matrix(R: Sequence[Sequence[float]]) -> np.ndarray:
    m = np.asarray(R, dtype=float)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"the accuracy matrix must be square T x T with T >= 1, got shape {m.shape}")
    return m


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def average_accuracy(R: Sequence[Sequence[float]]) -> float:
    """``ACC = mean_j R[T-1][j]``: the final model's mean score over every task."""
    return float(np.mean(_matrix(R)[-1]))


def backward_transfer(R: Sequence[Sequence[float]]) -> float | None:
    """``BWT = mean_{j<T-1} (R[T-1][j] - R[j][j])``; ``None`` for a single task."""
    m = _matrix(R)
    T = m.shape[0]
    return _mean([m[T - 1, j] - m[j, j] for j in range(T - 1)])


def forward_transfer(R: Sequence[Sequence[float]], base: Sequence[float]) -> float | None:
    """``FWT = mean_{j>0} (R[j-1][j] - b[j])``: how much earlier tasks helped a task not yet trained."""
    m = _matrix(R)
    b = np.asarray(base, dtype=float)
    if b.shape != (m.shape[0],):
        raise ValueError(f"the base row must have one score per task ({m.shape[0]}), got shape {b.shape}")
    return _mean([m[j - 1, j] - b[j] for j in range(1, m.shape[0])])


def forgetting(R: Sequence[Sequence[float]]) -> list[float]:
    """``f_j = max_{j<=i<T-1} R[i][j] - R[T-1][j]`` for every task ``j < T-1`` (best score minus final)."""
    m = _matrix(R)
    T = m.shape[0]
    return [float(np.max(m[j:T - 1, j]) - m[T - 1, j]) for j in range(T - 1)]


def general_ability_change(scores: Sequence[float], base: float) -> list[float]:
    """Relative change of a general-ability score after each task: ``(g_i - g_base) / |g_base|``.

    Args:
        scores: the general probe's score after task ``0..T-1`` (higher is better; pass a negated
            perplexity or a perplexity ratio's inverse for lower-is-better metrics).
        base: the untrained model's score.

    Returns:
        One number per task: ``-0.05`` means 5 % below the base. A zero base gives the absolute
        change instead (a relative one would be undefined).
    """
    denom = abs(base) if base != 0 else 1.0
    return [(float(s) - base) / denom for s in scores]


@dataclass
class CLMetrics:
    """Summary of one task sequence.

    Attributes:
        acc: average final accuracy (``ACC``).
        bwt: backward transfer, ``None`` for one task.
        fwt: forward transfer, ``None`` without a base row or with one task.
        forgetting: ``f_j`` for every task but the last.
        avg_forgetting: mean of ``forgetting``, ``None`` for one task.
        final: the last row of ``R``.
        general_change: relative change of the general ability after each task, if given.
    """

    acc: float
    bwt: float | None
    fwt: float | None
    forgetting: list[float]
    avg_forgetting: float | None
    final: list[float]
    general_change: list[float] | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def cl_metrics(R: Sequence[Sequence[float]], base: Sequence[float] | None = None, *,
               general: Sequence[float] | None = None, general_base: float | None = None) -> CLMetrics:
    """All metrics at once. ``general``/``general_base`` add the general-ability row's change."""
    f = forgetting(R)
    change = None
    if general is not None:
        if general_base is None:
            raise ValueError("general_ability_change needs the base model's general score (general_base)")
        change = general_ability_change(general, general_base)
    return CLMetrics(
        acc=average_accuracy(R), bwt=backward_transfer(R),
        fwt=forward_transfer(R, base) if base is not None else None,
        forgetting=f, avg_forgetting=_mean(f), final=[float(x) for x in _matrix(R)[-1]],
        general_change=change,
    )


def plot_accuracy_matrix(R: Sequence[Sequence[float]], task_names: Sequence[str], path: str | Path, *,
                         title: str = "score on task j after training task i") -> Path:
    """Write ``R`` as an annotated heat map PNG (rows: trained up to; columns: evaluated on).

    Uses matplotlib's Agg canvas directly, so no global backend is switched. Missing entries
    (``NaN``) are left blank. The file is written atomically.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = _matrix(R)
    T = m.shape[0]
    if len(task_names) != T:
        raise ValueError(f"got {len(task_names)} task names for a {T} x {T} matrix")
    size = 1.2 + 0.8 * T
    fig = Figure(figsize=(size + 1.0, size))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    finite = m[np.isfinite(m)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    im = ax.imshow(np.ma.masked_invalid(m), cmap="viridis", vmin=lo, vmax=hi if hi > lo else lo + 1e-9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    mid = (lo + hi) / 2
    for i in range(T):
        for j in range(T):
            v = m[i, j]
            if math.isfinite(v):
                ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=9,
                        color="black" if v > mid else "white")
    ax.set_xticks(range(T), [str(n) for n in task_names], rotation=45, ha="right")
    ax.set_yticks(range(T), [f"after {n}" for n in task_names])
    ax.set_xlabel("evaluated on task j")
    ax.set_ylabel("trained through task i")
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path
