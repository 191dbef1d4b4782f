"""interpolate (WiSE-FT): exact endpoints, restored weights, budgeted selection, saving."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import make_tiny_llama
from rich.console import Console

from tether.after.interpolate import interpolate, save_choice, scale_lora, select_alpha
from tether.probes.perplexity import PerplexityProbe
from tether.probes.scorer import Scorer
from tether.probes.suite import load_suite, run_suite

BS = 4
ALPHAS = (0.0, 0.5, 1.0)


@pytest.fixture
def suite(tmp_path):
    rows = {
        "mc.jsonl": [{"query": f"Question {i}: which is right?", "choices": ["yes", "no", "maybe"],
                      "gold": i % 3} for i in range(5)],
        "ppl.jsonl": [{"text": t} for t in ("The sky is blue.", "Paris is in France.",
                                            "Two plus two is four.", "Cats chase mice at night.")],
        "drift.jsonl": [{"prompt": p} for p in ("Hello there", "Tell me a story", "What is a list?")],
    }
    for name, items in rows.items():
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in items))
    (tmp_path / "suite.yaml").write_text(
        "name: tiny\nprobes:\n"
        "  - {name: mc, kind: multiple_choice, data: mc.jsonl, options: {n_boot: 50}}\n"
        "  - {name: ppl, kind: perplexity, data: ppl.jsonl, options: {n_boot: 50}}\n"
        "  - {name: drift, kind: drift, data: drift.jsonl, options: {n_boot: 50}}\n")
    return load_suite(tmp_path / "suite.yaml")


@pytest.fixture
def task_probe():
    items = [{"prompt": f"Reverse {w}:", "completion": f" {w[::-1]}"} for w in ("cat", "dog", "sun", "tree")]
    return PerplexityProbe("task", items, n_boot=50)


def _scalings(model):
    return [dict(m.scaling) for m in model.modules() if isinstance(getattr(m, "scaling", None), dict)]


def _values(results):
    return {r.name: (r.item_values, r.item_weights) for r in results}


def test_full_finetune_endpoints_exact_and_weights_restored(tokenizer, suite, task_probe, tmp_path):
    base = make_tiny_llama(len(tokenizer))
    tuned = make_tiny_llama(len(tokenizer))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.3 * p.std().clamp_min(0.05) * torch.randn(p.shape, generator=g))
    want_base = run_suite(suite, Scorer(base, tokenizer, batch_size=BS), reference="self", progress=False)
    want_tuned = run_suite(suite, Scorer(tuned, tokenizer, batch_size=BS),
                           reference=Scorer(base, tokenizer, batch_size=BS), progress=False)
    task_base = task_probe.run(Scorer(base, tokenizer, batch_size=BS))
    task_tuned = task_probe.run(Scorer(tuned, tokenizer, batch_size=BS))
    base_before = {n: p.detach().clone() for n, p in base.named_parameters()}
    tuned_before = {n: p.detach().clone() for n, p in tuned.named_parameters()}

    res = interpolate(base, tuned, tokenizer, general_suite=suite, task_probe=task_probe, alphas=ALPHAS,
                      budget=0.05, batch_size=BS)
    assert res.mode == "full" and [p.alpha for p in res.points] == list(ALPHAS)
    assert _values(res.points[0].general) == _values(want_base)
    assert _values(res.points[-1].general) == _values(want_tuned) != _values(want_base)
    assert res.points[0].task.item_values == task_base.item_values
    assert res.points[-1].task.item_values == task_tuned.item_values
    assert res.points[1].task.item_values != task_base.item_values  # a=0.5 is a different model
    assert all(torch.equal(p, tuned_before[n]) for n, p in tuned.named_parameters())
    assert all(torch.equal(p, base_before[n]) for n, p in base.named_parameters())
    # the choice obeys the rule on the measured curve
    ok = [p for p in res.points if p.max_drop <= 0.05]
    assert res.points[res.chosen].within_budget
    assert res.points[res.chosen].task.score == min(p.task.score for p in ok)  # loss: lower is better

    out = save_choice(res, tmp_path / "wise", alpha=0.5)
    saved = type(tuned).from_pretrained(out).eval()
    for n, p in saved.named_parameters():
        assert torch.allclose(p, 0.5 * base_before[n] + 0.5 * tuned_before[n], atol=1e-6), n
    assert all(torch.equal(p, tuned_before[n]) for n, p in tuned.named_parameters())
    meta = json.loads((out / "interpolation.json").read_text())
    assert meta["saved_alpha"] == 0.5 and len(meta["points"]) == 3

    console = Console(record=True, width=160)
    console.print(res.render_table())
    assert "worst drop" in console.export_text()
    png = res.plot(tmp_path / "curve.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_lora_endpoints_exact_and_scaling_restored(tokenizer, suite, task_probe, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = make_tiny_llama(len(tokenizer))
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                     init_lora_weights=False)
    tuned = get_peft_model(copy.deepcopy(base), cfg)
    want_base = run_suite(suite, Scorer(base, tokenizer, batch_size=BS), reference="self", progress=False)
    want_tuned = run_suite(suite, Scorer(tuned, tokenizer, batch_size=BS), progress=False)
    task_tuned = task_probe.run(Scorer(tuned, tokenizer, batch_size=BS))
    weights = {n: p.detach().clone() for n, p in tuned.named_parameters()}
    scalings = _scalings(tuned)

    res = interpolate(None, tuned, tokenizer, general_suite=suite, task_probe=task_probe,
                      alphas=(1.0, 0.5), budget=0.1, batch_size=BS)
    assert res.mode == "lora" and [p.alpha for p in res.points] == [0.0, 0.5, 1.0]  # 0 added, sorted
    assert _values(res.points[0].general) == _values(want_base)
    assert _values(res.points[-1].general) == _values(want_tuned) != _values(want_base)
    assert res.points[-1].task.item_values == task_tuned.item_values
    assert _scalings(tuned) == scalings and len(scalings) == 6
    assert all(torch.equal(p, weights[n]) for n, p in tuned.named_parameters())

    out = save_choice(res, tmp_path / "adapter", alpha=0.5)
    assert all(torch.equal(p, weights[n]) for n, p in tuned.named_parameters())
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    ids = torch.tensor([tokenizer("Hello there, how are you?")["input_ids"]])
    with torch.no_grad(), scale_lora(tuned) as set_alpha:
        set_alpha(0.5)
        want = tuned(input_ids=ids).logits
    assert torch.allclose(loaded(input_ids=ids).logits, want, atol=1e-5)


def test_select_alpha_respects_budget():
    alphas = [0.0, 0.25, 0.5, 0.75, 1.0]
    drops = [0.0, 0.01, 0.04, 0.06, 0.20]
    assert select_alpha(alphas, [0.1, 0.3, 0.5, 0.6, 0.7], drops, 0.05) == 2
    assert select_alpha(alphas, [2.0, 1.5, 1.2, 1.0, 0.9], drops, 0.05, higher_is_better=False) == 2
    assert select_alpha(alphas, [0.1, 0.3, 0.5, 0.6, 0.7], drops, 0.1) == 3
    assert select_alpha(alphas, [0.1, 0.3, 0.5, 0.6, 0.7], drops, 0.0) == 0
    # a non-monotone curve: the best task score inside the budget, not the largest alpha
    assert select_alpha(alphas, [0.1, 0.6, 0.5, 0.9, 0.9], [0.0, 0.02, 0.03, 0.5, 0.6], 0.05) == 1
    # ties: smaller drop, then smaller alpha
    assert select_alpha(alphas, [0.1, 0.5, 0.5, 0.5, 0.2], [0.0, 0.03, 0.01, 0.01, 0.0], 0.05) == 2
    # NaN drops are over budget; NaN task scores rank last
    assert select_alpha(alphas, [0.1, 0.3, 0.9, 0.6, 0.7], [0.0, 0.0, math.nan, 0.0, 0.3], 0.05) == 3
    assert select_alpha(alphas, [0.1, math.nan, 0.0, 0.0, 0.0], [0.0] * 5, 0.05) == 0
    # no task probe: the largest alpha within budget
    assert select_alpha(alphas, None, drops, 0.05) == 2
    assert select_alpha(alphas, None, [math.nan] * 5, 0.05) == 0


def test_input_errors(tokenizer, suite):
    base = make_tiny_llama(len(tokenizer))
    with pytest.raises(ValueError, match="needs its base"):
        interpolate(None, base, tokenizer, general_suite=suite)
    with pytest.raises(ValueError, match="same model object"):
        interpolate(base, base, tokenizer, general_suite=suite)
    with pytest.raises(ValueError, match="budget"):
        interpolate(base, base, tokenizer, general_suite=suite, budget=-0.1)
