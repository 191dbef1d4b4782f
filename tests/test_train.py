"""`tether train` end to end on a tiny random Llama: run directory, methods composed, errors early."""

from __future__ import annotations

import json

import pytest
import torch

from tether.config import RecipeError, default_methods, load_recipe
from tether.data.readers import DataError
from tether.training.run import train


def recipe(tmp_path, tiny_model_dir, tiny_task, tiny_suite, **fields):
    base = dict(model={"name": str(tiny_model_dir)}, task={"train": str(tiny_task[0]), "eval": str(tiny_task[1]),
                                                         "max_new_tokens": 4},
                general=str(tiny_suite), training={"max_steps": 4, "batch_size": 4, "logging_steps": 1, "lr": 1e-3},
                guard={"suite": str(tiny_suite), "every": 2, "action": "warn"}, output_dir=str(tmp_path / "run"))
    for k, v in fields.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and k in base and k != "methods" else v
    return load_recipe(None, **base)


def test_default_recipe_run_directory(tmp_path, tiny_model_dir, tiny_task, tiny_suite):
    r = recipe(tmp_path, tiny_model_dir, tiny_task, tiny_suite, methods={"lora": {"r": 4}, "replay": {"ratio": 0.25}})
    result = train(r, keep_model=True)
    run = result.run_dir
    for f in ("recipe.yaml", "metrics.jsonl", "guard.jsonl", "probes_base.json", "probes_final.json", "summary.json",
              "report.html", "plots/train_loss.png"):
        assert (run / f).exists(), f
    s = json.loads((run / "summary.json").read_text())
    assert s["steps"] == 4 and s["methods"] == ["lora", "replay"]
    assert {p["probe"] for p in s["probes"]} == {"chat_loss", "facts_mc", "sums_gen", "drift"}
    assert [p["shares_source_with_replay"] for p in s["probes"]] == [True, False, False, False]
    assert s["task"]["base"] is not None and s["guard"]["checks"] == 2
    base = json.loads((run / "probes_base.json").read_text())
    assert base["guard"] == base["general"]  # the guard watches the general suite: not scored twice
    logs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_logs = [x for x in logs if "loss" in x]
    assert len(train_logs) == 4 and all(x["replay_fraction"] == 0.25 for x in train_logs)
    assert train_logs[-1]["replay/replay_realised_examples"] == 0.25
    assert any("guard/worst_drop" in x for x in logs)
    # the task probe runs with the general probes (one adapter merge): its score still comes back
    events = [json.loads(line) for line in (run / "guard.jsonl").read_text().splitlines()]
    assert len(events) == 2 and all(0.0 <= e["task_score"] <= 1.0 for e in events)
    final = json.loads((run / "probes_final.json").read_text())
    assert final["task"] == s["task"]["final"] and [r["name"] for r in final["general"]] == [
        "chat_loss", "facts_mc", "sums_gen", "drift"]
    # the guard's check at the last step scored these very weights on the same probes (and every task
    # item: fewer than its task_limit): the final scores are that check's, and equal a fresh scoring
    assert final["general_from_guard_step"] == 4
    from tether.probes.scorer import Scorer
    from tether.probes.suite import run_suite, validate_suite
    from tether.registry import PROBES
    from tether.training.run import load_task, records_to_eval_items

    scorer = Scorer(result.model, result.tokenizer)
    fresh = run_suite(validate_suite(str(tiny_suite)), scorer, progress=False)
    # the guard scores in batches of 16, a fresh Scorer in batches of 32: float32 noise on a loss of ~10
    assert [x["score"] for x in final["general"]] == pytest.approx([x.score for x in fresh], rel=1e-5, abs=1e-5)
    task_items = records_to_eval_items(load_task(r)[1], r.task.chat)
    assert len(task_items) <= r.guard.task_limit
    task_probe = PROBES.get(r.task.eval_kind)("task", task_items, metric=r.task.eval_metric, max_new_tokens=4)
    assert final["task"] == pytest.approx(task_probe.run(scorer).score)
    # the adapter is in PEFT format and reloads on the base
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert (run / "model" / "adapter_config.json").exists()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run / "model")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, result_logits(run, tiny_model_dir, ids), atol=1e-5)


def result_logits(run, base_dir, ids):
    from tether import models

    model, _ = models.load(run / "model", base=base_dir, device="cpu")
    with torch.no_grad():
        return model(ids).logits


def test_lora_answer_tokens_in_a_run_save_and_reload(tmp_path, tiny_model_dir, tiny_task, tiny_suite):
    """lora.trainable_tokens 'answers' through `train`, with replay and LwF on its rows: the trained
    rows are saved with the adapter and PEFT reloads the same model."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    r = recipe(tmp_path, tiny_model_dir, tiny_task, tiny_suite, guard={"enabled": False},
               methods={"lora": {"r": 4, "trainable_tokens": "answers"}, "replay": {"ratio": 0.25},
                        "lwf": {"on": "replay"}})
    run = train(r).run_dir
    saved = load_file(run / "model" / "adapter_model.safetensors")
    deltas = [v for k, v in saved.items() if "trainable_tokens_delta" in k]
    assert len(deltas) == 1 and deltas[0].shape[0] >= 3  # the task's three label words at least
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reloaded = PeftModel.from_pretrained(base, run / "model")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, result_logits(run, tiny_model_dir, ids), atol=1e-5)
        assert not torch.allclose(reloaded.get_input_embeddings().weight,
                                  AutoModelForCausalLM.from_pretrained(tiny_model_dir).get_input_embeddings().weight)


def test_lora_contrast_init_in_a_run_reads_the_general_split_and_trains_b_only(tmp_path, tiny_model_dir, tiny_task,
                                                                            tiny_suite, caplog):
    """lora.init 'contrast' with no replay/EWC/LwF still gets the general split (its moments need it);
    with freeze_a the saved adapter's A is the contrast init and B learnt, and PEFT reloads it."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    r = recipe(tmp_path, tiny_model_dir, tiny_task, tiny_suite, guard={"enabled": False},
               methods={"lora": {"r": 4, "init": "contrast", "freeze_a": True}})
    with caplog.at_level("INFO"):
        run = train(r).run_dir
    assert "task-over-general input directions on 14 modules" in caplog.text
    saved = load_file(run / "model" / "adapter_model.safetensors")
    a = [v for k, v in saved.items() if "lora_A" in k]
    assert a and all(torch.allclose(v.norm(dim=1), torch.ones(v.shape[0]), atol=1e-5) for v in a)
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run / "model")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, result_logits(run, tiny_model_dir, ids), atol=1e-5)


def test_default_methods_without_replay_still_distil_the_task_prompts(tmp_path, tiny_model_dir, tiny_task, tiny_suite):
    """`--set replay=false` on the default (its LwF is `on: inputs`): the run trains,
    mixes in no general rows, and distils the task rows' prompts (the KL is logged and grows from 0)."""
    methods = {k: v for k, v in default_methods().items() if k != "replay"}
    assert methods["lwf"]["on"] == "inputs"
    methods["lora"] = {**methods["lora"], "r": 4}
    r = recipe(tmp_path, tiny_model_dir, tiny_task, tiny_suite, guard={"enabled": False}, methods=methods)
    run = train(r).run_dir
    logs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in logs if "loss" in x]
    assert len(steps) == 4 and not any("replay_fraction" in x for x in steps)
    kl = [x["lwf_inputs"] for x in steps]
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and kl[-1] > 0  # B = 0 at step 1: student = teacher


def test_default_recipe_teacher_skips_the_frozen_half_and_trains_the_same(tmp_path, tiny_model_dir, tiny_task,
                                                                           tiny_suite, monkeypatch):
    """The default's LwF teacher starts at the first trained block (block 1 of 2, `tether.trunk`): logged,
    and the run's losses are those of a run whose teacher runs every block."""
    from tether import trunk

    methods = default_methods()
    methods["lora"] = {**methods["lora"], "r": 4}
    runs = {}
    for name in ("trunk", "whole"):
        if name == "whole":
            monkeypatch.setattr(trunk.Trunk, "build", classmethod(lambda cls, s, t: None))
        r = recipe(tmp_path / name, tiny_model_dir, tiny_task, tiny_suite, guard={"enabled": False}, methods=methods)
        result = train(r)
        logs = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        runs[name] = ([x["loss"] for x in logs if "loss" in x], result.summary["method_metrics"]["lwf"])
    assert runs["trunk"][1]["teacher_skips_blocks"] == 1.0 and runs["whole"][1]["teacher_skips_blocks"] == 0.0
    # the default's non-target term ran beside it, leaving the task's answer tokens out
    assert runs["trunk"][1]["nontarget_answer_vocab"] == runs["whole"][1]["nontarget_answer_vocab"] > 0
    assert runs["trunk"][0] == pytest.approx(runs["whole"][0], rel=1e-4)
    assert len(runs["trunk"][0]) == 4


def test_full_ft_with_freeze_ewc_lwf(tmp_path, tiny_model_dir, tiny_task, tiny_suite):
    from transformers import AutoModelForCausalLM

    r = recipe(tmp_path, tiny_model_dir, tiny_task, tiny_suite, guard={"enabled": False},
               methods={"full": {}, "freeze": {"fraction": 0.5}, "ewc": {"fisher_samples": 8}, "lwf": {}})
    result = train(r, keep_model=True)
    s = result.summary
    assert s["methods"] == ["full", "freeze", "ewc", "lwf"] and s["guard"] is None
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tuned = result.model.cpu()  # trained on the GPU where one is visible
    b, t = dict(base.named_parameters()), dict(tuned.named_parameters())
    assert torch.equal(b["model.layers.0.self_attn.q_proj.weight"], t["model.layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(b["model.layers.1.self_attn.q_proj.weight"], t["model.layers.1.self_attn.q_proj.weight"])
    logs = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("ewc" in x for x in logs) and any("lwf" in x for x in logs)
    assert (result.run_dir / "ewc_fisher.safetensors").exists()
    assert (result.run_dir / "model" / "model.safetensors").exists()


def test_bad_task_data_fails_before_the_model_loads(tmp_path, tiny_task, tiny_suite):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    r = load_recipe(None, model={"name": str(tmp_path / "no-such-model")}, task={"train": str(bad)},
                    general=str(tiny_suite), guard={"suite": str(tiny_suite)}, output_dir=str(tmp_path / "r"))
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'completion': missing"):
        train(r)


def test_cli_override_reaches_the_recipe():
    with pytest.raises(RecipeError, match="lora"):
        load_recipe(overrides=["lora.r=-1"])


def test_guard_base_scores_reuse_identical_general_probes_and_score_the_rest():
    """A guard probe identical to a general one (same kind, items, options) takes the base's general
    result; one with other items or options is scored, in the guard's own order."""
    from types import SimpleNamespace

    from tether.probes.base import ProbeResult
    from tether.registry import PROBES
    from tether.training.scoring import Scoring

    items = [{"text": f"line {i}"} for i in range(6)]
    ppl = PROBES.get("perplexity")
    general = [ppl("chat", items, sources=["a"]), ppl("code", items, sources=["b"], chat=False)]
    guard = [ppl("code", items, sources=["b"], chat=False),  # identical: reused
             ppl("chat", items[:3], sources=["a"])]  # a prefix is other items: scored
    assert general[1].same_as(guard[0]) and not general[0].same_as(guard[1])
    assert not general[1].same_as(ppl("code", items, sources=["b"], chat=True))

    def result(name, score):
        return ProbeResult(name, "perplexity", "loss", False, score, 6, score, score, [score] * 6)

    scored = []
    fake = SimpleNamespace(general_probes=general, guard_probes=guard,
                           _run=lambda probes, ref, reference: scored.append([p.name for p in probes])
                           or [result(p.name, 9.0) for p in probes])
    out = Scoring._guard_base(fake, [result("chat", 1.0), result("code", 2.0)], ref=None)
    assert scored == [["chat"]]
    assert [(r.name, r.score) for r in out] == [("code", 2.0), ("chat", 9.0)]


def test_guard_checks_do_not_change_the_run(tmp_path, tiny_model_dir, tiny_task, tiny_suite):
    """The default recipe (LoRA, replay, LwF, bottom half frozen) trains the same with and without guard
    checks. Found: the drift probe's base view went through PEFT's ``disable_adapter()``, which made the
    frozen blocks' adapters trainable again; from the first check on, backward ran through the frozen
    blocks and their gradients entered the clipping norm (grad_norm 8.6 vs 4.7 on SmolLM2), so the
    default recipe learned less in `tether train` than in a guard-less run."""
    runs = {}
    for guard in (True, False):
        methods = default_methods()
        methods["lora"]["r"] = 4
        r = recipe(tmp_path / str(guard), tiny_model_dir, tiny_task, tiny_suite, methods=methods,
                   training={"max_steps": 6}, guard={"enabled": guard, "every": 2})
        assert r.method_configs()["freeze"].fraction == 0.5 and "lwf" in r.methods
        result = train(r, keep_model=True)
        logs = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        runs[guard] = [(x["loss"], x["grad_norm"]) for x in logs if "loss" in x]
        trainable = {n for n, p in result.model.named_parameters() if p.requires_grad}
        assert trainable and all(".layers.1." in n for n in trainable)  # block 0 and its adapters stay frozen
    assert len(runs[True]) == 6 and runs[True] == runs[False]
