"""docs/bad-inputs.md stays true: every row's command is run and must fail in one line with its text."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tether.cli import app

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad-inputs.md"
ROWS = [tuple(c.strip().strip("`") for c in line.strip().strip("|").split("|"))
        for line in DOC.read_text(encoding="utf-8").splitlines()
        if line.startswith("| ") and "`tether " in line]


@pytest.fixture
def places(tmp_path, tiny_suite, tiny_task):
    (tmp_path / "dir").mkdir()
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"prompt": "ok", "completion": "a"}\n{"prompt": "caf\xe9", "completion": "b"}\n')
    badrole = tmp_path / "badrole.jsonl"
    badrole.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}\n')
    run = tmp_path / "run"
    run.mkdir()
    for name in ("recipe.yaml", "summary.json", "metrics.jsonl"):
        (run / name).write_text("{}\n")
    (run / "status.json").write_text(json.dumps({"state": "finished"}))
    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / "recipe.yaml").write_text("model: {name: x}\n")
    (failed / "status.json").write_text(json.dumps({"state": "failed", "error": "RuntimeError: disk on fire"}))
    return {"suite": tiny_suite, "task": tiny_task[0], "dir": tmp_path / "dir", "latin1": latin1,
            "badrole": badrole, "run": run, "failed": failed}


def test_the_table_has_its_rows():
    assert len(ROWS) >= 15 and all(len(r) == 3 for r in ROWS)


@pytest.mark.parametrize("what, command, expected", ROWS, ids=[r[0] for r in ROWS])
def test_each_bad_input_fails_in_one_line(what, command, expected, places, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", refuse)
    if "HF_HUB_OFFLINE" in what:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if command.startswith("tether eval") and "/proc/" in command and not Path("/proc/self").exists():
        pytest.skip("no /proc here")
    before = {p: p.read_bytes() for p in places["run"].iterdir()}
    args = [re.sub(r"\{(\w+)\}", lambda m: str(places[m.group(1)]), a) for a in shlex.split(command)[1:]]
    result = CliRunner().invoke(app, args)
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert expected in lines[0], lines[0]
    assert {p: p.read_bytes() for p in places["run"].iterdir()} == before  # a finished run is never touched
