"""Resume after SIGKILL: a real training process is killed mid-run, resumed, and ends where the
uninterrupted run ends, bit for bit on CPU (weights, scores, guard history, realised replay ratio)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

# the CLI, with a callback that kills the process (SIGKILL: no cleanup, no status written) at a step
KILLER = """
import os, signal, sys
from transformers import TrainerCallback
import tether.training.trainer as T

class Kill(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == int(os.environ["KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)

init = T.TetherTrainer.__init__
def patched(self, *a, **k):
    init(self, *a, **k)
    self.add_callback(Kill())
T.TetherTrainer.__init__ = patched
from tether.cli import app
app(sys.argv[1:], prog_name="tether")
"""

CASES = {
    "lora-mssr-lwf-ewc-guard": {"lora": {"r": 4}, "replay": {"ratio": 0.25, "schedule": "mssr"},
                                "lwf": {"on": "inputs"}, "ewc": {"fisher_samples": 4}},
    "full-replay-freeze-guard-adapt": {"full": {}, "replay": {"ratio": 0.25}, "freeze": {"fraction": 0.5}},
}


def _cli(args, env, kill_at=None):
    env = {**os.environ, **env, "OMP_NUM_THREADS": "1"}
    code = ["-c", KILLER] if kill_at else ["-m", "tether.cli"]
    if kill_at:
        env["KILL_AT"] = str(kill_at)
    return subprocess.run([sys.executable, *code, *args], capture_output=True, text=True, env=env, timeout=600)


def _recipe(tmp_path, tiny_model_dir, tiny_task, tiny_suite, methods, action):
    lr = 0.2 if action == "adapt" else 1e-3  # high enough that the guard adapts at step 2, before the kill
    recipe = {"model": {"name": str(tiny_model_dir)},
              "task": {"train": str(tiny_task[0]), "eval": str(tiny_task[1]), "max_new_tokens": 4},
              "general": str(tiny_suite), "methods": methods,
              "training": {"max_steps": 8, "batch_size": 4, "lr": lr, "logging_steps": 1, "save_steps": 2},
              "guard": {"suite": str(tiny_suite), "every": 2, "action": action, "threshold": 0.01}}
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe))
    return str(path)


def _comparable(run):
    s = json.loads((run / "summary.json").read_text())
    s.pop("run_dir"), s.pop("seconds")
    for e in (s["guard"] or {}).get("events", []):
        e.pop("seconds")
    return s


@pytest.mark.parametrize("case", list(CASES))
def test_a_killed_run_resumes_to_the_uninterrupted_result(case, tmp_path, tiny_model_dir, tiny_task, tiny_suite):
    action = "warn" if case.startswith("lora") else "adapt"
    recipe = _recipe(tmp_path, tiny_model_dir, tiny_task, tiny_suite, CASES[case], action)
    env = {"TETHER_HOME": str(tmp_path / "home")}
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    r = _cli(["train", recipe, "-o", str(whole)], env)
    assert r.returncode == 0, r.stderr[-3000:]

    r = _cli(["train", recipe, "-o", str(cut)], env, kill_at=5)
    assert r.returncode == -signal.SIGKILL
    assert json.loads((cut / "status.json").read_text())["state"] == "running"  # nothing wrote "failed"
    assert (cut / "checkpoints" / "checkpoint-4" / "tether_state.pt").exists()
    r = _cli(["train", "--resume", str(cut)], env)
    assert r.returncode == 0, r.stderr[-3000:]

    summary = _comparable(cut)
    assert summary == _comparable(whole)
    if action == "adapt":  # the guard raised the replay ratio before the kill: the resumed plan must follow
        assert any(e["action"] == "adapt" and e["step"] <= 4 for e in summary["guard"]["events"])
    assert json.loads((cut / "status.json").read_text())["state"] == "finished"
    for name in ("adapter_model.safetensors", "model.safetensors"):
        if (whole / "model" / name).exists():
            a, b = load_file(whole / "model" / name), load_file(cut / "model" / name)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            break
    else:
        raise AssertionError("no saved weights")
    # the logs hold each step once, as the uninterrupted run's do: steps 1-4 from the killed process, 5-8
    # from the resumed one (a resumed run that started over would have logged 1-8 again)
    steps = [json.loads(x)["step"] for x in (cut / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == list(range(1, 9))
    assert len((cut / "guard.jsonl").read_text().splitlines()) == len((whole / "guard.jsonl").read_text().splitlines())


def test_resume_refuses_what_it_cannot_continue(tmp_path, tiny_model_dir, tiny_task, tiny_suite):
    from typer.testing import CliRunner

    from tether.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["train", "--resume", str(tmp_path)])
    assert r.exit_code == 2 and "no recipe.yaml here" in r.output
    (tmp_path / "recipe.yaml").write_text(_recipe_text(tiny_model_dir, tiny_task, tiny_suite))
    (tmp_path / "probes_base.json").write_text("{}")
    r = runner.invoke(app, ["train", "--resume", str(tmp_path)])
    assert r.exit_code == 2 and "no complete checkpoint to resume from" in r.output
    r = runner.invoke(app, ["train", "--resume", str(tmp_path), "--set", "lora.r=2"])
    assert r.exit_code == 2 and "give RUN_DIR alone" in r.output


def _recipe_text(tiny_model_dir, tiny_task, tiny_suite):
    return json.dumps({"model": {"name": str(tiny_model_dir)}, "task": {"train": str(tiny_task[0])},
                       "general": str(tiny_suite), "methods": {"lora": {"r": 4}}})


def test_a_full_disk_fails_the_run_cleanly_and_resume_finishes_it(tmp_path, tiny_model_dir, tiny_task, tiny_suite,
                                                                 monkeypatch):
    """ENOSPC while writing the summary: the half-written file never replaces anything, the run is
    marked failed with the reason, its checkpoints stay; once there is room, --resume finishes it."""
    import errno
    import pathlib

    from tether.config import load_recipe
    from tether.io import write_json
    from tether.training.run import Run, train

    recipe = json.loads(_recipe_text(tiny_model_dir, tiny_task, tiny_suite))
    recipe["task"]["eval"] = str(tiny_task[1])
    recipe.update(training={"max_steps": 4, "batch_size": 4, "lr": 1e-3, "logging_steps": 1, "save_steps": 2},
                  guard={"suite": str(tiny_suite), "every": 2, "action": "warn"})
    whole = train(load_recipe(None, **recipe, output_dir=str(tmp_path / "whole")))

    original = pathlib.Path.write_text

    def disk_full(self, data, *args, **kwargs):
        if self.name.startswith((".summary.json.", ".kept.json.")):
            original(self, data[: len(data) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, data, *args, **kwargs)

    kept = tmp_path / "kept.json"
    write_json(kept, {"a": 1})
    monkeypatch.setattr(pathlib.Path, "write_text", disk_full)
    with pytest.raises(OSError):
        write_json(kept, {"a": 2, "b": list(range(100))})
    assert json.loads(kept.read_text()) == {"a": 1}  # the previous state, whole

    cut = tmp_path / "cut"
    with pytest.raises(OSError, match="No space left"):
        train(load_recipe(None, **recipe, output_dir=str(cut)))
    status = json.loads((cut / "status.json").read_text())
    assert status["state"] == "failed" and "No space left on device" in status["error"]
    assert not (cut / "summary.json").exists() and not list(cut.glob(".*.tmp"))
    monkeypatch.setattr(pathlib.Path, "write_text", original)
    resumed = Run.resume(cut).execute()
    strip = lambda s: {k: v for k, v in s.items() if k not in ("run_dir", "seconds", "guard")}  # noqa: E731
    assert strip(resumed.summary) == strip(whole.summary)
    assert [e["step"] for e in resumed.summary["guard"]["events"]] == [2, 4]
    assert json.loads((cut / "status.json").read_text())["state"] == "finished"
