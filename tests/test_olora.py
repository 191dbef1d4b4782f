"""O-LoRA: the orthogonality maths, PEFT named adapters stacked over tasks, and the collapse guard."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import make_tiny_llama
from pydantic import ValidationError

from tether.methods._lora_family import lora_layers
from tether.methods.base import Batch, Context
from tether.methods.olora import (
    OLoRA,
    OLoRACollapse,
    OLoRAConfig,
    delta_norm_sq,
    orthogonality_loss,
    subspace_overlap,
)
from tether.registry import METHODS

VOCAB = 128


def batch(seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (4, 12), generator=g)
    return Batch(input_ids=ids, labels=ids)


def train(model, method, ctx, steps: int, seed: int = 0, lr: float = 1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.1)
    model.train()
    for step in range(steps):
        b = batch(seed + step)
        out = model(**b.forward_inputs(), labels=b.labels)
        loss = out.loss + sum(method.extra_loss(model, b, out, ctx).values())
        loss.backward()
        method.before_optimizer_step(model, ctx)
        opt.step()
        opt.zero_grad()


def snapshot(model, adapter: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".{adapter}." in n}


def test_orthogonality_loss_on_toy_matrices():
    e = torch.eye(6)
    A_old, A_new = e[:2], e[2:5]
    assert orthogonality_loss(A_old, A_new) == 0 and subspace_overlap(A_old, A_new) == 0
    A_mix = torch.stack([e[0] + e[3], e[4]])
    assert orthogonality_loss(A_old, A_mix) == pytest.approx(1.0)  # |<e0, e0 + e3>| = 1
    assert orthogonality_loss(A_old, -3 * A_old) == pytest.approx(6.0)
    assert subspace_overlap(A_old, 5 * A_old) == pytest.approx(subspace_overlap(A_old, A_old))  # scale-free
    B, A = torch.randn(7, 3), torch.randn(3, 5)
    assert delta_norm_sq(B, A) == pytest.approx(float((B @ A).pow(2).sum()), rel=1e-5)


def test_config_validation_names_the_recipe_key():
    with pytest.raises(ValidationError, match="olora.lambda1 must be >= 0"):
        OLoRAConfig(lambda1=-1)
    with pytest.raises(ValidationError, match="olora.r must be > 0"):
        OLoRAConfig(r=0)
    with pytest.raises(ValidationError):
        OLoRAConfig(lamda1=0.1)
    assert METHODS.get("olora") is OLoRA
    with pytest.raises(ValueError, match="'nope' matched no module"):
        OLoRA({"target_modules": ["q_proj", "nope"]}).prepare_model(make_tiny_llama(VOCAB, hidden=16),
                                                                     Context())


def test_two_tasks_old_adapter_frozen_active_and_bit_identical():
    method = OLoRA({"r": 4, "alpha": 8, "lambda1": 0.5, "lambda2": 0.01, "collapse_warmup_steps": 100})
    ctx0 = Context(task_index=0)
    model = method.prepare_model(make_tiny_llama(VOCAB, hidden=16), ctx0)
    method.on_task_start(model, ctx0)
    assert method.extra_loss(model, batch(), None, ctx0).keys() == {"l2"}  # no orthogonality term on task 0
    train(model, method, ctx0, steps=3)
    method.on_task_end(model, ctx0)
    old = snapshot(model, "task0")

    ctx1 = Context(task_index=1)
    model = method.prepare_model(model, ctx1)
    method.on_task_start(model, ctx1)  # idempotent: still two adapters
    assert list(model.peft_config) == ["task0", "task1"] and method.adapters_ == ["task0", "task1"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".task1." in n for n in trainable)
    assert all(".task0." not in n for n in trainable)
    for layer in lora_layers(model).values():
        assert list(layer.active_adapters) == ["task0", "task1"]

    # only the new adapter receives gradient from the task loss and from the orthogonality term
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B["task1"].weight, std=0.05)
    b = batch()
    out = model(**b.forward_inputs(), labels=b.labels)
    terms = method.extra_loss(model, b, out, ctx1)
    assert terms["orth"] > 0
    (out.loss + sum(terms.values())).backward()
    for n, p in model.named_parameters():
        if ".task1." in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    model.zero_grad(set_to_none=True)

    train(model, method, ctx1, steps=4, seed=10)
    method.on_task_end(model, ctx1)
    assert all(torch.equal(p, snapshot(model, "task0")[n]) for n, p in old.items())
    assert {"overlap", "delta_norm", "norm_ratio", "collapsed"} <= method.metrics().keys()
    assert [h["task"] for h in method.history_] == [0.0, 1.0]


def test_forward_is_base_plus_every_adapter_delta():
    base = make_tiny_llama(VOCAB, hidden=16)
    reference = make_tiny_llama(VOCAB, hidden=16)  # same seed, same weights
    method = OLoRA({"r": 2, "alpha": 4})
    model = method.prepare_model(base, Context(task_index=0))
    method.on_task_start(model, Context(task_index=1))
    merged = dict(reference.named_parameters())
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            delta = 0
            for a in ("task0", "task1"):
                torch.nn.init.normal_(layer.lora_B[a].weight, std=0.3)
                delta = delta + layer.scaling[a] * layer.lora_B[a].weight @ layer.lora_A[a].weight
            merged[name.split("base_model.model.", 1)[1] + ".weight"].add_(delta)
    ids = batch().input_ids
    with torch.no_grad():
        got = model(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
        want = reference(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)  # the adapters do contribute


def test_collapse_guard_warns_or_stops(caplog):
    method = OLoRA({"r": 2, "alpha": 4, "collapse_warmup_steps": 1, "min_norm_ratio": 0.05})
    ctx0, ctx1 = Context(task_index=0), Context(task_index=1)
    model = method.prepare_model(make_tiny_llama(VOCAB, hidden=16), ctx0)
    train(model, method, ctx0, steps=3)
    method.on_task_end(model, ctx0)
    assert method.ref_norm_ and method.ref_norm_ > 0
    model = method.prepare_model(model, ctx1)
    method.on_task_start(model, ctx1)
    train(model, method, ctx1, steps=2)
    assert method.metrics()["collapsed"] == 0.0
    with torch.no_grad():  # the degenerate solution: the new adapter shrinks to nothing
        for layer in lora_layers(model).values():
            layer.lora_A["task1"].weight.zero_()
            layer.lora_B["task1"].weight.zero_()
    with caplog.at_level(logging.WARNING, logger="tether.methods.olora"):
        method.before_optimizer_step(model, ctx1)
    assert method.metrics()["collapsed"] == 1.0 and "collapsing" in caplog.text
    stopper = OLoRA({**method.config.model_dump(), "on_collapse": "stop"})
    stopper.load_state_dict(method.state_dict())
    with pytest.raises(OLoRACollapse, match="min_norm_ratio"):
        stopper.before_optimizer_step(model, ctx1)


def test_state_dict_round_trip():
    method = OLoRA()
    model = method.prepare_model(make_tiny_llama(VOCAB, hidden=16), Context())
    method.before_optimizer_step(model, Context())
    other = OLoRA()
    other.load_state_dict(method.state_dict())
    assert other.state_dict() == method.state_dict()
