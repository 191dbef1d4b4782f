"""Bootstrap CIs and the paired base-vs-tuned comparison."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tether.probes.stats import bootstrap_ci, paired_relative_change, ratio, summarise


def coin(n, p=0.6, seed=1):
    return (np.random.default_rng(seed).random(n) < p).astype(float)


def test_ci_contains_the_mean_and_shrinks_with_n():
    small, large = coin(50), coin(2000)
    lo_s, hi_s = bootstrap_ci(small)
    lo_l, hi_l = bootstrap_ci(large)
    assert lo_s <= small.mean() <= hi_s
    assert lo_l <= large.mean() <= hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 3


def test_ci_is_deterministic_given_the_seed():
    v = coin(200)
    assert bootstrap_ci(v, seed=3) == bootstrap_ci(v, seed=3)
    assert bootstrap_ci(v, seed=3) != bootstrap_ci(v, seed=4)


def test_weighted_ratio_and_edge_cases():
    assert ratio([2.0, 6.0], [1.0, 3.0]) == 2.0
    score, lo, hi = summarise([2.0, 6.0, 3.0], [1.0, 3.0, 1.0])
    assert score == pytest.approx(11 / 5) and lo <= score <= hi
    assert bootstrap_ci([0.7]) == (0.7, 0.7)
    assert all(math.isnan(x) for x in bootstrap_ci([]))
    with pytest.raises(ValueError):
        bootstrap_ci([1.0, 2.0], [1.0])


def test_large_probes_are_resampled_in_chunks():
    v = coin(30_000)
    lo, hi = bootstrap_ci(v, n_boot=200)
    assert lo < v.mean() < hi and hi - lo < 0.02


def test_identical_runs_show_no_change():
    v = coin(100)
    r = paired_relative_change(v, None, v, None, higher_is_better=True)
    assert r["rel_change"] == 0.0 and r["ci_low"] <= 0.0 <= r["ci_high"]
    assert r["drop"] == 0.0 and not r["degraded"]


def test_a_clear_drop_is_flagged_for_both_directions():
    base = coin(400, p=0.8)
    tuned = base.copy()
    tuned[:120] = 0.0  # the tuned model forgets a third of the items
    acc = paired_relative_change(base, None, tuned, None, higher_is_better=True, seed=1)
    assert acc["rel_change"] < 0 and acc["drop"] > 0 and acc["degraded"]
    assert acc["drop_ci_low"] > 0 and acc["ci_high"] < 0
    # a loss that goes up is a drop too
    nll_b, nll_t, w = np.full(50, 2.0), np.full(50, 2.5), np.full(50, 10.0)
    loss = paired_relative_change(nll_b * w, w, nll_t * w, w, higher_is_better=False)
    assert loss["rel_change"] == pytest.approx(0.25) and loss["drop"] == pytest.approx(0.25)
    assert loss["degraded"]


def test_paired_interval_is_tighter_than_independent_ones():
    rng = np.random.default_rng(0)
    difficulty = rng.random(300)
    base = (difficulty < 0.7).astype(float)
    tuned = (difficulty < 0.65).astype(float)  # same items, slightly worse
    r = paired_relative_change(base, None, tuned, None, higher_is_better=True)
    lo_b, hi_b = bootstrap_ci(base)
    lo_t, hi_t = bootstrap_ci(tuned)
    independent_width = math.hypot(hi_b - lo_b, hi_t - lo_t) / base.mean()
    assert (r["ci_high"] - r["ci_low"]) < independent_width / 2


def test_zero_base_reports_absolute_change_and_checks_alignment():
    r = paired_relative_change([0.0, 0.0], None, [1.0, 0.0], None, higher_is_better=True)
    assert not r["relative"] and r["rel_change"] == 0.5 and r["drop"] == -0.5
    with pytest.raises(ValueError, match="same items"):
        paired_relative_change([1.0], None, [1.0, 0.0], None, higher_is_better=True)
