"""EWC: the Fisher is the mean of per-example squared gradients, the penalty and its gradient are
right, gradient accumulation does not change it, and online consolidation keeps memory flat."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama
from pydantic import ValidationError

from tether.data.formats import Example
from tether.methods.base import Batch, Context
from tether.methods.ewc import EWC, EWCConfig, empirical_fisher, ewc_penalty

VOCAB = 96
NO_IDS = torch.zeros((1, 1), dtype=torch.long)
BATCH = Batch(input_ids=NO_IDS, labels=NO_IDS)  # EWC's penalty reads no batch


def toy_examples(n: int, seed: int = 0, length: int | None = None) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length_i = length or 6 + i % 5
        ids = torch.randint(3, VOCAB, (length_i,), generator=g).tolist()
        out.append(Example(ids, [-100] * 2 + ids[2:], "", ""))
    return out


@pytest.fixture
def toy():
    return make_tiny_llama(VOCAB, hidden=16).train()


def reference_fisher(model, examples):
    """The definition, spelled out: backward per example, square, average."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    model.eval()
    for ex in examples:
        model.zero_grad()
        ids, labels = torch.tensor([ex.input_ids]), torch.tensor([ex.labels])
        model(input_ids=ids, labels=labels).loss.backward()
        for n, p in params.items():
            acc[n] += p.grad**2 / len(examples)
    model.zero_grad()
    return acc


def test_fisher_matches_per_example_reference(toy):
    exs = toy_examples(6)
    toy.model.embed_tokens.weight.requires_grad_(False)  # only trainable parameters get a Fisher
    fisher = empirical_fisher(toy, exs)
    assert toy.training, "train mode restored"
    assert all(p.grad is None for p in toy.parameters()), ".grad buffers untouched"
    ref = reference_fisher(toy, exs)
    assert fisher.keys() == ref.keys() and "model.embed_tokens.weight" not in fisher
    for n in ref:
        torch.testing.assert_close(fisher[n], ref[n], rtol=1e-4, atol=1e-10)
    # not the square of the batch gradient: (mean g)^2 <= mean g^2, strictly here
    params = [p for p in toy.parameters() if p.requires_grad]
    toy.zero_grad()
    for ex in exs:
        out = toy(input_ids=torch.tensor([ex.input_ids]), labels=torch.tensor([ex.labels]))
        (out.loss / len(exs)).backward()
    batch_sq = sum((p.grad**2).sum() for p in params)
    assert batch_sq < 0.9 * sum(f.sum() for f in fisher.values())


def test_fisher_skips_examples_without_targets(toy):
    exs = toy_examples(3)
    empty = Example([5, 6, 7], [-100, -100, -100], "", "")
    a, b = empirical_fisher(toy, exs), empirical_fisher(toy, exs + [empty])
    assert all(torch.equal(a[n], b[n]) for n in a)
    with pytest.raises(ValueError, match="target token"):
        empirical_fisher(toy, [empty])


def test_penalty_value_gradient_and_zero_at_anchor():
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(5, 3, generator=g).requires_grad_(), torch.randn(7, generator=g).requires_grad_()]
    anchors = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    fisher = [torch.rand(5, 3, generator=g), torch.rand(7, generator=g)]
    lam = 3.0
    pen = ewc_penalty(params, anchors, fisher, lam)
    expected = lam / 2 * sum((f * (p - a) ** 2).sum() for p, a, f in zip(params, anchors, fisher))
    torch.testing.assert_close(pen, expected)
    pen.backward()
    for p, a, f in zip(params, anchors, fisher):
        torch.testing.assert_close(p.grad, lam * f * (p.detach() - a))
    at_anchor = [a.clone().requires_grad_(True) for a in anchors]
    zero = ewc_penalty(at_anchor, anchors, fisher, lam)
    zero.backward()
    assert zero.item() == 0.0 and all(torch.count_nonzero(p.grad) == 0 for p in at_anchor)


def _reference_penalty(ewc, model, lam):
    params = dict(model.named_parameters())
    return lam / 2 * sum((ewc.fisher_[n].double() * (params[n].double() - ewc.anchor_[n].double()) ** 2).sum()
                         for n in ewc.fisher_)


def _nudge(model, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def test_packed_penalty_per_dtype_group_matches_the_formula(toy):
    """extra_loss packs the anchor and Fisher into one flat buffer per (device, dtype); with the
    weights in two dtypes it still gives the per-tensor formula's value and gradient."""
    ewc = EWC({"lambda": 7.0, "fisher_samples": 4})
    ewc.on_task_start(toy, _ctx(toy_examples(6, seed=2)))
    toy.model.layers[1].to(torch.float64)  # a second dtype group (same Parameter objects)
    _nudge(toy, 3)
    toy.zero_grad()
    pen = ewc.extra_loss(toy, BATCH, None, _ctx())["ewc"]
    assert len(ewc._packed[1]) == 2
    pen.backward()
    # a float32 dot of ~6k positive terms: one accumulated in plain order errs by ~1e-5 (float64 reference)
    torch.testing.assert_close(pen.double(), _reference_penalty(ewc, toy, 7.0), rtol=1e-4, atol=0)
    for n, p in toy.named_parameters():
        want = 7.0 * ewc.fisher_[n].double() * (p.detach().double() - ewc.anchor_[n].double())
        torch.testing.assert_close(p.grad.double(), want, rtol=1e-5, atol=1e-12)


def test_packed_buffers_follow_consolidation_and_save(toy, tmp_path):
    """Online consolidation updates the anchor and Fisher in place through the dicts' views, so the
    next penalty sees them; saving works although those views share one buffer's storage."""
    ewc = EWC({"lambda": 7.0, "fisher_samples": 4})
    ewc.on_task_start(toy, _ctx(toy_examples(6, seed=2)))
    _nudge(toy, 3)
    assert ewc.extra_loss(toy, BATCH, None, _ctx())["ewc"].item() > 0  # packs
    ewc.on_task_end(toy, _ctx(task=toy_examples(4, seed=4)))  # anchor <- weights, F <- F + F_task
    assert ewc.extra_loss(toy, BATCH, None, _ctx())["ewc"].item() == 0.0
    _nudge(toy, 5, 0.01)
    pen = ewc.extra_loss(toy, BATCH, None, _ctx())["ewc"]
    torch.testing.assert_close(pen.double(), _reference_penalty(ewc, toy, 7.0), rtol=1e-4, atol=0)  # as above
    ewc.save(tmp_path)
    other = EWC()
    other.load(tmp_path)
    assert all(torch.equal(other.fisher_[n], ewc.fisher_[n]) for n in ewc.fisher_)
    assert all(torch.equal(other.anchor_[n], ewc.anchor_[n]) for n in ewc.anchor_)


def _ctx(general=(), task=(), **kw):
    return Context(general_examples=list(general), task_examples=list(task), **kw)


def test_extra_loss_zero_at_anchor_then_positive(toy):
    ewc = EWC({"lambda": 10.0, "fisher_samples": 4})
    ctx = _ctx(toy_examples(8, seed=1))
    assert ewc.extra_loss(toy, BATCH, None, ctx) == {}
    ewc.on_task_start(toy, ctx)
    assert ewc.extra_loss(toy, BATCH, None, ctx)["ewc"].item() == 0.0
    with torch.no_grad():
        for p in toy.parameters():
            p.add_(0.01)
    assert ewc.extra_loss(toy, BATCH, None, ctx)["ewc"].item() > 0
    before = {n: t.clone() for n, t in ewc.fisher_.items()}
    ewc.on_task_start(toy, ctx)  # a Fisher exists: not re-estimated, anchor kept
    assert all(torch.equal(before[n], ewc.fisher_[n]) for n in before)


def test_gradient_accumulation_matches_one_big_batch(toy):
    """Trainer contract: total loss / grad_accum_steps per micro-batch; penalty returned undivided."""
    exs = toy_examples(4, seed=5, length=7)  # equal target counts: the big batch's mean is the mean of means
    ewc = EWC({"lambda": 50.0, "fisher_samples": 4})
    ewc.on_task_start(toy, _ctx(toy_examples(6, seed=2)))
    with torch.no_grad():
        for p in toy.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    params = [p for p in toy.parameters()]

    def grads(accum: int):
        toy.zero_grad()
        ids = torch.tensor([e.input_ids for e in exs])
        labels = torch.tensor([e.labels for e in exs])
        for chunk in range(accum):
            sl = slice(chunk * len(exs) // accum, (chunk + 1) * len(exs) // accum)
            out = toy(input_ids=ids[sl], labels=labels[sl])
            loss = out.loss + sum(ewc.extra_loss(toy, BATCH, out, _ctx(grad_accum_steps=accum)).values())
            (loss / accum).backward()
        return [p.grad.clone() for p in params]

    toy.eval()
    for a, b in zip(grads(1), grads(4)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)  # gradients up to ~0.4, summed in other orders


def test_online_consolidation_constant_memory(toy):
    ewc = EWC({"gamma": 0.5, "fisher_samples": 3})
    general, task = toy_examples(5, seed=3), toy_examples(5, seed=4)
    ewc.on_task_start(toy, _ctx(general, task))
    mem = ewc.metrics()["ewc_memory_mb"]
    ptrs = {n: t.data_ptr() for n, t in ewc.fisher_.items()}
    for i in range(3):
        with torch.no_grad():
            for p in toy.parameters():
                p.add_(0.01)
        old = {n: t.clone() for n, t in ewc.fisher_.items()}
        ctx = _ctx(general, task, task_index=i)
        ewc.on_task_end(toy, ctx)
        new = ewc._estimate(toy, task, ctx.seed + i + 1)
        for n in old:
            torch.testing.assert_close(ewc.fisher_[n], 0.5 * old[n] + new[n])
            assert torch.equal(ewc.anchor_[n], dict(toy.named_parameters())[n].detach())
        assert ewc.metrics()["ewc_memory_mb"] == mem
        assert {n: t.data_ptr() for n, t in ewc.fisher_.items()} == ptrs
    assert ewc.tasks_consolidated_ == 3
    assert ewc.extra_loss(toy, BATCH, None, ctx)["ewc"].item() == 0.0


def test_no_general_data_starts_at_first_consolidation(toy):
    ewc = EWC({"fisher_samples": 2})
    ewc.on_task_start(toy, _ctx())
    assert ewc.extra_loss(toy, BATCH, None, _ctx()) == {}
    ewc.on_task_end(toy, _ctx(task=toy_examples(3)))
    assert "ewc" in ewc.extra_loss(toy, BATCH, None, _ctx())


def test_fisher_covers_only_the_lora_adapter(toy):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(toy, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    ewc = EWC({"fisher_samples": 2})
    ewc.on_task_start(model, _ctx(toy_examples(2)))
    assert ewc.fisher_ and all(".lora_" in n for n in ewc.fisher_)
    assert ewc.metrics()["ewc_memory_mb"] < 0.01


def test_save_load_and_state_dict(toy, tmp_path):
    ewc = EWC({"fisher_samples": 2})
    ewc.on_task_start(toy, _ctx(toy_examples(3)))
    path = ewc.save(tmp_path)
    assert path.name == "ewc_fisher.safetensors"
    other = EWC()
    other.load(tmp_path)
    for a, b in ((ewc.fisher_, other.fisher_), (ewc.anchor_, other.anchor_)):
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    again = EWC()
    again.load_state_dict(ewc.state_dict())
    assert again.fisher_.keys() == ewc.fisher_.keys()


def test_config_alias_and_errors():
    assert EWCConfig.model_validate({"lambda": 5}).lambda_ == 5
    assert EWCConfig(lambda_=7).model_dump(by_alias=True)["lambda"] == 7
    with pytest.raises(ValidationError, match="ewc.lambda must be >= 0"):
        EWCConfig.model_validate({"lambda": -1})
    with pytest.raises(ValidationError, match="ewc.fisher_samples must be > 0"):
        EWCConfig(fisher_samples=0)
    with pytest.raises(ValidationError, match="ewc.gamma"):
        EWCConfig(gamma=1.5)
