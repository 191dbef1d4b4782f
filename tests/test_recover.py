"""`tether recover`: a tiny model made to forget gets its general probe back toward the base."""

from __future__ import annotations

import json

from tether.config import load_recipe
from tether.training.recover import recover
from tether.training.run import train


def full_ft(model, task, tmp_path, name, suite, steps, eval_data=None):
    r = load_recipe(None, model={"name": str(model)}, methods={"full": {}},
                    task={"train": str(task), "eval": eval_data and str(eval_data), "max_new_tokens": 3},
                    general=str(suite), guard={"enabled": False}, output_dir=str(tmp_path / name),
                    training={"max_steps": steps, "batch_size": 8, "lr": 1e-2, "logging_steps": 10})
    return train(r).summary


def test_recovery_brings_a_probe_back_toward_base(tmp_path, tiny_model_dir, tiny_task, tiny_suite):
    # 0. a base that knows something general: the random tiny model trained on the chit-chat corpus
    full_ft(tiny_model_dir, tiny_suite.parent / "replay.jsonl", tmp_path, "base", tiny_suite, 30)
    base = tmp_path / "base" / "model"
    # 1. make it forget: naive full fine-tuning at a high learning rate on the narrow task
    forget = load_recipe(None, model={"name": str(base)}, methods={"full": {}},
                         task={"train": str(tiny_task[0]), "eval": str(tiny_task[1]), "max_new_tokens": 3},
                         general=str(tiny_suite), guard={"enabled": False}, output_dir=str(tmp_path / "forgot"),
                         training={"max_steps": 30, "batch_size": 6, "lr": 1e-2, "logging_steps": 10})
    forgot = train(forget).summary
    chat = {p["probe"]: p for p in forgot["probes"]}["chat_loss"]
    assert chat["drop"] > 0.05, "the setup must forget first"

    # 2. recover against the original base
    result = recover(str(tmp_path / "forgot" / "model"), str(base), str(tiny_task[0]),
                     eval_data=str(tiny_task[1]), max_steps=16, replay_ratio=0.75, lr=3e-3, batch_size=8,
                     every=4, budget=0.05, suite=str(tiny_suite), guard_suite=str(tiny_suite),
                     output_dir=tmp_path / "rec", overrides=["task.max_new_tokens=3"])
    s = result.summary
    after = {p["probe"]: p for p in s["probes"]}["chat_loss"]
    assert after["drop"] < chat["drop"] / 2  # most of the lost chat ability is back
    assert s["recovery"]["max_steps"] == 16 and "task_kept" in s["recovery"]
    events = [json.loads(x) for x in (result.run_dir / "guard.jsonl").read_text().splitlines()]
    assert events and events[0]["step"] == 4
    if s["recovery"]["recovered_at"] is not None:
        assert events[-1]["action"] == "recovered" and not events[-1]["breached"]
