"""Base vs tuned: per-probe relative change with a paired bootstrap CI and a forgetting verdict.

Both models are scored on the same items in the same order, so the CI resamples *items* once and
applies the same resample to both (a paired bootstrap): item difficulty cancels and the interval
on the relative change is much tighter than two independent CIs would suggest.

It lives with the probes, not in ``report/``, because it decides: the forgetting guard stops a run
on its verdicts and the run summary records them. ``report.compare`` only renders what it returns.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .base import ProbeResult

DEFAULT_THRESHOLD = 0.05
# Drift measures how far the outputs moved, not what ability was lost: any useful fine-tune moves
# them a little (on SmolLM2, LoRA at lr 1e-4 costs ~7% greedy agreement within 15 steps while every
# ability probe holds), and a collapsed one moves them a lot (naive full FT: -45%). So drift gets
# its own, looser bound.
KIND_THRESHOLDS = {"drift": 0.25}


def threshold_for(kind: str, threshold: float, kind_thresholds: dict[str, float] | None = None) -> float:
    return (KIND_THRESHOLDS if kind_thresholds is None else kind_thresholds).get(kind, threshold)


@dataclass
class ProbeComparison:
    probe: str
    metric: str
    higher_is_better: bool
    n: int
    base: float
    tuned: float
    rel_change: float  # (tuned - base) / |base|
    ci_low: float  # CI of rel_change
    ci_high: float
    drop: float  # relative loss of ability (positive = worse), in the metric's direction
    verdict: str  # "forgot" | "ok" | "improved" | "uncertain"
    shares_source_with_replay: bool
    extra: dict[str, Any]
    threshold: float = DEFAULT_THRESHOLD  # the bound this probe's verdict used
    kind: str = ""
    # secondary metrics scored per item on both models (e.g. an MC probe's `prob`): metric ->
    # {base, tuned, rel_change, ci_low, ci_high}, higher is better; informational, no verdict
    secondary: dict[str, dict[str, float]] = field(default_factory=dict)
    # right/wrong probes: items the base got right and the tuned model wrong, and the reverse. On
    # a few hundred items a model that moved at all flips some either way; the net is the change
    flips: dict[str, int] | None = None
    # which items flipped, to read rather than count: {"lost": [...], "gained": [...]}, each item its
    # id and, for generation probes, the base's and the tuned model's answers
    flipped: dict[str, list[dict[str, str]]] | None = None


def verdict_for(drop: float, drop_ci: tuple[float, float], threshold: float) -> str:
    """``forgot``: drop above threshold and its CI excludes 0; ``uncertain``: above threshold but
    the CI covers 0; ``improved``: the CI says better; ``ok`` otherwise."""
    lo, hi = drop_ci
    if drop > threshold:
        return "forgot" if lo > 0 else "uncertain"
    if hi < 0:
        return "improved"
    return "ok"


def compare_results(base: list[ProbeResult], tuned: list[ProbeResult], *, threshold: float = DEFAULT_THRESHOLD,
                    n_boot: int = 1000, seed: int = 0,
                    kind_thresholds: dict[str, float] | None = None) -> list[ProbeComparison]:
    """Pair probe results by name and compare; raises if the item sets differ.

    ``kind_thresholds`` overrides ``threshold`` per probe kind (default: `KIND_THRESHOLDS`).
    """
    from .stats import paired_relative_change

    by_name = {r.name: r for r in base}
    out = []
    for t in tuned:
        b = by_name.get(t.name)
        if b is None:
            raise ValueError(f"probe {t.name!r} was scored on the tuned model but not on the base")
        if b.n != t.n:
            raise ValueError(f"probe {t.name!r}: base has {b.n} items, tuned {t.n}; compare the same items")
        ch = paired_relative_change(b.item_values, b.item_weights, t.item_values, t.item_weights,
                                    higher_is_better=t.higher_is_better, n_boot=n_boot, seed=seed)
        drop_ci = _drop_ci(ch, t.higher_is_better)
        bound = threshold_for(t.kind, threshold, kind_thresholds)
        out.append(ProbeComparison(
            probe=t.name, metric=t.metric, higher_is_better=t.higher_is_better, n=t.n,
            base=b.score, tuned=t.score, rel_change=ch["rel_change"], ci_low=ch["ci_low"], ci_high=ch["ci_high"],
            drop=ch["drop"], verdict=verdict_for(ch["drop"], drop_ci, bound),
            shares_source_with_replay=t.shares_source_with_replay,
            extra={"base": b.extra, "tuned": t.extra}, threshold=bound, kind=t.kind,
            secondary=_secondary(b, t, n_boot=n_boot, seed=seed), flips=_flips(b, t), flipped=_flipped(b, t),
        ))
    return out


def _right_wrong(b: ProbeResult, t: ProbeResult) -> bool:
    """Whether every item of both runs is right (1) or wrong (0), unweighted: items can flip."""
    return b.item_weights is None and {*b.item_values, *t.item_values} <= {0.0, 1.0}


def _flips(b: ProbeResult, t: ProbeResult) -> dict[str, int] | None:
    if not _right_wrong(b, t):
        return None
    pairs = list(zip(b.item_values, t.item_values))
    return {"lost": sum(x == 1.0 and y == 0.0 for x, y in pairs),
            "gained": sum(x == 0.0 and y == 1.0 for x, y in pairs)}


def _flipped(b: ProbeResult, t: ProbeResult) -> dict[str, list[dict[str, str]]] | None:
    """The lost and gained items by name (ids only when both runs named the same items)."""
    if not _right_wrong(b, t) or not b.item_ids or b.item_ids != t.item_ids:
        return None
    answers = len(b.item_outputs) == len(t.item_outputs) == len(b.item_ids)
    out: dict[str, list[dict[str, str]]] = {"lost": [], "gained": []}
    for i, (x, y) in enumerate(zip(b.item_values, t.item_values)):
        if x != y:
            item = {"id": b.item_ids[i]}
            if answers:
                item.update(base=b.item_outputs[i], tuned=t.item_outputs[i])
            out["lost" if x > y else "gained"].append(item)
    return out


def _secondary(b: ProbeResult, t: ProbeResult, *, n_boot: int, seed: int) -> dict[str, dict[str, float]]:
    from .stats import paired_relative_change

    out = {}
    for name in sorted(set(b.item_extra) & set(t.item_extra)):
        ch = paired_relative_change(b.item_extra[name], None, t.item_extra[name], None,
                                    higher_is_better=True, n_boot=n_boot, seed=seed)
        out[name] = {k: ch[k] for k in ("base", "tuned", "rel_change", "ci_low", "ci_high")}
    return out


def _drop_ci(ch: dict, higher_is_better: bool) -> tuple[float, float]:
    lo, hi = ch["ci_low"], ch["ci_high"]
    return (-hi, -lo) if higher_is_better else (lo, hi)


def summary(comparisons: list[ProbeComparison], threshold: float) -> dict[str, Any]:
    forgot = [c.probe for c in comparisons if c.verdict == "forgot"]
    worst = max(comparisons, key=lambda c: c.drop) if comparisons else None
    return {
        "threshold": threshold,
        "forgetting": bool(forgot),
        "forgot_probes": forgot,
        "worst_probe": worst.probe if worst else None,
        "worst_drop": worst.drop if worst else None,
    }


def comparison_json(comparisons: list[ProbeComparison], threshold: float, meta: dict[str, Any]) -> dict[str, Any]:
    return {"meta": meta, "summary": summary(comparisons, threshold), "probes": [asdict(c) for c in comparisons]}
