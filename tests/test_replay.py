"""Replay plans every batch: the exact ratio per batch (examples), within one example (tokens),
shuffled task epochs, replay without replacement per pass, deterministic in the seed; and the
collator that batches the result."""

from __future__ import annotations

import math
import random

import pytest
import torch
from pydantic import ValidationError

from tether.data.collate import Collator
from tether.data.formats import Example
from tether.methods.base import Batch, Context
from tether.methods.replay import MixedDataset, Replay, ReplayConfig, plan_batches, replay_counts


def count(batch, kind="replay"):
    return sum(1 for k, _ in batch if k == kind)


def test_examples_mode_exact_ratio_in_every_batch():
    plan = plan_batches(37, [5] * 11, None, batch_size=10, num_batches=25, ratio=0.2, by="examples", seed=1)
    assert len(plan) == 25
    assert all(len(b) == 10 and count(b) == 2 for b in plan)


def test_examples_mode_non_integral_ratio_alternates_with_exact_running_ratio():
    counts = replay_counts(0.2, 8, 20)
    assert set(counts) == {1, 2}
    assert all(sum(counts[:b]) == math.floor(b * 1.6) for b in range(21))
    assert replay_counts(0.29, 100, 50) == [29] * 50  # no float drift (0.29 * 100 = 28.999...)
    plan = plan_batches(30, [3] * 9, None, 8, 20, 0.2, "examples", 0)
    assert [count(b) for b in plan] == counts and all(len(b) == 8 for b in plan)


def test_task_epochs_are_shuffled_permutations_and_replay_draws_without_replacement():
    n_task, n_pool = 12, 7
    plan = plan_batches(n_task, [4] * n_pool, None, 4, 30, 0.25, "examples", seed=5)
    task = [i for b in plan for k, i in b if k == "task"]
    replay = [i for b in plan for k, i in b if k == "replay"]
    for e in range(len(task) // n_task):
        assert sorted(task[e * n_task:(e + 1) * n_task]) == list(range(n_task))
    for p in range(len(replay) // n_pool):
        assert sorted(replay[p * n_pool:(p + 1) * n_pool]) == list(range(n_pool))
    assert task[:n_task] != list(range(n_task)) and task[:n_task] != task[n_task:2 * n_task]


def test_tokens_mode_within_one_example_of_the_ratio():
    rng = random.Random(0)
    task_len = [rng.randint(5, 60) for _ in range(40)]
    pool_len = [rng.randint(5, 60) for _ in range(25)]
    ratio = 0.3
    plan = plan_batches(40, pool_len, task_len, 6, 40, ratio, "tokens", seed=2)
    for b in plan:
        assert count(b, "task") == round(0.7 * 6)
        t = sum(task_len[i] for k, i in b if k == "task")
        r = sum(pool_len[i] for k, i in b if k == "replay")
        assert abs(r / (r + t) - ratio) <= max(pool_len) / (r + t)
    total_r = sum(pool_len[i] for b in plan for k, i in b if k == "replay")
    total = total_r + sum(task_len[i] for b in plan for k, i in b if k == "task")
    assert total_r / total == pytest.approx(ratio, abs=0.05)


def test_add_mode_keeps_every_task_slot_and_puts_replay_on_top():
    """mode add: B task examples in every batch, replay rows exactly ``ratio`` of the larger batch."""
    plan = plan_batches(37, [5] * 11, None, batch_size=8, num_batches=25, ratio=0.2, by="examples", seed=1, mode="add")
    assert all(count(b, "task") == 8 and count(b) == 2 for b in plan)  # 2 / 10 = 0.2 exactly
    # 0.25 / 0.75 * 6 = 2 per batch; 0.3 / 0.7 * 8 = 24/7 per batch: 3 or 4, running share exact
    assert all(count(b) == 2 and len(b) == 8 for b in plan_batches(9, [2] * 5, None, 6, 10, 0.25, mode="add"))
    plan = plan_batches(40, [3] * 30, None, 8, 35, 0.3, "examples", 0, "add")
    assert {count(b) for b in plan} == {3, 4} and all(count(b, "task") == 8 for b in plan)
    n_r = [sum(count(b) for b in plan[:k]) for k in range(36)]
    assert all(n_r[k] == math.floor(k * 8 * 3 / 7) for k in range(36))
    assert n_r[-1] / (n_r[-1] + 8 * 35) == pytest.approx(0.3, abs=1 / 35)
    # the same task order as without replay: replay never displaces a task example
    bare = plan_batches(37, [5] * 11, None, 8, 25, 0.0, "examples", 1)
    plan = plan_batches(37, [5] * 11, None, 8, 25, 0.2, "examples", 1, "add")
    assert [[i for k, i in b if k == "task"] for b in plan] == [[i for _, i in b] for b in bare]
    with pytest.raises(ValueError, match="mode"):
        plan_batches(5, [1], None, 4, 3, 0.2, "examples", 0, "mix")


def test_add_mode_by_tokens_keeps_batch_size_task_examples():
    rng = random.Random(3)
    task_len = [rng.randint(5, 60) for _ in range(40)]
    pool_len = [rng.randint(5, 60) for _ in range(25)]
    plan = plan_batches(40, pool_len, task_len, 6, 30, 0.3, "tokens", seed=2, mode="add")
    for b in plan:
        assert count(b, "task") == 6
        t = sum(task_len[i] for k, i in b if k == "task")
        r = sum(pool_len[i] for k, i in b if k == "replay")
        assert abs(r / (r + t) - 0.3) <= max(pool_len) / (r + t)


def test_add_mode_through_prepare_data_self_answers_only_what_the_plan_uses(monkeypatch):
    import tether.methods._rehearsal as rehearsal

    task = [ex(5 + i % 3, 10 + i) for i in range(9)]
    general = [ex(4 + i % 2, 100 + i, prompt=0) for i in range(40)]
    asked = []
    monkeypatch.setattr(rehearsal, "self_rehearsal",
                        lambda model, tok, pool, **kw: (asked.extend(pool) or list(pool), len(pool)))
    method = Replay({"ratio": 0.2, "mode": "add", "answers": "model"})
    ctx = Context(general_examples=general, batch_size=4, num_batches=10, seed=0)
    method.on_task_start(None, ctx)
    assert len(asked) == 10  # 0.2 / 0.8 * 4 = 1 replay row per batch, 10 batches
    ds = method.prepare_data(task, ctx)
    assert all(len(b) == 5 for b in ds.batches)
    assert method.metrics()["replay_planned_examples"] == 0.2
    ds.set_ratio(0.5, start=4)  # the guard's adapt re-plans in the same mode: 4 task + 4 replay
    assert [len(b) for b in ds.batches] == [5] * 4 + [8] * 6
    assert all(sum(1 for i in b if i < len(task)) == 4 for b in ds.batches)


def test_plan_is_deterministic_in_the_seed():
    args = (20, [3, 9, 4, 7, 5, 6], [4] * 20, 5, 12, 0.4)
    for by in ("examples", "tokens"):
        assert plan_batches(*args, by, 7) == plan_batches(*args, by, 7)
        assert plan_batches(*args, by, 7) != plan_batches(*args, by, 8)


def test_plan_edges():
    assert all(count(b) == 0 for b in plan_batches(5, [], None, 4, 3, 0.0, "examples", 0))
    one_epoch = plan_batches(10, [2] * 3, None, 4, 0, 0.5, "examples", 0)
    assert len(one_epoch) == 5  # 2 task examples per batch, stop when the 10 are used
    with pytest.raises(ValueError, match="no general data"):
        plan_batches(5, [], None, 4, 3, 0.2, "examples", 0)


def ex(n: int, start: int, prompt: int = 1) -> Example:
    ids = list(range(start, start + n))
    return Example(ids, [-100] * prompt + ids[prompt:], "", "")


def test_prepare_data_mixed_dataset_with_dataloader_and_metrics(caplog):
    task = [ex(5 + i % 3, 10 + i) for i in range(9)]
    general = [ex(4 + i % 2, 100 + i, prompt=0) for i in range(5)]
    method = Replay({"ratio": 0.25})
    ctx = Context(general_examples=general, batch_size=4, num_batches=6, seed=0)
    ds = method.prepare_data(task, ctx)
    assert isinstance(ds, MixedDataset) and len(ds) == len(task) + len(general)
    assert len(ds.batches) == 6 and all(len(b) == 4 for b in ds.batches)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=ds.batches, collate_fn=Collator(0))
    for batch in loader:
        assert batch["is_replay"].sum().item() == 1
        assert set(batch) == {"input_ids", "attention_mask", "labels", "is_replay", "replay_index"}
        method.extra_loss(None, Batch.from_inputs(batch), None, ctx)
    m = method.metrics()
    assert m["replay_planned_examples"] == m["replay_realised_examples"] == 0.25
    assert m["replay_planned_tokens"] == pytest.approx(m["replay_realised_tokens"])
    fresh = Replay({"ratio": 0.25})
    fresh.load_state_dict(method.state_dict())
    assert fresh.metrics() == m
    with caplog.at_level("WARNING"):
        Replay({"ratio": 0.1}).prepare_data(task, ctx)
    assert "batch size >= 10" in caplog.text


def test_config_errors():
    with pytest.raises(ValidationError, match="replay.ratio must be in"):
        ReplayConfig(ratio=1.0)
    with pytest.raises(ValidationError):
        ReplayConfig(by="bytes")
    with pytest.raises(ValidationError):
        ReplayConfig(mode="on_top")


def test_collator_pads_right_with_masked_labels():
    items = [ex(3, 10), {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, 8, 9], "is_replay": True}]
    out = Collator(pad_token_id=0, pad_to_multiple_of=4)(items)
    assert out["input_ids"].shape == (2, 8)
    assert out["input_ids"][0].tolist() == [10, 11, 12, 0, 0, 0, 0, 0]
    assert out["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert out["labels"][0].tolist() == [-100, 11, 12] + [-100] * 5
    assert out["labels"][1].tolist() == [-100, 6, 7, 8, 9, -100, -100, -100]
    assert out["is_replay"].dtype == torch.bool and out["is_replay"].tolist() == [False, True]
    assert "is_replay" not in Collator(0)([ex(2, 1)])
    with pytest.raises(ValueError, match="labels"):
        Collator(0)([{"input_ids": [1, 2], "labels": [1]}])


def test_mssr_schedule_fills_replay_slots_from_the_scheduler_and_learns(tokenizer, tiny_model, tmp_path):
    """schedule: mssr through a real Trainer: same slots per batch, picks driven by losses, budget logged."""
    from transformers import TrainingArguments

    from tether.data.collate import Collator
    from tether.methods.base import Context
    from tether.registry import METHODS
    from tether.training.trainer import TetherTrainer

    def examples(n, offset):
        texts = [f"Sentence number {i + offset} talks about topic {(i + offset) % 5}." for i in range(n)]
        out = []
        for t in texts:
            ids = tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            out.append(Example(ids, [-100] * 2 + ids[2:], "", t))
        return out

    task = examples(16, 0)
    general = examples(12, 40)
    method = METHODS.get("replay")({"ratio": 0.25, "schedule": "mssr"})
    ctx = Context(tokenizer=tokenizer, general_examples=general, task_examples=task, batch_size=4, num_batches=8)
    ds = method.prepare_data(task, ctx)
    drawn = []
    ds.batches.scheduler.select = _recording(ds.batches.scheduler.select, drawn)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=4, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True, learning_rate=1e-3)
    trainer = TetherTrainer(model=tiny_model.train(), args=args, train_dataset=ds,
                            data_collator=Collator(tokenizer.pad_token_id), methods={"replay": method}, context=ctx)
    trainer.train()
    assert len(drawn) == 8 and all(len(d) == 1 for d in drawn)  # one replay slot of 4 in every batch
    m = method.metrics()
    assert m["replay_realised_examples"] == 0.25 and m["replay_tokens_total"] > 0
    sched = method.scheduler_
    assert sched.items_replayed == 8 and (sched.last_step >= 0).sum() == len({i for d in drawn for i in d})
    # never-replayed examples (retention 0) come first: the first 8 picks are all distinct
    assert len({d[0] for d in drawn}) == 8


def _recording(fn, log):
    def wrapped(k, step):
        out = fn(k, step)
        log.append(out)
        return out

    return wrapped


def test_balance_loss_gives_replay_its_ratio_of_the_loss():
    """A one-token task label and a 30-token replay answer each weigh one example, not their token count."""
    from tether.training.trainer import weighted_example_loss

    on, off = Replay({"ratio": 0.25}), Replay({"ratio": 0.25, "balance_loss": False})
    tokens = Replay({"ratio": 0.25, "by": "tokens"})
    flags = torch.tensor([False, False, False, True])
    labels = torch.full((4, 32), -100)
    labels[:3, 5] = 1  # task: one target token each
    labels[3, 2:] = 1  # replay: 30 target tokens
    unmixed = Batch(input_ids=torch.zeros(4, 32, dtype=torch.long), labels=labels)
    batch = Batch(input_ids=unmixed.input_ids, labels=labels, is_replay=flags)
    assert off.example_weights(batch, Context()) is None
    assert tokens.example_weights(batch, Context()) is None
    assert on.example_weights(unmixed, Context()) is None  # unmixed batch
    w = on.example_weights(batch, Context())
    logits = torch.zeros(4, 32, 5)
    logits[:3, 4, 1] = 10.0  # task rows predicted well, replay rows at uniform (loss log 5)
    loss = weighted_example_loss(logits, labels, w)
    task_nll = torch.log(1 + 4 * torch.exp(torch.tensor(-10.0)))
    assert loss.item() == pytest.approx((3 * task_nll.item() + torch.log(torch.tensor(5.0)).item()) / 4, rel=1e-5)


def _chat_example(tokenizer, question: str, answer: str) -> Example:
    from tether.data.formats import encode_records
    from tether.data.readers import Record

    rec = Record({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]},
                 "mem", 1)
    return encode_records([rec], tokenizer, max_length=256)[0][0]


def test_self_rehearsal_replays_the_models_own_greedy_answers(tokenizer, tiny_model):
    """Batched, left-padded generation gives each prompt exactly its unbatched greedy answer."""
    from tether.methods._rehearsal import prompt_ids, self_rehearsal

    chats = [_chat_example(tokenizer, q, "A dataset answer that the model never gave.")
             for q in ("Hi?", "What is the capital of France, and why is it famous?", "Name a colour.")]
    text_ids = tokenizer("Plain prose has no prompt.", add_special_tokens=False)["input_ids"]
    prose = Example(text_ids, list(text_ids), "", "Plain prose has no prompt.")
    model = tiny_model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out, n = self_rehearsal(model, tokenizer, chats + [prose], max_new_tokens=6, batch_size=2)
    assert n == 3 and out[3] is prose and model.training
    assert all(torch.equal(p, before[k]) for k, p in model.named_parameters())
    model.eval()
    for ex, new in zip(chats, out):
        p = prompt_ids(ex)
        assert new.input_ids[:len(p)] == p and new.labels[:len(p)] == [-100] * len(p)
        with torch.no_grad():
            alone = model.generate(input_ids=torch.tensor([p]), max_new_tokens=6, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id)[0, len(p):].tolist()
        if 2 in alone:  # stopped on EOS: the answer keeps it
            alone = alone[:alone.index(2) + 1]
        assert new.input_ids[len(p):] == alone == new.labels[len(p):]
        assert new.completion != ex.completion


def test_replay_answers_model_replays_self_answers_for_what_the_plan_uses(tokenizer, tiny_model):
    general = [_chat_example(tokenizer, f"Question {i}?", "Dataset answer.") for i in range(40)]
    task = [_chat_example(tokenizer, f"Route {i}", "label") for i in range(16)]
    method = Replay({"ratio": 0.25, "answers": "model", "max_new_tokens": 4})
    ctx = Context(tokenizer=tokenizer, general_examples=general, task_examples=task, batch_size=4, num_batches=6)
    method.on_task_start(tiny_model, ctx)
    ds = method.prepare_data(task, ctx)
    assert method.self_answered_ == 6 == len(method.pool_)  # 1 replay slot x 6 batches
    replayed = [ds.items[i] for b in ds.batches for i in b if ds.items[i]["is_replay"]]
    assert len(replayed) == 6
    dataset_answer = _chat_example(tokenizer, "x", "Dataset answer.").labels[-4:]
    assert all(r["labels"][-4:] != dataset_answer for r in replayed)
    assert method.metrics()["replay_self_answered"] == 6.0
    with pytest.raises(ValidationError):
        ReplayConfig(answers="teacher")
