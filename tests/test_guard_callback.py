"""The guard as a drop-in callback for a run of the user's own: TRL's real SFTTrainer and a plain HF Trainer."""

from __future__ import annotations

import json

import pytest
import torch

trl = pytest.importorskip("trl")


def _text_data(n=24):
    from datasets import Dataset

    topics = ["sports", "music", "food", "travel"]
    return Dataset.from_list([{"text": f"Quote {i} about the {topics[i % 4]} is labelled {topics[i % 4]}."}
                              for i in range(n)])


def _sft(model, tokenizer, tmp_path, lr, steps=4, peft_config=None):
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=4,
                     learning_rate=lr, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                     seed=0, max_length=64, dataset_text_field="text")
    return SFTTrainer(model=model, args=args, train_dataset=_text_data(), processing_class=tokenizer,
                      peft_config=peft_config)


def test_guard_callback_watches_a_trl_sft_run_with_lora(tmp_path, tiny_model, tokenizer, tiny_suite):
    """Base scores at train begin (drift included: the adapter switches off), a check every 2 steps,
    events in guard.jsonl and in the trainer's log history (what report_to receives)."""
    from peft import LoraConfig

    from tether import GuardCallback

    trainer = _sft(tiny_model, tokenizer, tmp_path, lr=1e-3, peft_config=LoraConfig(r=4, target_modules=["q_proj"]))
    guard = GuardCallback(trainer, suite=str(tiny_suite), every=2, action="warn")
    trainer.add_callback(guard)
    trainer.train()
    assert [p.name for p in guard.base_results] == ["chat_loss", "facts_mc", "sums_gen", "drift"]
    assert [e["step"] for e in guard.events] == [2, 4]
    lines = [json.loads(x) for x in (tmp_path / "out" / "guard.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4] and "drift" in lines[0]["probes"]
    logged = [h for h in trainer.state.log_history if "guard/worst_drop" in h]
    assert len(logged) == 2 and all("guard/chat_loss" in h for h in logged)
    assert any("loss" in h for h in trainer.state.log_history)  # the trainer's own logs are kept


def test_guard_callback_stops_a_plain_trainer_and_restores_the_best(tmp_path, tokenizer, tiny_suite):
    """Full fine-tuning at a learning rate that wrecks the model: the guard stops at the first breach
    and puts back the weights of the best check within budget (here the start)."""
    from conftest import make_tiny_llama
    from transformers import Trainer, TrainingArguments

    from tether import GuardCallback
    from tether.data.collate import Collator

    model = make_tiny_llama(len(tokenizer))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = [{"input_ids": tokenizer(f"Quote {i} is about food.")["input_ids"]} for i in range(24)]
    args = TrainingArguments(output_dir=str(tmp_path / "plain"), max_steps=8, per_device_train_batch_size=4,
                             learning_rate=0.2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             remove_unused_columns=False, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=Collator.for_tokenizer(tokenizer),
                      processing_class=tokenizer)
    guard = GuardCallback(trainer, suite=str(tiny_suite), every=2, threshold=0.01, action="stop")
    trainer.add_callback(guard)
    out = trainer.train()
    assert [p.name for p in guard.probes] == ["chat_loss", "facts_mc", "sums_gen"]  # no base view: no drift
    assert guard.stopped_at is not None and out.global_step == guard.stopped_at < 8
    assert guard.events[-1]["breached"] and guard.restored_step == guard.best["step"]
    if guard.restored_step == 0:
        assert all(torch.equal(p, start[n]) for n, p in model.named_parameters())


def test_guard_callback_refuses_a_bad_suite_before_training(tmp_path, tiny_model, tokenizer):
    from tether import GuardCallback
    from tether.probes.suite import SuiteError

    trainer = _sft(tiny_model, tokenizer, tmp_path, lr=1e-3)
    with pytest.raises(SuiteError, match="no-such-suite"):
        GuardCallback(trainer, suite="no-such-suite")
