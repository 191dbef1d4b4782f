"""Memory-strength replay: weakest first, expanding intervals, seeded, and a uniform baseline."""

from __future__ import annotations

import math

import pytest

from tether.data.mssr import MemoryStrengthScheduler, UniformScheduler


def simulate(sched, losses: dict[int, float], steps: int, k: int = 1) -> dict[int, list[int]]:
    seen: dict[int, list[int]] = {i: [] for i in losses}
    for step in range(steps):
        chosen = sched.select(k, step)
        sched.update(chosen, [losses[i] for i in chosen], step)
        for i in chosen:
            seen[i].append(step)
    return seen


def test_never_replayed_then_weak_examples_come_first():
    fresh = MemoryStrengthScheduler(5, seed=0)
    assert sorted(fresh.select(5, 0)) == [0, 1, 2, 3, 4]  # all unseen (retention 0): everything is due
    assert (fresh.last_step == 0).all()  # selection starts the clock (batches are drawn ahead of updates)
    s = MemoryStrengthScheduler(5, seed=0)
    s.update([0, 1, 2, 3], [0.1, 0.2, 0.3, 5.0], step=0)  # 4 is still never replayed
    r = s.retention(3)
    assert r[4] == 0.0 and r[3] < r[0]
    assert s.select(2, 3) == [4, 3]  # unseen first, then the high-loss (weakened) one
    # long-unreplayed: everything else equal, the one replayed longest ago is weakest
    t = MemoryStrengthScheduler(3, seed=0)
    for step, i in enumerate([0, 1, 2]):
        t.update([i], [1.0], step)
    assert t.select(1, 10) == [0]


def test_low_loss_earns_a_longer_interval_than_high_loss():
    s = MemoryStrengthScheduler(2, init_strength=2.0, seed=0)
    s.update([0, 1], [0.2, 3.0], step=0)
    assert s.strength[0] == pytest.approx(4.0) and s.strength[1] == pytest.approx(1.0)
    assert s.next_due(0) - 0 > s.next_due(1) - 0
    assert s.next_due(0) == pytest.approx(4.0 * math.log(2))
    # improving on a repeat grows the strength more than holding steady
    s.update([0], [0.1], step=5)  # 50 % better than its last loss -> growth * 1.5
    assert s.strength[0] == pytest.approx(4.0 * 2.0 * 1.5)


def test_intervals_expand_for_easy_examples_and_hard_ones_return_often():
    hist = simulate(MemoryStrengthScheduler(4, seed=0), {0: 0.5, 1: 1.0, 2: 1.4, 3: 3.0}, steps=60)
    for i in (0, 1, 2):
        gaps = [b - a for a, b in zip(hist[i], hist[i][1:], strict=False)]
        assert len(gaps) >= 2 and all(g2 > g1 for g1, g2 in zip(gaps, gaps[1:], strict=False)), (i, hist[i])
    assert len(hist[3]) > 3 * max(len(hist[i]) for i in (0, 1, 2))


def test_deterministic_with_seed_and_state_round_trip():
    losses = {i: float(i % 3) for i in range(10)}
    a = simulate(MemoryStrengthScheduler(10, seed=7), losses, steps=30, k=3)
    b = simulate(MemoryStrengthScheduler(10, seed=7), losses, steps=30, k=3)
    assert a == b
    s1, s2 = MemoryStrengthScheduler(10, seed=1), MemoryStrengthScheduler(10, seed=1)
    simulate(s1, losses, steps=5, k=3)
    s2.load_state_dict(s1.state_dict())
    assert s1.select(4, 9) == s2.select(4, 9)


def test_uniform_covers_every_item_once_per_pass():
    u = UniformScheduler(10, seed=3)
    first = u.select(4, 0) + u.select(4, 1) + u.select(2, 2)
    assert sorted(first) == list(range(10))
    second = u.select(3, 3) + u.select(3, 4) + u.select(4, 5)  # a call may straddle passes, never repeat
    assert sorted(second) == list(range(10))
    crossing = u.select(7, 6) + u.select(7, 7)
    assert len(set(crossing[:7])) == 7 and len(set(crossing[7:])) == 7
    assert sorted(crossing[:10]) == list(range(10))  # the third pass is still exactly covered
    assert UniformScheduler(10, seed=3).select(10, 0) == UniformScheduler(10, seed=3).select(10, 0)
    v = UniformScheduler(10, seed=3)
    v.select(4, 0)
    w = UniformScheduler(10, seed=99)
    w.load_state_dict(v.state_dict())
    assert w.select(6, 1) == v.select(6, 1)


@pytest.mark.parametrize("cls", [UniformScheduler, MemoryStrengthScheduler])
def test_token_budget_accounting(cls):
    lengths = [5, 10, 20, 40]
    s = cls(4, lengths=lengths, seed=0)
    chosen = s.select(2, 0)
    assert s.tokens_replayed == sum(lengths[i] for i in chosen) and s.items_replayed == 2
    before = s.tokens_replayed
    picked = s.select_tokens(30, 1)
    spent = s.tokens_replayed - before
    assert picked and spent == sum(lengths[i] for i in picked)
    assert spent <= 30 or len(picked) == 1  # over budget only by a single over-long example
    assert s.stats()["tokens_replayed"] == s.tokens_replayed
    with pytest.raises(ValueError, match="lengths"):
        cls(4, seed=0).select_tokens(10, 0)


def test_validation():
    with pytest.raises(ValueError, match="decay"):
        MemoryStrengthScheduler(3, decay=1.5)
    with pytest.raises(ValueError, match="indices"):
        MemoryStrengthScheduler(3).update([0, 1], [0.1], 0)
    with pytest.raises(ValueError, match="n_items"):
        UniformScheduler(0)
