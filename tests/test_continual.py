"""`tether continual` end to end on a tiny model: a two-task sequence fills the matrix and metrics."""

from __future__ import annotations

import json

import pytest

from tether.config import RecipeError, load_sequence
from tether.report.continual import render_continual
from tether.training.run import run_continual


@pytest.mark.parametrize("methods", [{"full": {}, "replay": {"ratio": 0.25}, "ewc": {"fisher_samples": 4}},
                                     {"olora": {"r": 2, "target_modules": ["q_proj", "v_proj"]}}])
def test_two_task_sequence(tmp_path, tiny_model_dir, tiny_suite, two_tasks, methods):
    seq = load_sequence(None, model={"name": str(tiny_model_dir)}, tasks=two_tasks, general=str(tiny_suite),
                        methods=methods, memory_per_task=4, output_dir=str(tmp_path / "run"),
                        training={"max_steps": 2, "batch_size": 4, "lr": 1e-3, "logging_steps": 1})
    out = run_continual(seq)
    assert out["tasks"] == ["colour", "size"] and len(out["matrix"]) == 2 and all(len(r) == 2 for r in out["matrix"])
    m = out["metrics"]
    R = out["matrix"]
    assert m["acc"] == pytest.approx(sum(R[1]) / 2)
    assert m["bwt"] == pytest.approx(R[1][0] - R[0][0])
    assert m["fwt"] == pytest.approx(R[0][1] - out["base"][1])
    assert len(out["general"]) == 2 and len(out["general"][0]) == len(out["general_probes"]) == 4
    for i, drops in enumerate(out["general_drop"]):  # the general row: minus the mean relative drop
        assert m["general_change"][i] == pytest.approx(-sum(drops) / len(drops))
    saved = json.loads((tmp_path / "run" / "continual.json").read_text())
    assert saved["matrix"] == R
    assert (tmp_path / "run" / "plots" / "accuracy_matrix.png").exists()
    logs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {x["task"] for x in logs} == {0, 1}
    tables = render_continual(out)
    assert len(tables) == 2
    if "olora" in methods:
        assert out["method_metrics"]["olora"]["n_adapters"] == 2


def test_multitask_upper_bound(tmp_path, tiny_model_dir, tiny_suite, two_tasks):
    seq = load_sequence(None, model={"name": str(tiny_model_dir)}, tasks=two_tasks, general=str(tiny_suite),
                        multitask=True, output_dir=str(tmp_path / "mt"),
                        training={"max_steps": 2, "batch_size": 4, "logging_steps": 1})
    out = run_continual(seq)
    assert len(out["matrix"]) == 1 and out["metrics"]["acc"] == pytest.approx(sum(out["matrix"][0]) / 2)


def test_sequence_validation(tmp_path, two_tasks):
    with pytest.raises(RecipeError, match="at least two tasks"):
        load_sequence(None, tasks=two_tasks[:1])
    with pytest.raises(RecipeError, match="unique"):
        load_sequence(None, tasks=[two_tasks[0], two_tasks[0]])
    with pytest.raises(RecipeError, match="unknown method"):
        load_sequence(None, tasks=two_tasks, methods={"nope": {}})


def test_sequence_yaml_with_relative_paths_and_overrides(tmp_path, two_tasks):
    import shutil

    for t in two_tasks:
        for key in ("train", "eval"):
            shutil.copy(t[key], tmp_path / f"{t['name']}_{key}.jsonl")
    p = tmp_path / "seq.yaml"
    p.write_text("tasks:\n" + "".join(f"  - {{name: {t['name']}, train: {t['name']}_train.jsonl, "
                                      f"eval: {t['name']}_eval.jsonl}}\n" for t in two_tasks)
                 + "methods: {full: {}, ewc: {lambda: 10}}\n")
    seq = load_sequence(p, ["training.max_steps=3", "ewc.gamma=0.9"])
    assert seq.tasks[0].train == str(tmp_path / "colour_train.jsonl")
    assert seq.training.max_steps == 3 and seq.methods["ewc"] == {"lambda": 10, "gamma": 0.9}
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [1\n")
    with pytest.raises(RecipeError, match=r"bad.yaml:\d+: invalid YAML"):
        load_sequence(bad)


@pytest.mark.pack
def test_shipped_benchmark_sequence_validates():
    """examples/continual-formats.yaml (the benchmark's sequence) loads, and its task:// data resolves."""
    from pathlib import Path

    from tether.data.builtin.uri import resolve
    from tether.data.readers import read_records

    seq = load_sequence(Path(__file__).parents[1] / "examples" / "continual-formats.yaml")
    assert [t.name for t in seq.tasks] == ["quotes", "foldoc", "stdlib"] and "olora" in seq.methods
    for t in seq.tasks:
        assert len(read_records(resolve(t.eval))) == 100


def test_sequence_run_directory_is_checked_first_and_never_overwritten_unasked(tmp_path, tiny_model_dir, tiny_suite,
                                                                                two_tasks, monkeypatch):
    from tether.training.rundir import RunDirError, read_status

    kw = dict(model={"name": str(tiny_model_dir)}, general=str(tiny_suite), memory_per_task=4,
              training={"max_steps": 1, "batch_size": 4, "logging_steps": 1})
    bad = [dict(two_tasks[0]), two_tasks[1]]
    bad[0]["train"] = str(tmp_path / "missing.jsonl")
    with pytest.raises(Exception, match="missing.jsonl"):
        run_continual(load_sequence(None, tasks=bad, output_dir=str(tmp_path / "never"), **kw))
    assert not (tmp_path / "never").exists()  # nothing written for a sequence that did not start
    run = tmp_path / "run"
    run_continual(load_sequence(None, tasks=two_tasks, output_dir=str(run), **kw))
    assert read_status(run)["state"] == "finished" and read_status(run)["kind"] == "continual"
    before = (run / "continual.json").read_bytes()
    with pytest.raises(RunDirError, match="holds a finished run"):
        run_continual(load_sequence(None, tasks=two_tasks, output_dir=str(run), **kw))
    assert (run / "continual.json").read_bytes() == before
    monkeypatch.chdir(tmp_path)
    out = run_continual(load_sequence(None, tasks=two_tasks, **kw))  # no output_dir: a new directory
    assert out["tasks"] == ["colour", "size"]
    assert [p.name.startswith("colour-sequence-") for p in (tmp_path / "runs").iterdir()
            if not p.name.startswith(".")] == [True]  # beside it only its lock file, hidden
