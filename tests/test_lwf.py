"""LwF: the KL is zero for a student equal to its teacher and positive otherwise, only the student
gets a gradient, and the adapter-disabled teacher is the base model without touching its weights."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from conftest import make_tiny_llama
from pydantic import ValidationError

from tether.data.formats import Example
from tether.methods._distill import lwf_kl, nontarget_kl, untrained_positions
from tether.methods.base import Batch, Context, eval_mode
from tether.methods.lwf import LwF, LwFConfig
from tether.models import adapter_layers, adapters_off
from tether.training.teacher import make_reference

VOCAB = 80


def lora_model(seed: int = 0):
    from peft import LoraConfig, get_peft_model

    base = make_tiny_llama(VOCAB, hidden=16, seed=seed)
    snapshot = copy.deepcopy(base)
    cfg = LoraConfig(r=2, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"],
                     task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    set_b(model)  # B starts at 0; give the adapter something to say
    return model.train(), snapshot


def set_b(model, std: float = 0.5) -> None:
    """Draw every LoRA B from N(0, std) (std 0: zeros, the adapter says nothing)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, std) if std else p.zero_()


def batch(b: int = 2, length: int = 7, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[0, -2:] = 0
    ids[mask == 0] = 0
    return Batch(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


class Spy:
    """A `Reference` that notes the shape of every batch it is asked about, then asks ``ref``."""

    def __init__(self, ref):
        self.ref, self.seen = ref, []

    @property
    def skipped_blocks(self) -> int:
        return self.ref.skipped_blocks

    def __call__(self, model, batch, student_ran=False):
        self.seen.append(tuple(batch.input_ids.shape))
        return self.ref(model, batch, student_ran=student_ran)


def test_kl_zero_for_equal_positive_otherwise_and_masked():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 5, 11, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert lwf_kl(t.clone(), t, mask, 2.0).item() == pytest.approx(0.0, abs=1e-7)
    s = torch.randn(2, 5, 11, generator=g)
    value = lwf_kl(s, t, mask, 2.0)
    assert value.item() > 0
    s2 = s.clone()
    s2[0, 3:] += 5.0  # padding positions do not count
    assert lwf_kl(s2, t, mask, 2.0).item() == pytest.approx(value.item())
    # the formula: T^2 * mean over unmasked positions of sum_v p_t (log p_t - log p_s)
    p_t, log_s = torch.softmax(t / 2, -1), torch.log_softmax(s / 2, -1)
    kl = (p_t * (torch.log(p_t) - log_s)).sum(-1)
    assert value.item() == pytest.approx(4 * kl[mask.bool()].mean().item(), rel=1e-5)


def test_fused_kl_matches_autograd_reference_value_and_gradient():
    """The chunked kernel (chunk smaller than the row count) against plain autograd on log-softmaxes."""
    g = torch.Generator().manual_seed(1)
    t = torch.randn(3, 6, 13, generator=g) * 3
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]])
    s = (torch.randn(3, 6, 13, generator=g) * 3).requires_grad_(True)
    s_ref = s.detach().clone().requires_grad_(True)
    value = lwf_kl(s, t, mask, 1.7, chunk=4)
    (value * 3.0).backward()
    log_q, log_p = torch.log_softmax(s_ref / 1.7, -1), torch.log_softmax(t / 1.7, -1)
    kl = torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    m = mask.float()
    ref = 1.7**2 * (kl * m).sum() / m.sum()
    (ref * 3.0).backward()
    assert value.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(s.grad, s_ref.grad, atol=1e-6)
    assert s.grad[mask == 0].abs().max() == 0  # padding gets no gradient


def test_masking_by_weight_matches_gathering_the_rows():
    """The GPU's way (every row computed, masked rows weigh 0: no host sync to find them) gives the
    CPU's (only the unmasked rows gathered), value and gradient; an all-masked batch gives 0."""
    g = torch.Generator().manual_seed(2)
    t = torch.randn(3, 6, 13, generator=g) * 3
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    results = []
    for gather in (True, False):
        s = (torch.randn(3, 6, 13, generator=torch.Generator().manual_seed(3)) * 3).requires_grad_(True)
        value = lwf_kl(s, t, mask, 1.3, chunk=5, gather=gather)
        value.backward()
        results.append((value.detach(), s.grad))
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])
    s = torch.randn(3, 6, 13, requires_grad=True)
    none = lwf_kl(s, t, torch.zeros_like(mask), 1.3, gather=False)
    none.backward()
    assert none.item() == 0.0 and s.grad.abs().max() == 0


def test_gradient_flows_only_into_the_student():
    s = torch.randn(1, 4, 9, requires_grad=True)
    t = torch.randn(1, 4, 9, requires_grad=True)
    lwf_kl(s, t, None, 1.5).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_adapter_disabled_teacher_is_the_base_model_and_touches_nothing():
    model, base = lora_model()
    ref = make_reference(model)
    b = batch()
    inputs = b.forward_inputs()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {n: m.training for n, m in model.named_modules()}
    teacher = ref(model, b)
    assert not teacher.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(teacher, base.eval()(**inputs).logits)
        student = model.eval()(**inputs).logits
        assert not torch.allclose(student, teacher, atol=1e-3), "the adapter is active again"
    model.train()
    assert {n: m.training for n, m in model.named_modules()} == modes
    after = model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    assert all(p.grad is None for p in model.parameters())


def test_fast_teacher_switch_matches_peft_and_restores_what_it_found():
    """`adapters_off` flips only the flags the adapter layers' forward reads: same logits as PEFT's
    `disable_adapter()`, and afterwards every flag, mode and requires_grad is as it was (PEFT's own
    context re-enables a layer that was off and makes a frozen adapter weight trainable; the fallback
    through it puts requires_grad back)."""
    model, base = lora_model()
    b = batch()
    inputs = b.forward_inputs()
    layers = adapter_layers(model)
    assert layers and len(layers) == 3 * 2  # q, v, down in each of the 2 blocks
    frozen = next(p for n, p in model.named_parameters() if "lora_A" in n)
    frozen.requires_grad_(False)
    layers[0]._disable_adapters = True  # one layer already off: stays off
    model.base_model.model.model.layers[1].eval()  # mixed modes: each comes back as it was
    modes = {n: m.training for n, m in model.named_modules()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    modules = list(model.modules())
    with torch.no_grad():
        with eval_mode(modules), adapters_off(model, layers):
            fast = model(**inputs).logits
            assert not any(m.training for m in model.modules())
        with pytest.warns(UserWarning, match="others that are disabled"), eval_mode(modules), adapters_off(model, None):
            slow = model(**inputs).logits  # PEFT's context manager
    torch.testing.assert_close(fast, slow, rtol=0, atol=0)
    torch.testing.assert_close(fast, base.eval()(**inputs).logits)
    assert not frozen.requires_grad  # PEFT's context re-enabled it; the fallback put it back
    assert not layers[0]._disable_adapters  # what PEFT's context left: it re-enables every layer
    layers[0]._disable_adapters = True
    model.base_model.model.model.layers[1].eval()
    with torch.no_grad(), eval_mode(modules), adapters_off(model, layers):
        pass
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert [m._disable_adapters for m in layers] == [True] + [False] * 5


def test_frozen_copy_reference_for_a_plain_model():
    model = make_tiny_llama(VOCAB, hidden=16).train()
    ref = make_reference(model)
    b = batch()
    before = ref(model, b)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)
    torch.testing.assert_close(ref(model, b), before)
    explicit = make_reference(model, frozen_copy=make_tiny_llama(VOCAB, hidden=16))
    torch.testing.assert_close(explicit(None, b), before)


def _ctx(model, general=(), **kw):
    return Context(reference=make_reference(model), general_examples=list(general), **kw)


def test_extra_loss_student_equals_teacher_then_learns():
    model, _ = lora_model()
    set_b(model, 0.0)
    lwf = LwF({"alpha": 0.5})
    b = batch()
    ctx = _ctx(model)
    assert lwf.extra_loss(model, b, model(**b.forward_inputs()), ctx)["lwf"].item() == pytest.approx(0.0, abs=1e-7)
    set_b(model)
    term = lwf.extra_loss(model, b, None, ctx)["lwf"]  # no outputs: the method runs the forward itself
    assert term.item() > 0
    term.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_" in n)
    assert all(g is None for n, g in grads.items() if "lora_" not in n)


def test_task_plus_general_is_deterministic():
    model, _ = lora_model()
    general = [Example(list(range(3 + i, 9 + i)), list(range(3 + i, 9 + i)), "", "") for i in range(5)]
    ctx = _ctx(model, general, seed=3)
    a, b = (LwF({"on": "task+general", "general_batch_size": 2}) for _ in range(2))
    for _ in range(3):
        ga, gb = a.general_batch(ctx), b.general_batch(ctx)
        assert torch.equal(ga.input_ids, gb.input_ids) and ga.input_ids.shape[0] == 2
    terms = LwF({"on": "task+general"}).extra_loss(model, batch(), None, ctx)
    assert set(terms) == {"lwf", "lwf_general"}
    assert all(math.isfinite(v.item()) and v.item() > 0 for v in terms.values())
    state = a.state_dict()
    c = LwF({"on": "task+general", "general_batch_size": 2})
    c.load_state_dict(state)
    assert torch.equal(c.general_batch(ctx).input_ids, a.general_batch(ctx).input_ids)
    with pytest.raises(ValueError, match="no general data"):
        LwF({"on": "task+general"}).extra_loss(model, batch(), None, _ctx(model))


def test_general_only_skips_the_task_batch_and_matches_task_plus_general():
    """``on: general`` distils on the general mini-batch alone: the task batch is never sent to the
    teacher (the task's answers are learnt freely), and its term equals task+general's general term."""
    model, _ = lora_model()
    model.eval()  # no dropout: the two calls below must see the same student
    set_b(model)
    general = [Example(list(range(3 + i, 9 + i)), list(range(3 + i, 9 + i)), "", "") for i in range(5)]
    spy = Spy(make_reference(model))
    ctx = Context(reference=spy, general_examples=general, seed=1)
    only = LwF({"on": "general", "general_batch_size": 2}).extra_loss(model, batch(), None, ctx)
    assert set(only) == {"lwf_general"} and spy.seen == [(2, 6)]
    both = LwF({"on": "task+general", "general_batch_size": 2}).extra_loss(model, batch(), None,
                                                                         _ctx(model, general, seed=1))
    assert only["lwf_general"].item() == pytest.approx(both["lwf_general"].item(), rel=1e-6)
    assert only["lwf_general"].item() > 0
    only["lwf_general"].backward()
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    with pytest.raises(ValueError, match="no general data"):
        LwF({"on": "general"}).extra_loss(model, batch(), None, _ctx(model))


def test_replay_distils_only_the_batch_replay_rows_reusing_the_student_logits():
    """``on: replay``: the teacher sees only the replay rows, the student's logits come from the task
    forward (no second student pass), and the term equals ``on: task`` applied to those rows alone."""
    model, _ = lora_model()
    model.eval()
    set_b(model)
    b = batch()
    n = b.input_ids.shape[0]
    flags = torch.zeros(n, dtype=torch.bool)
    flags[1] = True
    spy = Spy(make_reference(model))
    ctx = Context(reference=spy)
    outputs = model(**b.forward_inputs())
    replayed = dataclasses.replace(b, is_replay=flags)
    term = LwF({"on": "replay", "alpha": 0.5})._replay_term(model, replayed, outputs, ctx)
    assert spy.seen == [(1, b.input_ids.shape[1])]
    rows = Batch(input_ids=b.input_ids[1:2], labels=b.labels[1:2], attention_mask=b.attention_mask[1:2])
    expect = LwF({"on": "task", "alpha": 0.5}).extra_loss(model, rows, None, _ctx(model))["lwf"]
    # the student's row comes from a batched forward here and a lone one there: float32 noise on O(1)
    # log-sum-exps that cancel to a KL of ~2e-3
    assert term.item() == pytest.approx(expect.item(), rel=0, abs=1e-6) and term.item() > 0
    assert set(LwF({"on": "replay"}).extra_loss(model, replayed, outputs, ctx)) == {"lwf_replay"}
    term.backward()
    assert all(p.grad is None for name, p in model.named_parameters() if "lora_" not in name)
    unmixed = dataclasses.replace(b, is_replay=torch.zeros(n, dtype=torch.bool))
    none = LwF({"on": "replay"}).extra_loss(model, unmixed, outputs, ctx)
    assert none["lwf_replay"].item() == 0.0 and len(spy.seen) == 2  # no replay rows: no teacher pass
    with pytest.raises(ValueError, match="add the replay method"):
        LwF({"on": "replay"}).extra_loss(model, b, outputs, ctx)


def test_untrained_positions_leave_task_answers_free_and_keep_replay_rows_whole():
    ids = torch.arange(3, 3 + 12).reshape(2, 6)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    labels = torch.full((2, 6), -100)
    labels[0, 3:5] = ids[0, 3:5]  # row 0: prompt 0..2, answer 3..4, then padding
    labels[1, 4:] = ids[1, 4:]
    got = untrained_positions(ids, mask, labels)
    # logits at t predict t+1: positions 2 and 3 of row 0 predict the answer, 5 is padding
    assert got.tolist() == [[True, True, False, False, True, False], [True, True, True, False, False, True]]
    replay = untrained_positions(ids, mask, labels, torch.tensor([False, True]))
    assert replay[1].all() and replay[0].tolist() == got[0].tolist()
    assert untrained_positions(ids, mask, None).tolist() == mask.bool().tolist()


def test_inputs_distils_every_untrained_position_reusing_the_student_logits():
    """``on: inputs``: one teacher pass over the whole batch, the student's logits from the task
    forward, and the term equals the KL over exactly the untrained positions; grads only in LoRA."""
    model, _ = lora_model()
    model.eval()
    b = batch()
    b.labels[:, :4] = -100  # prompt 0..3, answer 4.. (row 0 pads its last two)
    flags = torch.tensor([False, True])
    ref = make_reference(model)
    spy = Spy(ref)
    ctx = Context(reference=spy)
    outputs = model(**b.forward_inputs())
    term = LwF({"on": "inputs", "alpha": 0.5}).extra_loss(model, dataclasses.replace(b, is_replay=flags), outputs, ctx)
    assert set(term) == {"lwf_inputs"} and spy.seen == [tuple(b.input_ids.shape)]
    positions = untrained_positions(b.input_ids, b.attention_mask, b.labels, flags)
    # row 0: 3 predicts the answer token 4; 4 (last real token) predicts nothing trained; 5, 6 pad
    assert positions[0].tolist() == [True, True, True, False, True, False, False] and positions[1].all()
    expect = 0.5 * lwf_kl(outputs.logits, ref(model, b), positions, 2.0)
    assert term["lwf_inputs"].item() == pytest.approx(expect.item(), rel=1e-6) and expect.item() > 0
    term["lwf_inputs"].backward()
    assert all(p.grad is None for name, p in model.named_parameters() if "lora_" not in name)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for name, p in model.named_parameters()
               if "lora_" in name)
    # without replay the task rows' prompts are still distilled
    plain = LwF({"on": "inputs"}).extra_loss(model, b, model(**b.forward_inputs()), _ctx(model))
    assert plain["lwf_inputs"].item() > 0


def test_inputs_plus_general_sums_the_inputs_term_and_a_general_term_at_its_own_alpha():
    """``on: inputs+general``: the ``inputs`` term over the batch (student logits reused) plus the general
    mini-batch's term, which equals ``on: general``'s scaled by ``general_alpha`` over ``alpha``."""
    model, _ = lora_model()
    model.eval()
    set_b(model)
    b = batch()
    b.labels[:, :4] = -100
    general = [Example(list(range(3 + i, 9 + i)), list(range(3 + i, 9 + i)), "", "") for i in range(5)]
    outputs = model(**b.forward_inputs())
    cfg = {"alpha": 0.5, "general_batch_size": 2}
    both = LwF({**cfg, "on": "inputs+general", "general_alpha": 2.0}).extra_loss(
        model, b, outputs, _ctx(model, general, seed=1))
    inputs = LwF({**cfg, "on": "inputs"}).extra_loss(model, b, outputs, _ctx(model, general, seed=1))
    gen = LwF({**cfg, "on": "general"}).extra_loss(model, b, None, _ctx(model, general, seed=1))
    assert set(both) == {"lwf_inputs", "lwf_general"}
    assert both["lwf_inputs"].item() == pytest.approx(inputs["lwf_inputs"].item(), rel=1e-6)
    assert both["lwf_general"].item() == pytest.approx(gen["lwf_general"].item() * 4.0, rel=1e-5)
    assert gen["lwf_general"].item() > 0
    unset = LwF({**cfg, "on": "inputs+general"}).extra_loss(model, b, outputs, _ctx(model, general, seed=1))
    assert unset["lwf_general"].item() == pytest.approx(gen["lwf_general"].item(), rel=1e-5)  # default: alpha
    assert LwF({"on": "inputs+general"}).needs_general
    with pytest.raises(ValueError, match="no general data"):
        LwF({"on": "inputs+general"}).extra_loss(model, b, outputs, _ctx(model))
    with pytest.raises(ValidationError, match="lwf.general_alpha must be >= 0"):
        LwFConfig(on="inputs+general", general_alpha=-1)
    with pytest.raises(ValidationError, match="lwf.general_alpha weighs the general mini-batch"):
        LwFConfig(on="inputs", general_alpha=2.0)


def test_nontarget_kl_ignores_the_target_logit_and_sees_the_ranking_of_the_rest():
    """The decoupled-KD non-target term: 0 for equal logits; blind to the target logit (its value and
    gradient), so it never resists learning the answer; > 0 once the other tokens are reordered;
    equal to a hand-written KL over the renormalised non-target tokens; only target-predicting
    positions of the given rows count."""
    g = torch.Generator().manual_seed(6)
    t = torch.randn(2, 5, 9, generator=g) * 2
    labels = torch.full((2, 5), -100)
    labels[0, 3:5] = torch.tensor([4, 7])  # row 0's answer: positions 2, 3 predict it
    labels[1, 4] = 2  # row 1's: position 3
    assert nontarget_kl(t.clone(), t, labels, None, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    s = t.clone()
    s[0, 2, 4] += 9.0  # the model is far surer of the answer, nothing else changed
    s[0, 3, 7] -= 3.0
    s[1, 3, 2] += 5.0
    s[0, 0] = torch.randn(9, generator=g)  # a prompt position: not this term's business
    s.requires_grad_(True)
    value = nontarget_kl(s, t, labels, None, 2.0)
    value.backward()
    assert value.item() == pytest.approx(0.0, abs=1e-6)
    assert s.grad[0, 2, 4] == 0 and s.grad[0, 3, 7] == 0 and s.grad[1, 3, 2] == 0
    s = t.clone()
    s[0, 2, 0], s[1, 3, 5] = s[0, 2, 0] + 4.0, s[1, 3, 5] - 2.0  # other tokens reordered
    got = nontarget_kl(s, t, labels, None, 2.0)
    expect = []
    for row, pos, y in ((0, 2, 4), (0, 3, 7), (1, 3, 2)):
        keep = [v for v in range(9) if v != y]
        p_hat = torch.softmax(t[row, pos, keep] / 2.0, -1)
        q_hat = torch.softmax(s[row, pos, keep] / 2.0, -1)
        expect.append((p_hat * (p_hat.log() - q_hat.log())).sum())
    assert got.item() == pytest.approx(4.0 * torch.stack(expect).mean().item(), rel=1e-5) and got.item() > 0
    only0 = nontarget_kl(s, t, labels, torch.tensor([True, False]), 2.0)
    assert only0.item() == pytest.approx(4.0 * torch.stack(expect[:2]).mean().item(), rel=1e-5)
    assert nontarget_kl(s, t, torch.full((2, 5), -100), None, 2.0).item() == 0.0
    # the answer vocabulary left out too: token 0 (moved above) no longer counts at row 0
    exclude = torch.tensor([0, 4, 7, 2])
    got = nontarget_kl(s, t, labels, None, 2.0, exclude)
    keep = [v for v in range(9) if v not in (0, 4, 7, 2)]
    expect = []
    for row, pos in ((0, 2), (0, 3), (1, 3)):
        p_hat = torch.softmax(t[row, pos, keep] / 2.0, -1)
        q_hat = torch.softmax(s[row, pos, keep] / 2.0, -1)
        expect.append((p_hat * (p_hat.log() - q_hat.log())).sum())
    assert got.item() == pytest.approx(4.0 * torch.stack(expect).mean().item(), rel=1e-5, abs=1e-7)
    s[:, :, 0] += 7.0  # an answer-vocabulary token moved everywhere: unseen
    assert nontarget_kl(s, t, labels, None, 2.0, exclude).item() == pytest.approx(got.item(), rel=1e-5, abs=1e-7)


def test_nontarget_alpha_adds_a_term_on_the_task_answers_beside_inputs():
    model, _ = lora_model()
    model.eval()
    b = batch()
    b.labels[:, :4] = -100
    flags = torch.tensor([False, True])
    mixed = dataclasses.replace(b, is_replay=flags)
    outputs = model(**b.forward_inputs())
    ref = make_reference(model)
    lwf = LwF({"on": "inputs", "alpha": 0.5, "nontarget_alpha": 3.0})
    task = [Example([5, 6, 7, 8], [-100, -100, 7, 9], "", ""), Example([5, 6, 11], [-100, -100, 11], "", "")]
    lwf.on_task_start(model, _ctx(model, task_examples=task))
    assert lwf.answer_vocab_.tolist() == [7, 9, 11] and lwf.metrics()["nontarget_answer_vocab"] == 3.0
    got = lwf.extra_loss(model, mixed, outputs, _ctx(model))
    plain = LwF({"on": "inputs", "alpha": 0.5}).extra_loss(model, mixed, outputs, _ctx(model))
    assert set(got) == {"lwf_inputs", "lwf_nontarget"} and set(plain) == {"lwf_inputs"}
    assert got["lwf_inputs"].item() == pytest.approx(plain["lwf_inputs"].item(), rel=1e-6)
    expect = 3.0 * nontarget_kl(outputs.logits, ref(model, b), b.labels, ~flags, 2.0, torch.tensor([7, 9, 11]))
    assert got["lwf_nontarget"].item() == pytest.approx(expect.item(), rel=1e-5) and expect.item() > 0
    off = LwF({"on": "inputs"})
    off.on_task_start(model, _ctx(model, task_examples=task))
    assert off.answer_vocab_ is None and "nontarget_answer_vocab" not in off.metrics()
    # with another `on` the term costs its own teacher forward over the batch, and is the same
    spy = Spy(ref)
    replay = LwF({"on": "replay", "alpha": 0.5, "nontarget_alpha": 3.0})
    replay.on_task_start(model, _ctx(model, task_examples=task))
    other = replay.extra_loss(model, mixed, outputs, Context(reference=spy))
    assert set(other) == {"lwf_replay", "lwf_nontarget"} and len(spy.seen) == 2
    assert other["lwf_nontarget"].item() == pytest.approx(expect.item(), rel=1e-5)
    with pytest.raises(ValidationError, match="lwf.nontarget_alpha must be >= 0"):
        LwFConfig(on="inputs", nontarget_alpha=-1.0)


def test_needs_reference_and_config_errors():
    assert LwF.needs_reference
    # the run loads the replay split for LwF only when it distils a general mini-batch
    assert LwF({"on": "general"}).needs_general and LwF({"on": "task+general"}).needs_general
    assert not any(LwF({"on": on}).needs_general for on in ("task", "replay", "inputs"))
    model, _ = lora_model()
    with pytest.raises(RuntimeError, match="ctx.reference"):
        LwF().extra_loss(model, batch(), None, Context())
    with pytest.raises(ValidationError, match="lwf.temperature must be > 0"):
        LwFConfig(temperature=0)
    with pytest.raises(ValidationError, match="lwf.alpha must be >= 0"):
        LwFConfig(alpha=-1)
