"""The forgetting report detects forgetting and does not invent it."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from tether.probes.base import ProbeResult
from tether.probes.verdict import compare_results, comparison_json, verdict_for
from tether.report.compare import render_comparison, render_flipped


def res(values, weights=None, hib=True, name="p"):
    s = sum(values) / (sum(weights) if weights else len(values))
    return ProbeResult(name=name, kind="k", metric="m", higher_is_better=hib, score=s, n=len(values), ci_low=s,
                       ci_high=s, item_values=list(values), item_weights=weights)


def test_verdicts():
    assert verdict_for(0.10, (0.02, 0.2), 0.05) == "forgot"
    assert verdict_for(0.10, (-0.02, 0.2), 0.05) == "uncertain"
    assert verdict_for(0.01, (-0.02, 0.04), 0.05) == "ok"
    assert verdict_for(-0.10, (-0.2, -0.05), 0.05) == "improved"


def test_identical_results_no_drop_ci_covers_zero():
    g = torch.Generator().manual_seed(0)
    vals = torch.rand(200, generator=g).round().tolist()
    c = compare_results([res(vals)], [res(vals)])[0]
    assert c.rel_change == 0 and c.ci_low <= 0 <= c.ci_high and c.verdict == "ok"


def test_clear_drop_flagged_for_both_directions():
    acc_base, acc_tuned = [1.0] * 80 + [0.0] * 20, [1.0] * 50 + [0.0] * 50
    c = compare_results([res(acc_base)], [res(acc_tuned)])[0]
    assert c.verdict == "forgot" and c.drop == pytest.approx(0.375) and c.ci_high < 0
    assert c.flips == {"lost": 30, "gained": 0}
    swapped = compare_results([res([1.0, 0.0, 1.0, 0.0])], [res([0.0, 1.0, 1.0, 0.0])])[0]
    assert swapped.flips == {"lost": 1, "gained": 1} and swapped.rel_change == 0
    # a loss that rises is a drop too (lower is better)
    lb = [2.0] * 50
    lt = [2.6] * 50
    w = [1.0] * 50
    c = compare_results([res(lb, w, hib=False)], [res(lt, w, hib=False)])[0]
    assert c.verdict == "forgot" and c.drop == pytest.approx(0.3) and c.rel_change == pytest.approx(0.3)
    assert c.flips is None  # a loss has no right/wrong items


def test_flipped_items_are_named_with_both_answers():
    base, tuned = res([1.0, 0.0, 1.0, 0.0, 1.0]), res([0.0, 1.0, 1.0, 0.0, 0.0])
    for r in (base, tuned):
        r.item_ids = ["a", "b", "c", "d", "e"]
    c = compare_results([base], [tuned])[0]
    assert c.flips == {"lost": 2, "gained": 1}
    assert c.flipped == {"lost": [{"id": "a"}, {"id": "e"}], "gained": [{"id": "b"}]}
    assert render_flipped([c]) is None  # nothing generated: ids only, in the JSON
    base.item_outputs = ["Paris", "no", "4", "x", "Rome " * 40]
    tuned.item_outputs = ["positive", "blue", "4", "y", "negative"]
    c = compare_results([base], [tuned])[0]
    assert c.flipped["lost"] == [{"id": "a", "base": "Paris", "tuned": "positive"},
                                 {"id": "e", "base": "Rome " * 40, "tuned": "negative"}]
    assert c.flipped["gained"] == [{"id": "b", "base": "no", "tuned": "blue"}]
    assert comparison_json([c], 0.05, {})["probes"][0]["flipped"] == c.flipped
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(render_flipped([c], limit=1))
    text = console.export_text()
    assert "Paris" in text and "positive" in text and "negative" not in text  # one per probe
    # items named differently (or not at all, e.g. results written before ids) are counted, not listed
    tuned.item_ids = ["a", "b", "c", "d", "z"]
    c = compare_results([base], [tuned])[0]
    assert c.flips == {"lost": 2, "gained": 1} and c.flipped is None
    old = base.to_dict()
    for key in ("item_ids", "item_outputs"):
        old.pop(key)
    assert ProbeResult.from_dict(old).item_ids == []
    # weighted or graded probes have no right/wrong items to name
    loss = res([2.0, 2.5], [1.0, 1.0], hib=False)
    loss.item_ids = ["a", "b"]
    assert compare_results([loss], [loss])[0].flipped is None


def test_mismatched_items_rejected_and_json_table():
    with pytest.raises(ValueError, match="same items"):
        compare_results([res([1.0, 0.0])], [res([1.0])])
    with pytest.raises(ValueError, match="not on the base"):
        compare_results([res([1.0], name="a")], [res([1.0], name="b")])
    comps = compare_results([res([1.0] * 10)], [res([0.0] * 10)])
    js = comparison_json(comps, 0.05, {"base": "b"})
    assert js["summary"]["forgetting"] and js["summary"]["forgot_probes"] == ["p"]
    from rich.console import Console

    console = Console(record=True, width=160)
    console.print(render_comparison(comps, 0.05))
    text = console.export_text()
    assert "forgot" in text and "10/0" in text


def test_secondary_metrics_get_a_paired_change_and_old_results_without_them_still_load():
    base, tuned = res([1.0, 0.0, 1.0, 1.0]), res([1.0, 0.0, 1.0, 0.0])
    base.item_extra = {"prob": [0.9, 0.2, 0.6, 0.5], "only_base": [1.0] * 4}
    tuned.item_extra = {"prob": [0.9, 0.2, 0.6, 0.45]}
    c = compare_results([base], [tuned])[0]
    assert set(c.secondary) == {"prob"}  # a metric one side lacks is not compared
    p = c.secondary["prob"]
    assert p["base"] == pytest.approx(0.55) and p["tuned"] == pytest.approx(0.5375)
    assert p["rel_change"] == pytest.approx(-0.0125 / 0.55) and p["ci_low"] <= p["rel_change"] <= p["ci_high"]
    assert c.rel_change == pytest.approx(-1 / 3)  # the primary metric is untouched
    old = base.to_dict()
    old.pop("item_extra")  # results written before secondary metrics existed
    assert ProbeResult.from_dict(old).item_extra == {}
    from rich.console import Console

    console = Console(record=True, width=160)
    console.print(render_comparison([c], 0.05))
    assert "-2.3%" in console.export_text()  # the prob row: -0.0125 / 0.55
    assert "item_extra" not in base.to_dict(with_items=False)


def test_demo_table_shows_each_probe_with_flips_and_the_mc_gold_probability():
    from rich.console import Console

    from tether.training.demo import demo_table

    mc = res([1.0, 1.0, 0.0, 0.0], name="knowledge_mc")
    mc.item_extra = {"prob": [0.8, 0.6, 0.3, 0.2]}
    tuned = res([1.0, 0.0, 1.0, 0.0], name="knowledge_mc")
    tuned.item_extra = {"prob": [0.8, 0.5, 0.35, 0.2]}
    loss_b, loss_t = res([2.0, 2.0], [1.0, 1.0], hib=False, name="chat_loss"), res([2.2, 2.2], [1.0, 1.0], hib=False,
                                                                                  name="chat_loss")
    summary = {"task": {"base": 0.0, "final": 0.7, "gain": 0.7}, "seconds": 12.0,
               "probes": [asdict(c) for c in compare_results([mc, loss_b], [tuned, loss_t])]}
    console = Console(record=True, width=200)
    console.print(demo_table({"naive full FT": summary, "default recipe": summary}, 60))
    text = console.export_text()
    assert "knowledge_mc (m)" in text and "+0.0% [" in text and "-1/+1" in text
    assert "knowledge_mc (gold-choice probability)" in text and "-2.6% [" in text  # (1.85 - 1.9) / 1.9
    assert "chat_loss (m, lower better)" in text and "+10.0% [" in text and "12 s" in text
