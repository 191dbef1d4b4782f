"""Suite YAML: parsing, error messages naming file and key, data resolution, validation and running."""

from __future__ import annotations

import json
import textwrap

import pytest

from tether.probes.scorer import Scorer
from tether.probes.suite import (
    ProbeSpec,
    SuiteError,
    SuiteSpec,
    builtin_suites,
    load_suite,
    run_suite,
    validate_suite,
)

MC = [{"query": f"Question {i}?", "choices": ["yes", "no", "maybe so"], "gold": i % 3} for i in range(6)]
TEXT = [{"text": f"Sentence number {i} about cats."} for i in range(4)]
PROMPTS = [{"prompt": "Hello there"}, {"prompt": [{"role": "user", "content": "Hi"}]}]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def suite_dir(tmp_path):
    write_jsonl(tmp_path / "data" / "mc.jsonl", MC)
    write_jsonl(tmp_path / "data" / "text.jsonl", TEXT)
    write_jsonl(tmp_path / "drift.jsonl", PROMPTS)
    (tmp_path / "suite.yaml").write_text(textwrap.dedent("""\
        name: toy
        probes:
          - name: mc
            kind: multiple_choice
            data: data/mc.jsonl
            sources: [bigbench/logic]
            limit: 4
            options: {primary: acc}
          - name: loss
            kind: perplexity
            data: data/text.jsonl
            sources: [chatterbot]
          - name: drift
            kind: drift
            data: %s
        replay:
          data: data/text.jsonl
          sources: [chatterbot/english, python-docs]
        """ % (tmp_path / "drift.jsonl")))
    return tmp_path


def test_load_validate_and_run(suite_dir, tiny_model, tokenizer):
    suite = load_suite(suite_dir / "suite.yaml")
    assert [p.name for p in suite.probes] == ["mc", "loss", "drift"]
    assert suite.replay_path() == suite_dir / "data" / "text.jsonl"
    assert [suite.shares_source_with_replay(p) for p in suite.probes] == [False, True, False]
    probes = validate_suite(suite)
    assert [len(p.items) for p in probes] == [4, 4, 2]
    assert probes[0].items == MC[:4]  # fixed subset: the first N items
    scorer = Scorer(tiny_model, tokenizer)
    results = run_suite(probes, scorer, reference="self", progress=False)
    assert [(r.name, r.kind, r.metric) for r in results] == [
        ("mc", "multiple_choice", "acc"), ("loss", "perplexity", "loss"), ("drift", "drift", "agreement")]
    assert results[1].shares_source_with_replay and results[1].sources == ["chatterbot"]
    again = run_suite(suite_dir / "suite.yaml", scorer, reference="self", limit=2, progress=False)
    assert [r.n for r in again] == [2, 2, 2]
    assert again[0].item_values == results[0].item_values[:2]  # deterministic order


def test_drift_without_reference_fails_before_running(suite_dir, tiny_model, tokenizer):
    with pytest.raises(ValueError, match="drift"):
        run_suite(suite_dir / "suite.yaml", Scorer(tiny_model, tokenizer), progress=False)


def test_unknown_key_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nprobes:\n  - name: a\n    kind: drift\n    data: d.jsonl\n    limt: 3\n")
    with pytest.raises(SuiteError) as e:
        load_suite(path)
    assert str(path) in str(e.value) and "probes[0].limt: unknown key" in str(e.value)


def test_suite_yaml_uses_12_booleans(tmp_path):
    """A probe named `no` or an option value `on` stays a string (YAML 1.1 would read booleans)."""
    path = tmp_path / "s.yaml"
    path.write_text("name: x\nprobes:\n  - {name: no, kind: drift, data: d.jsonl, options: {chat: true}}\n")
    suite = load_suite(path)
    assert suite.probes[0].name == "no" and suite.probes[0].options == {"chat": True}


@pytest.mark.parametrize("body,message", [
    ("name: x\nprobes:\n  - {name: a, kind: nope, data: d.jsonl}\n",
     "probes[0].kind: unknown probe kind 'nope'"),
    ("name: x\nprobes:\n  - {name: a, kind: drift}\n", "exactly one of 'data'"),
    ("name: x\nprobes: []\n", "probes"),
    ("name: x\nprobes:\n" + "  - {name: a, kind: drift, data: d.jsonl}\n" * 2,
     "duplicate probe name 'a'"),
    ("- just a list\n", "expected a mapping"),
    ("name: [unclosed\n", "invalid YAML"),
])
def test_bad_suites_are_reported(tmp_path, body, message):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(SuiteError, match=None) as e:
        load_suite(path)
    assert message in str(e.value) and str(path) in str(e.value)


HEAD = "name: x\nprobes:\n  - {name: mc, kind: multiple_choice, "


def test_bad_item_and_option_are_reported_before_any_model(tmp_path):
    write_jsonl(tmp_path / "mc.jsonl", [MC[0], {**MC[1], "gold": 7}])
    (tmp_path / "s.yaml").write_text(HEAD + "data: mc.jsonl}\n")
    with pytest.raises(SuiteError, match=r"probes\[0\] \(mc\): .*mc.jsonl:2: field 'gold'"):
        validate_suite(tmp_path / "s.yaml")
    write_jsonl(tmp_path / "mc.jsonl", MC)
    (tmp_path / "s.yaml").write_text(HEAD + "data: mc.jsonl, options: {delim: ' '}}\n")
    with pytest.raises(SuiteError, match=r"options: .*unknown option 'delim'"):
        validate_suite(tmp_path / "s.yaml")
    (tmp_path / "s.yaml").write_text(HEAD + "data: nope.jsonl}\n")
    with pytest.raises(SuiteError, match="nope.jsonl: file not found"):
        validate_suite(tmp_path / "s.yaml")


def test_pack_and_task_references_resolve_under_tether_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TETHER_HOME", str(tmp_path / "home"))
    built = []
    monkeypatch.setattr("tether.data.builtin.pack.ensure_pack",
                        lambda name: built.append(name) or tmp_path / "home" / "data" / name)
    write_jsonl(tmp_path / "home" / "data" / "toy-v1" / "mc.jsonl", MC)
    suite = SuiteSpec.from_probes([{"name": "mc", "kind": "multiple_choice", "data": "pack://toy-v1/mc.jsonl"}])
    assert suite.resolve("pack://toy-v1/mc.jsonl") == tmp_path / "home" / "data" / "toy-v1" / "mc.jsonl"
    assert len(validate_suite(suite)[0].items) == len(MC) and built == ["toy-v1", "toy-v1"]
    with pytest.raises(SuiteError, match="pack://NAME/FILE"):
        suite.resolve("pack://toy-v1")
    with pytest.raises(SuiteError, match="no such file in pack toy-v1"):
        suite.resolve("pack://toy-v1/nope.jsonl")
    # a built-in task's files work as probe data too (e.g. a task's held-out items as a generation probe)
    monkeypatch.setattr("tether.data.builtin.tasks.ensure_task", lambda name: tmp_path / "home" / "data" / name)
    task_eval = tmp_path / "home" / "data" / "fortune-topics" / "eval.jsonl"
    write_jsonl(task_eval, MC)
    assert suite.resolve("task://fortune-topics/eval.jsonl") == task_eval
    with pytest.raises(SuiteError, match="unknown task 'nope'"):
        suite.resolve("task://nope/eval.jsonl")


def test_from_probes_with_inline_items(tiny_model, tokenizer):
    suite = SuiteSpec.from_probes([ProbeSpec(name="mc", kind="multiple_choice", items=MC, limit=3),
                                   {"name": "gen", "kind": "generation",
                                    "items": [{"prompt": "Hi", "answers": ["hello"]}],
                                    "options": {"max_new_tokens": 2}}], name="mine")
    results = run_suite(suite, Scorer(tiny_model, tokenizer), progress=False)
    assert [r.n for r in results] == [3, 1]
    with pytest.raises(SuiteError, match="<python>: probes"):
        SuiteSpec.from_probes([{"name": "mc", "kind": "multiple_choice"}])


def test_builtin_suites_parse():
    names = builtin_suites()
    assert "general" in names
    for name in names:
        suite = load_suite(name)
        assert suite.probes and all(p.data or p.items for p in suite.probes)
    with pytest.raises(SuiteError, match="built-in"):
        load_suite("no-such-suite")


@pytest.mark.pack
@pytest.mark.slow
@pytest.mark.parametrize("name", ["general", "general-quick"])
def test_builtin_suites_validate_against_the_pack(name):
    probes = validate_suite(name)
    assert all(p.items for p in probes)
