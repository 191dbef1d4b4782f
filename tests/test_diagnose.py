"""diagnose: per-block weight change, CKA and KL between a base and a tuned model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import make_tiny_llama
from rich.console import Console

from tether.after.diagnose import diagnose, freeze_fraction, linear_cka, suggest
from tether.methods.freeze import select_frozen

PROMPTS = [
    "The capital of France is",
    "def add(a, b):\n    return",
    [{"role": "user", "content": "Name three colours."}],
    "Water boils at",
    "Once upon a time",
]


@pytest.fixture
def base(tokenizer):
    return make_tiny_llama(len(tokenizer), layers=4)


def _perturb_block(model, k: int, scale: float = 0.5) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.model.layers[k].parameters():
            p.add_(scale * p.std().clamp_min(0.1) * torch.randn(p.shape, generator=g))


def test_identical_models_show_no_change(base, tokenizer):
    d = diagnose(base, copy.deepcopy(base), tokenizer, PROMPTS, batch_size=2)
    assert len(d.blocks) == 4 and d.block_prefix == "model.layers"
    assert all(b.weight_change == 0.0 for b in d.blocks)
    assert all(abs(b.cka - 1.0) < 1e-6 for b in d.blocks)
    assert d.kl == 0.0 and d.outside_change == 0.0
    assert d.recipe is None and d.n_prompts == len(PROMPTS) and d.n_tokens > len(PROMPTS)
    assert set(d.blocks[0].group_change) == {"attn", "mlp", "norm"}


@pytest.mark.parametrize("k", [1, 2])
def test_perturbed_block_is_named(base, tokenizer, k):
    tuned = copy.deepcopy(base)
    _perturb_block(tuned, k)
    d = diagnose(base, tuned, tokenizer, PROMPTS, batch_size=3)
    wc = [b.weight_change for b in d.blocks]
    assert max(range(4), key=wc.__getitem__) == k
    assert all(wc[i] == 0.0 for i in range(4) if i != k)
    assert all(abs(d.blocks[i].cka - 1) < 1e-6 for i in range(k)) and d.blocks[k].cka < 0.999
    assert d.kl > 0
    # the suggestion freezes exactly the blocks below k, as the freeze method would count them
    frac = d.recipe["freeze"]["fraction"]
    assert int(frac * 4) == k
    frozen = select_frozen(tuned, frac, False, [])
    assert list(frozen) == [f"blocks 0-{k - 1} of 4 (model.layers)"]
    assert f"block {k}" in d.suggestion and "freeze:" in d.recipe_yaml


def test_peft_tuned_model_is_read_without_merging(base, tokenizer):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    tuned = get_peft_model(copy.deepcopy(base), cfg)
    next(p for n, p in tuned.named_parameters() if "lora_A" in n).requires_grad_(False)  # a frozen adapter
    before = {n: p.detach().clone() for n, p in tuned.named_parameters()}
    flags = {n: p.requires_grad for n, p in tuned.named_parameters()}
    d = diagnose(base, tuned, tokenizer, PROMPTS, batch_size=4)
    d_self = diagnose(None, tuned, tokenizer, PROMPTS, batch_size=4)  # adapter-disabled view as the base
    after = dict(tuned.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert {n: p.requires_grad for n, p in after.items()} == flags  # never modified, flags included
    assert not any(getattr(m, "merged", False) for m in tuned.modules())
    merged = copy.deepcopy(tuned).merge_and_unload()
    ref = diagnose(base, merged, tokenizer, PROMPTS, batch_size=4)
    for a, b, c in zip(d.blocks, d_self.blocks, ref.blocks):
        assert a.weight_change > 0
        assert a.weight_change == pytest.approx(c.weight_change, rel=1e-5)
        assert b.weight_change == pytest.approx(c.weight_change, rel=1e-5)
        assert set(a.group_change) == {"attn", "mlp", "norm"} and a.group_change["norm"] == 0.0
        assert a.cka == pytest.approx(c.cka, abs=1e-5) and b.cka == pytest.approx(c.cka, abs=1e-5)
    # KL ~7e-4: float32 noise in the merged vs unmerged logits moves it by ~1e-7 absolute
    want_kl = pytest.approx(ref.kl, rel=1e-4, abs=1e-6)
    assert d.kl == want_kl and d_self.kl == want_kl


def test_dora_falls_back_to_merged_copies(base, tokenizer):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, target_modules=["v_proj"], use_dora=True, init_lora_weights=False)
    tuned = get_peft_model(copy.deepcopy(base), cfg)
    d = diagnose(None, tuned, tokenizer, PROMPTS[:2])
    ref = diagnose(base, copy.deepcopy(tuned).merge_and_unload(), tokenizer, PROMPTS[:2])
    want = [b.weight_change for b in ref.blocks]
    assert [b.weight_change for b in d.blocks] == pytest.approx(want, rel=1e-5) and max(want) > 0


def test_linear_cka_invariances():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, 3.0 * x @ q + 5.0) == pytest.approx(1.0, abs=1e-9)  # rotation, scale, shift
    assert linear_cka(x, torch.randn(200, 16, generator=g)) < 0.3


def test_suggest_rules():
    text, recipe = suggest([0.2, 0.3, 0.25], [0.9, 0.8, 0.7], block_prefix="model.layers")
    assert recipe == {"freeze": {"patterns": [r"model\.layers\.1\."]}} and "block 1" in text
    text, recipe = suggest([0.0, 0.001, 0.2, 0.1, 0.05], [1.0, 0.999, 0.9, 0.8, 0.8])
    assert int(recipe["freeze"]["fraction"] * 5) == 2 and "Blocks 0-1 of 5" in text
    assert suggest([0.0, 0.0], [1.0, 1.0])[1] is None
    with pytest.raises(ValueError, match="low"):
        suggest([0.1, 0.2], [1.0, 0.9], low=1.0)
    assert all(int(freeze_fraction(k, n) * n) == k for n in (3, 7, 24, 30, 100) for k in range(1, n))


def test_outputs(base, tokenizer, tmp_path):
    tuned = copy.deepcopy(base)
    _perturb_block(tuned, 3)
    d = diagnose(base, tuned, tokenizer, PROMPTS[:3])
    json.dumps(d.to_dict())
    console = Console(record=True, width=140)
    console.print(d.render_table())
    assert "1 - CKA" in console.export_text()
    png = d.plot(tmp_path / "plots" / "diagnose.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in png.parent.iterdir()] == ["diagnose.png"]
