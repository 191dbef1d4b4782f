"""Freeze: the bottom blocks (plain or PEFT-wrapped) stay bit-identical through optimizer steps,
patterns that match nothing fail, and the log says what was frozen."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama
from pydantic import ValidationError

from tether.methods.base import Context
from tether.methods.freeze import Freeze, FreezeConfig, find_blocks

VOCAB = 64


def train_steps(model, steps: int = 3) -> None:
    # every parameter handed to AdamW, weight decay on: frozen tensors must still not move
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(3, VOCAB, (2, 8), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def snapshot(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_bottom_blocks_bit_identical_after_training(caplog):
    model = make_tiny_llama(VOCAB, hidden=16, layers=4).train()
    before = snapshot(model)
    with caplog.at_level("INFO"):
        Freeze({"fraction": 0.5}).prepare_model(model, Context())
    assert "blocks 0-1 of 4 (model.layers)" in caplog.text
    train_steps(model)
    for n, p in model.named_parameters():
        frozen = n.startswith(("model.layers.0.", "model.layers.1."))
        assert p.requires_grad is not frozen
        assert torch.equal(p, before[n]) is frozen, n


def test_fraction_rounds_down_and_finds_blocks_in_peft_models():
    from peft import LoraConfig, get_peft_model

    model = make_tiny_llama(VOCAB, hidden=16, layers=3)
    assert find_blocks(model)[0] == "model.layers"
    cfg = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    prefix, blocks = find_blocks(peft_model)
    assert prefix == "base_model.model.model.layers" and len(blocks) == 3
    method = Freeze({"fraction": 0.5})  # floor(1.5) = 1 block
    method.prepare_model(peft_model, Context())
    lora = {n: p.requires_grad for n, p in peft_model.named_parameters() if "lora_" in n}
    assert lora and all(not t for n, t in lora.items() if ".layers.0." in n)
    assert all(t for n, t in lora.items() if ".layers.0." not in n)
    before = snapshot(peft_model)
    train_steps(peft_model.train())
    after = dict(peft_model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in before.items() if ".layers.0." in n)
    assert any(not torch.equal(after[n], v) for n, v in before.items() if ".layers.1." in n and "lora_B" in n)
    assert method.metrics()["frozen_tensors"] == len(method.frozen_)
    fresh = Freeze()
    fresh.load_state_dict(method.state_dict())
    assert fresh.frozen_ == method.frozen_


def test_patterns_and_embeddings():
    model = make_tiny_llama(VOCAB, hidden=16)
    method = Freeze({"fraction": 0.0, "patterns": [r"mlp\.down_proj"], "freeze_embeddings": True})
    method.prepare_model(model, Context())
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight",
                      "model.layers.1.mlp.down_proj.weight"}
    assert not model.lm_head.weight.requires_grad  # tied to the embeddings


def test_pattern_matching_nothing_names_the_pattern():
    model = make_tiny_llama(VOCAB, hidden=16)
    with pytest.raises(ValueError, match=r"freeze.patterns: 'attn\\\\.qproj' matched no parameter"):
        Freeze({"patterns": ["mlp", r"attn\.qproj"]}).prepare_model(model, Context())


def test_freezing_everything_fails():
    model = make_tiny_llama(VOCAB, hidden=16)
    with pytest.raises(ValueError, match="nothing left to train"):
        Freeze({"patterns": ["."]}).prepare_model(model, Context())


def test_config_errors():
    with pytest.raises(ValidationError, match=r"freeze.fraction must be in \[0, 1\)"):
        FreezeConfig(fraction=1.0)
    with pytest.raises(ValidationError, match="not a regular expression"):
        FreezeConfig(patterns=["("])
