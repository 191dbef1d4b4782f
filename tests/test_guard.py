"""The forgetting guard on a real Trainer: stops on a drop, restores the best weights, never fires idly."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from tether.data.collate import Collator
from tether.methods.base import Context
from tether.probes.base import ProbeResult
from tether.training.guard import ForgettingGuard, restore_trainable, trainable_state, weights_stamp
from tether.training.trainer import TetherTrainer


def result(values, name="general"):
    return ProbeResult(name=name, kind="multiple_choice", metric="acc", higher_is_better=True,
                       score=sum(values) / len(values), n=len(values), ci_low=0, ci_high=1, item_values=list(values))


def make_trainer(model, tokenizer, tmp_path, steps=12, lr=1e-2, **extra):
    torch.manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in
            ([int(x) for x in torch.randint(3, 500, (12,))] for _ in range(32))]
    args = TrainingArguments(output_dir=str(tmp_path / "ckpt"), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=lr, report_to=[], save_strategy="no", use_cpu=True, logging_steps=2,
                             disable_tqdm=True, seed=0, **extra)
    return TetherTrainer(model=model, args=args, train_dataset=data, data_collator=Collator(tokenizer.pad_token_id),
                         methods={}, context=Context())


def test_guard_stops_on_degradation_and_restores_best(tiny_model, tokenizer, tmp_path):
    base = [result([1.0] * 40)]
    snapshots = {}

    def score(model):  # fine until step 4, then the "general" accuracy collapses; task score keeps rising
        step = trainer.state.global_step
        snapshots[step] = trainable_state(model)
        good = 40 if step <= 4 else 20
        return [result([1.0] * good + [0.0] * (40 - good))], float(step)

    trainer = make_trainer(tiny_model, tokenizer, tmp_path)
    guard = ForgettingGuard(score, base, threshold=0.05, action="stop", every=2, run_dir=tmp_path)
    trainer.add_callback(guard)
    trainer.train()
    assert guard.stopped_at == 6 and trainer.state.global_step == 6  # checks at 2, 4, 6
    assert guard.restored_step == 4  # best task score within budget
    now = trainable_state(tiny_model)
    assert all(torch.equal(now[k], snapshots[4][k]) for k in now)
    assert not all(torch.equal(now[k], snapshots[6][k]) for k in now)
    events = [json.loads(line) for line in (tmp_path / "guard.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events] == [2, 4, 6] and events[-1]["breached"] == ["general"]
    assert events[-1]["action"] == "stop"
    # the last check (step 6) scored weights the restore has since overwritten: nothing may reuse it
    assert guard.last["step"] == 6 and guard.last["stamp"] != weights_stamp(tiny_model)


def test_weights_stamp_changes_on_any_write_and_only_then(tiny_model):
    """What lets the final scoring reuse the guard's last check: the stamp holds through forwards and
    reads, and changes on an optimizer step, a restore or an in-place write to a frozen weight."""
    ids = torch.tensor([[5, 6, 7, 8]])
    before = weights_stamp(tiny_model)
    with torch.no_grad():
        tiny_model(ids)
    state = trainable_state(tiny_model)
    assert weights_stamp(tiny_model) == before
    tiny_model(ids, labels=ids).loss.backward()
    torch.optim.SGD(tiny_model.parameters(), lr=1e-3).step()
    stepped = weights_stamp(tiny_model)
    assert stepped != before
    restore_trainable(tiny_model, state)
    restored = weights_stamp(tiny_model)
    assert restored != stepped
    frozen = next(iter(tiny_model.parameters())).requires_grad_(False)
    with torch.no_grad():
        frozen.mul_(1.0)  # a write that changes no value still counts: the stamp never trusts values
    assert weights_stamp(tiny_model) != restored


@pytest.mark.parametrize("action", ["warn", "adapt"])
def test_guard_warn_and_adapt_keep_training(tiny_model, tokenizer, tmp_path, action):
    base = [result([1.0] * 40)]
    trainer = make_trainer(tiny_model, tokenizer, tmp_path, steps=6)
    adapted = []
    guard = ForgettingGuard(lambda m: ([result([1.0] * 10 + [0.0] * 30)], None), base, action=action, every=2,
                            run_dir=tmp_path, on_adapt=lambda ev: adapted.append(ev["step"]) or {"replay_ratio": 0.3})
    trainer.add_callback(guard)
    lr0 = trainer.args.learning_rate
    trainer.train()
    assert trainer.state.global_step == 6 and guard.stopped_at is None
    if action == "adapt":
        assert adapted == [2, 4, 6]
        assert trainer.lr_scheduler.base_lrs[0] == pytest.approx(lr0 * 0.5 ** 3)


def test_guard_never_fires_without_a_drop(tiny_model, tokenizer, tmp_path):
    """Real probes on a model that does not change: zero drop, CI covering 0, no action."""
    from tether.probes.scorer import Scorer
    from tether.registry import PROBES

    probe = PROBES.get("perplexity")("general", [{"text": f"The number {i} follows {i - 1}."} for i in range(1, 21)])
    base = [probe.run(Scorer(tiny_model, tokenizer))]
    trainer = make_trainer(tiny_model, tokenizer, tmp_path, steps=6, lr=1e-30)
    guard = ForgettingGuard(lambda m: ([probe.run(Scorer(m, tokenizer))], None), base, every=2, run_dir=tmp_path)
    trainer.add_callback(guard)
    trainer.train()
    assert guard.stopped_at is None and len(guard.events) == 3
    assert all(not e["breached"] and e["worst_drop"] == pytest.approx(0, abs=1e-6) for e in guard.events)


def test_bf16_training_checks_and_returns_the_model_at_its_own_precision(tiny_model, tokenizer, tmp_path):
    """Accelerate wraps ``forward`` in bf16 autocast for mixed precision (CPU autocast here, CUDA on a
    GPU): the guard must score checkpoints as the base was scored (fp32), and the trained model must
    come back without the wrapper (found on a GPU: final probes ran in bf16, the reloaded adapter
    gave other logits)."""
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    seen = []

    def score(model):
        with torch.no_grad():
            logits = model(ids).logits
            seen.append((logits.dtype, torch.equal(logits, model.__class__.forward(model, ids).logits)))
        return [result([1.0] * 4)], None

    trainer = make_trainer(tiny_model, tokenizer, tmp_path, steps=4, bf16=True)
    guard = ForgettingGuard(score, [result([1.0] * 4)], action="warn", every=2, run_dir=tmp_path)
    trainer.add_callback(guard)
    patched = []

    class Wrapped(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            patched.append("_original_forward" in model.__dict__)

    trainer.add_callback(Wrapped())
    trainer.train()
    assert patched and all(patched)  # training did run under Accelerate's autocast wrapper
    assert seen == [(torch.float32, True)] * 2  # ... and the guard's checks did not
    assert "_original_forward" not in tiny_model.__dict__ and "forward" not in tiny_model.__dict__
    with torch.no_grad():
        after = tiny_model(ids).logits
        assert after.dtype == torch.float32 and torch.equal(after, tiny_model.__class__.forward(tiny_model, ids).logits)
