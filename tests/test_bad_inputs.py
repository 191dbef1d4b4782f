"""Bad command-line input stops before any work, in one line with exit code 2."""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

from tether.cli import app

runner = CliRunner()


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model is the expensive step every check must come before."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr("tether.models.load", refuse)


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_eval_limit_below_one_is_refused(tiny_suite, no_model, limit):
    msg = one_line_error(runner.invoke(app, ["eval", "-m", "whatever", "-s", str(tiny_suite), "--limit", limit]))
    assert "limit" in msg and ">= 1" in msg


@pytest.mark.parametrize("where", ["proc", "dir", "file-parent"])
def test_eval_output_that_cannot_be_written_is_refused_before_scoring(tiny_suite, tmp_path, no_model, where):
    if where == "proc" and not os.path.isdir("/proc/self"):
        pytest.skip("no /proc here")
    target = {"proc": "/proc/x.json", "dir": str(tmp_path),
              "file-parent": str(tmp_path / "a-file" / "x.json")}[where]
    (tmp_path / "a-file").write_text("")
    for cmd in (["eval", "-m", "m"], ["eval", "--base", "a", "--tuned", "b"]):
        msg = one_line_error(runner.invoke(app, [*cmd, "-s", str(tiny_suite), "-o", target]))
        assert target.split("/")[-1] in msg or target in msg


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_eval_output_without_permission_is_refused(tiny_suite, tmp_path, no_model):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    msg = one_line_error(runner.invoke(app, ["eval", "-m", "m", "-s", str(tiny_suite), "-o", str(locked / "x.json")]))
    assert "permission" in msg


@pytest.mark.parametrize("args, word", [
    (["--alphas", "0,1.5,-2"], "alphas"),
    (["--budget", "-1"], "budget"),
    (["--budget", "0"], "budget"),
    (["--limit", "0"], "limit"),
])
def test_interpolate_settings_checked_before_loading(tiny_suite, tmp_path, no_model, args, word):
    msg = one_line_error(runner.invoke(app, ["interpolate", "--base", "a", "--tuned", str(tmp_path), "-s",
                                             str(tiny_suite), "-o", str(tmp_path / "out"), *args]))
    assert word in msg
    assert not (tmp_path / "out").exists()  # nothing written for a run that did not start


def test_task_or_recipe_that_is_a_directory(tmp_path, no_model):
    msg = one_line_error(runner.invoke(app, ["train", "--task", str(tmp_path), "-o", str(tmp_path / "r")]))
    assert "is a directory" in msg and str(tmp_path) in msg
    msg = one_line_error(runner.invoke(app, ["train", str(tmp_path), "-o", str(tmp_path / "r")]))
    assert "is a directory" in msg


def test_unknown_method_in_set_names_the_known_ones(tmp_path, tiny_task, no_model):
    msg = one_line_error(runner.invoke(app, ["train", "--task", str(tiny_task[0]), "--set", "dora.r=8",
                                             "-o", str(tmp_path / "r")]))
    assert "'dora'" in msg and "known method" in msg and "lora" in msg
    msg = one_line_error(runner.invoke(app, ["train", "--task", str(tiny_task[0]), "--set", "methods.dora.r=8",
                                             "-o", str(tmp_path / "r")]))
    assert "unknown method 'dora'" in msg


def test_recipe_that_is_not_utf8(tmp_path, no_model):
    bad = tmp_path / "recipe.yaml"
    bad.write_bytes("model: {name: caf\xe9}\n".encode("latin-1"))
    msg = one_line_error(runner.invoke(app, ["train", str(bad), "-o", str(tmp_path / "r")]))
    assert "recipe.yaml" in msg and "UTF-8" in msg


def test_missing_local_model_path_and_offline_hub(monkeypatch):
    from tether.models import ModelNotAvailable, resolve

    with pytest.raises(ModelNotAvailable, match="no such model directory"):
        resolve("/no/such/model")
    with pytest.raises(ModelNotAvailable, match="no such model directory"):
        resolve("runs/nothing/model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailable, match="offline"):
        resolve("some-org/some-model-nobody-cached")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert resolve("some-org/some-model-nobody-cached") == "some-org/some-model-nobody-cached"  # online: the hub's


def test_skip_invalid_skips_and_counts_bad_records(tmp_path, tiny_model_dir, tiny_task, tiny_suite):
    """`task.skip_invalid: true` trains on the good records and lists the bad ones in the summary."""
    import json as _json

    from tether.config import load_recipe
    from tether.training.run import train

    rows = [_json.loads(x) for x in tiny_task[0].read_text().splitlines()]
    bad = tmp_path / "mixed.jsonl"
    lines = [_json.dumps(r) for r in rows]
    lines.insert(3, _json.dumps({"prompt": "no completion here"}))
    lines.insert(6, "{not json")
    bad.write_text("\n".join(lines) + "\n")
    kw = dict(model={"name": str(tiny_model_dir)}, general=str(tiny_suite), methods={"lora": {"r": 4}},
              training={"max_steps": 1, "batch_size": 4}, guard={"enabled": False})
    with pytest.raises(Exception, match=r"mixed\.jsonl:7"):  # not asked to skip: reading stops at line 7
        train(load_recipe(None, task={"train": str(bad)}, output_dir=str(tmp_path / "a"), **kw))
    with pytest.raises(Exception, match=r"mixed\.jsonl:7: invalid JSON"):  # unreadable JSON is never skipped
        train(load_recipe(None, task={"train": str(bad), "skip_invalid": True}, output_dir=str(tmp_path / "b"), **kw))
    lines.pop(6)
    bad.write_text("\n".join(lines) + "\n")
    s = train(load_recipe(None, task={"train": str(bad), "skip_invalid": True}, output_dir=str(tmp_path / "c"),
                          **kw)).summary
    assert len(s["skipped_records"]) == 1 and "mixed.jsonl:4" in s["skipped_records"][0]


def test_unreachable_hub_is_one_line_in_seconds(monkeypatch):
    import socket
    import time

    from tether import models

    def no_route(*args, **kwargs):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(socket, "create_connection", no_route)
    t0 = time.perf_counter()
    with pytest.raises(models.ModelNotAvailable, match=r"some-org/uncached: .*cannot be reached \(Network is "
                                                        r"unreachable\).*HF_HUB_OFFLINE=1"):
        models.load("some-org/uncached")
    assert time.perf_counter() - t0 < 5
