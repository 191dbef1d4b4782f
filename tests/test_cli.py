"""The CLI end to end on tiny models: every command runs, writes its outputs and fails in one line."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from typer.testing import CliRunner

from tether.cli import app

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


@pytest.fixture(scope="module")
def perturbed_dir(tmp_path_factory, tiny_model_dir, tokenizer):
    """The tiny model with noise added to its upper block only: a model that 'forgot'."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("model.layers.1."):
                p.add_(torch.randn(p.shape, generator=g) * 3.0 * p.abs().mean())
    path = tmp_path_factory.mktemp("perturbed")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_help_everywhere():
    """`-h` and `--help` on every command, every option with help text and a conventional metavar."""
    for cmd in ([], ["eval"], ["train"], ["continual"], ["interpolate"], ["diagnose"], ["recover"], ["report"],
                ["data", "build"], ["demo"], ["list"]):
        for flag in ("--help", "-h"):
            r = invoke(*cmd, flag)
            assert r.exit_code == 0 and "Usage" in r.output, cmd
            assert not any(t in r.output for t in ("<bool>", "<str>", "<list[str]>", "<int>", "<float>")), r.output
    from tether.cli import app

    for group in [app] + [g.typer_instance for g in app.registered_groups]:
        for c in group.registered_commands:
            assert c.callback.__doc__, c.name
            for name, param in inspect.signature(c.callback).parameters.items():
                assert getattr(param.default, "help", None), f"{c.name}: {name} has no help text"


def test_version_verbose_and_quiet(tiny_model_dir, tiny_suite):
    from importlib.metadata import version

    r = invoke("--version")
    assert r.exit_code == 0 and r.output.strip() == f"tether {version('tether')}"
    quiet = invoke("-q", "eval", "-m", tiny_model_dir, "-s", tiny_suite, "--limit", "2")
    assert quiet.exit_code == 0 and "facts_mc" in quiet.output
    loud = invoke("eval", "-m", tiny_model_dir, "-s", tiny_suite, "--limit", "2")
    assert "Loading weights" in loud.output and "Loading weights" not in quiet.output  # bars back for the next
    r = invoke("-v", "-q", "list")
    assert r.exit_code == 2 and "choose one" in r.output


def test_eval_one_model_and_compare(tmp_path, tiny_model_dir, perturbed_dir, tiny_suite):
    out = tmp_path / "scores.json"
    r = invoke("eval", "--model", tiny_model_dir, "--suite", tiny_suite, "-o", out)
    assert r.exit_code == 0, r.output
    assert {p["name"] for p in json.loads(out.read_text())["probes"]} == {"chat_loss", "facts_mc", "sums_gen", "drift"}
    same = tmp_path / "same.json"
    r = invoke("eval", "--base", tiny_model_dir, "--tuned", tiny_model_dir, "--suite", tiny_suite, "-o", same)
    assert r.exit_code == 0 and "no forgetting detected" in r.output
    rep = json.loads(same.read_text())
    assert all(p["rel_change"] == 0 and p["ci_low"] <= 0 <= p["ci_high"] for p in rep["probes"])
    worse = tmp_path / "worse.json"
    r = invoke("eval", "--base", tiny_model_dir, "--tuned", perturbed_dir, "--suite", tiny_suite, "-o", worse)
    assert r.exit_code == 0, r.output
    rep = json.loads(worse.read_text())
    probes = {p["probe"]: p for p in rep["probes"]}
    drift, gen = probes["drift"], probes["sums_gen"]
    assert drift["verdict"] == "forgot" and rep["summary"]["forgetting"] and "FORGETTING" in r.output
    assert [len(gen["flipped"][k]) for k in ("lost", "gained")] == [gen["flips"]["lost"], gen["flips"]["gained"]]
    assert all({"id", "base", "tuned"} <= set(it) for it in gen["flipped"]["lost"] + gen["flipped"]["gained"])
    r = invoke("report", worse)
    assert r.exit_code == 0 and (tmp_path / "worse.html").exists()


def test_eval_errors_are_one_line(tmp_path, tiny_model_dir):
    r = invoke("eval", "--model", tiny_model_dir, "--base", tiny_model_dir)
    assert r.exit_code == 2 and "give either --model" in r.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nprobes:\n  - {name: a, kind: nope, data: a.jsonl}\n")
    r = invoke("eval", "--model", tiny_model_dir, "--suite", bad)
    assert r.exit_code == 2 and str(bad) in r.output and len(r.output.strip().splitlines()) == 1


def test_train_diagnose_interpolate_report(tmp_path, tiny_model_dir, tiny_task, tiny_suite):
    run = tmp_path / "run"
    r = invoke("train", "--task", tiny_task[0], "--eval", tiny_task[1], "--model", tiny_model_dir, "-o", run,
               "--set", f"general={tiny_suite}", "--set", f"guard.suite={tiny_suite}", "--set", "guard.every=2",
               "--set", "guard.action=warn", "--set", "training.max_steps=2", "--set", "training.batch_size=4",
               "--set", "lora.r=4", "--set", "task.max_new_tokens=3")
    assert r.exit_code == 0, r.output
    assert "General probes after 2 steps" in r.output and (run / "model" / "adapter_config.json").exists()
    d = tmp_path / "diag"
    r = invoke("diagnose", "--base", tiny_model_dir, "--tuned", run / "model", "--suite", tiny_suite, "-o", d)
    assert r.exit_code == 0, r.output
    assert len(json.loads((d / "diagnose.json").read_text())["blocks"]) == 2
    i = tmp_path / "interp"
    r = invoke("interpolate", "--base", tiny_model_dir, "--tuned", run / "model", "--task-eval", tiny_task[1],
               "--suite", tiny_suite, "--alphas", "0,0.5,1", "-o", i)
    assert r.exit_code == 0, r.output
    js = json.loads((i / "interpolate.json").read_text())
    assert js["alphas"] == [0.0, 0.5, 1.0] and (i / "model" / "adapter_config.json").exists()
    for folder in (run, d, i):
        r = invoke("report", folder)
        assert r.exit_code == 0, r.output
        assert (folder / "report.html").exists()


def test_train_bad_recipe_is_one_line(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("training: {lr: -1}\n")
    r = invoke("train", bad)
    assert r.exit_code == 2 and "training.lr must be > 0" in r.output
