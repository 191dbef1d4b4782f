"""Bootstrap confidence intervals for probe scores and paired base-vs-tuned changes.

Every probe score is a ratio ``sum(values) / sum(weights)`` over items (accuracy: weights 1; loss:
summed NLL over token counts), so one item-level bootstrap serves all of them (Efron & Tibshirani,
*An Introduction to the Bootstrap*, 1993). Base and tuned runs score the *same* items, so their
difference is bootstrapped with the same resampled indices: the paired design cancels item
difficulty and gives much tighter intervals than two independent CIs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

_CHUNK_CELLS = 2_000_000  # resampled cells per chunk: keeps memory flat for large probes


def _arrays(values: Sequence[float], weights: Sequence[float] | None) -> tuple[np.ndarray, np.ndarray]:
    v = np.asarray(values, dtype=np.float64)
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=np.float64)
    if v.shape != w.shape or v.ndim != 1:
        raise ValueError(f"values and weights must be 1-D and equally long, got {v.shape} and {w.shape}")
    return v, w


def _resamples(n: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Yield blocks of bootstrap index rows; the same seed gives the same rows for any caller."""
    rng = np.random.default_rng(seed)
    step = max(1, _CHUNK_CELLS // max(n, 1))
    for start in range(0, n_boot, step):
        yield rng.integers(0, n, size=(min(step, n_boot - start), n))


def ratio(values: Sequence[float], weights: Sequence[float] | None = None) -> float:
    """``sum(values) / sum(weights)``; NaN when there is nothing to average."""
    v, w = _arrays(values, weights)
    total = w.sum()
    return float(v.sum() / total) if total != 0 else float("nan")


def bootstrap_ci(values: Sequence[float], weights: Sequence[float] | None = None, n_boot: int = 1000,
                 seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap CI of ``sum(values) / sum(weights)``, resampling items.

    Args:
        values: per-item values (e.g. 0/1 correctness, summed NLL).
        weights: per-item weights (e.g. token counts); ``None`` means 1 each.
        n_boot: number of resamples.
        seed: RNG seed; the interval is deterministic given it.
        alpha: 1 - coverage (0.05 for a 95% interval).

    Returns:
        ``(lo, hi)``; ``(nan, nan)`` for no items, ``(x, x)`` for one.
    """
    v, w = _arrays(values, weights)
    if len(v) == 0:
        return float("nan"), float("nan")
    if len(v) == 1:
        x = ratio(v, w)
        return x, x
    stats = np.concatenate([_ratio_rows(v, w, idx) for idx in _resamples(len(v), n_boot, seed)])
    lo, hi = np.nanquantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def _ratio_rows(v: np.ndarray, w: np.ndarray, idx: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return v[idx].sum(axis=1) / w[idx].sum(axis=1)


def summarise(values: Sequence[float], weights: Sequence[float] | None = None, n_boot: int = 1000,
              seed: int = 0, alpha: float = 0.05) -> tuple[float, float, float]:
    """``(score, ci_low, ci_high)`` for a probe's per-item values."""
    return (ratio(values, weights), *bootstrap_ci(values, weights, n_boot=n_boot, seed=seed, alpha=alpha))


def paired_relative_change(base_vals: Sequence[float], base_w: Sequence[float] | None,
                           tuned_vals: Sequence[float], tuned_w: Sequence[float] | None, *,
                           higher_is_better: bool, n_boot: int = 1000, seed: int = 0,
                           alpha: float = 0.05) -> dict[str, float | bool]:
    """Relative change of a probe score from base to tuned, with a paired bootstrap CI.

    ``rel_change = (tuned - base) / |base|``; ``drop`` is the same change signed so that positive
    means worse (``-rel_change`` when higher is better). When ``base == 0`` the change cannot be
    relative: the absolute change is reported instead and ``relative`` is false.

    Args:
        base_vals, base_w: per-item values and weights of the base model.
        tuned_vals, tuned_w: the same items, in the same order, for the tuned model.
        higher_is_better: the probe metric's direction.

    Returns:
        ``base``, ``tuned``, ``abs_change``, ``rel_change`` with ``ci_low``/``ci_high``, ``drop``
        with ``drop_ci_low``/``drop_ci_high``, ``relative``, and ``degraded`` (the whole ``drop``
        interval lies above zero: the tuned model is reliably worse).
    """
    bv, bw = _arrays(base_vals, base_w)
    tv, tw = _arrays(tuned_vals, tuned_w)
    if len(bv) != len(tv):
        raise ValueError(f"paired comparison needs the same items: {len(bv)} base vs {len(tv)} tuned values")
    base, tuned = ratio(bv, bw), ratio(tv, tw)
    relative = bool(base != 0 and np.isfinite(base))
    scale = abs(base) if relative else 1.0
    rel = (tuned - base) / scale
    if len(bv) >= 2:
        boots = []
        for idx in _resamples(len(bv), n_boot, seed):
            b, t = _ratio_rows(bv, bw, idx), _ratio_rows(tv, tw, idx)
            with np.errstate(divide="ignore", invalid="ignore"):
                boots.append((t - b) / (np.abs(b) if relative else 1.0))
        stats = np.concatenate(boots)
        stats = stats[np.isfinite(stats)]
        lo, hi = (np.quantile(stats, [alpha / 2, 1 - alpha / 2]) if len(stats) else (np.nan, np.nan))
    else:
        lo = hi = rel
    sign = -1.0 if higher_is_better else 1.0
    drop_lo, drop_hi = sorted((sign * float(lo), sign * float(hi)))
    return {
        "base": base, "tuned": tuned, "abs_change": tuned - base, "relative": relative,
        "rel_change": float(rel), "ci_low": float(lo), "ci_high": float(hi),
        "drop": sign * float(rel), "drop_ci_low": drop_lo, "drop_ci_high": drop_hi,
        "degraded": bool(drop_lo > 0),
    }


def probe_result(probe, values: Sequence[float], weights: Sequence[float] | None = None, *,
                 metric: str | None = None, extra: dict[str, float] | None = None,
                 samples: list[dict] | None = None, seconds: float = 0.0, n_boot: int = 1000,
                 item_extra: dict[str, Sequence[float]] | None = None,
                 item_outputs: Sequence[str] | None = None):
    """Reduce a probe's per-item values to a `ProbeResult` (score + bootstrap CI, items kept).

    ``item_extra`` holds per-item values of secondary metrics; their means join ``extra``.
    ``item_outputs``: the model's answer per item, where it wrote one (generation).
    """
    from .base import ProbeResult

    score, lo, hi = summarise(values, weights, n_boot=n_boot, seed=probe.seed)
    return ProbeResult(
        name=probe.name, kind=getattr(probe, "registered_name", type(probe).__name__),
        metric=metric or probe.metric, higher_is_better=probe.higher_is_better, score=score,
        n=len(values), ci_low=lo, ci_high=hi, item_values=[float(x) for x in values],
        item_weights=None if weights is None else [float(x) for x in weights],
        extra={**(extra or {}), **{k: float(np.mean(v)) if len(v) else float("nan")
                                   for k, v in (item_extra or {}).items()}},
        item_extra={k: [float(x) for x in v] for k, v in (item_extra or {}).items()},
        sources=list(probe.sources), shares_source_with_replay=probe.shares_source_with_replay,
        seconds=seconds, samples=list(samples or []), item_ids=item_ids(probe.items, len(values)),
        item_outputs=list(item_outputs or []),
    )


def item_ids(items: Sequence[dict], n: int) -> list[str]:
    """Each item's ``id`` field, else its 1-based position; none when items and values do not pair."""
    if len(items) != n:
        return []
    return [str(it["id"]) if isinstance(it, dict) and it.get("id") is not None else str(i + 1)
            for i, it in enumerate(items)]


def check_options(probe, defaults: dict) -> dict:
    """The probe's options over its defaults; an unknown key is an error naming probe and key."""
    unknown = sorted(set(probe.options) - set(defaults))
    if unknown:
        raise ValueError(f"probe {probe.name!r}: unknown option {unknown[0]!r}; "
                         f"known: {', '.join(sorted(defaults))}")
    return {**defaults, **probe.options}
