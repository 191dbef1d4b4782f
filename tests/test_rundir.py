"""Run directories: checked before written, never overwritten unasked, locked, marked failed or finished."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tether.cli import app
from tether.config import load_recipe
from tether.training.run import train
from tether.training.rundir import RunDirError, claim, default_run_dir, read_status

runner = CliRunner()


def tiny_recipe(tmp_path, tiny_model_dir, tiny_task, tiny_suite, out, methods=None, **fields):
    return load_recipe(None, model={"name": str(tiny_model_dir)},
                       task={"train": str(tiny_task[0]), "eval": str(tiny_task[1]), "max_new_tokens": 4},
                       general=str(tiny_suite), methods=methods or {"lora": {"r": 4}},
                       training={"max_steps": 2, "batch_size": 4, "logging_steps": 1, "lr": 1e-3},
                       guard={"enabled": False}, output_dir=str(out) if out else None, **fields)


def finished_run(path):
    """A directory that looks like a finished run, with a file the next run must not delete."""
    path.mkdir(parents=True)
    (path / "recipe.yaml").write_text("old: recipe\n")
    (path / "metrics.jsonl").write_text('{"step": 1}\n')
    (path / "guard.jsonl").write_text('{"step": 1}\n')
    (path / "summary.json").write_text("{}")
    (path / "plots").mkdir()
    (path / "plots" / "old.png").write_text("x")
    (path / "status.json").write_text(json.dumps({"state": "finished"}))
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def test_failed_rerun_leaves_a_finished_run_untouched_and_writes_nothing(tmp_path, tiny_task, tiny_suite,
                                                                          monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}\n')
    sent = tmp_path / "runs" / "sent"
    before = finished_run(sent)
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["train", "--task", str(bad), "-o", str(sent), "--set", f"general={tiny_suite}"])
    assert r.exit_code == 2 and "bad.jsonl:1" in r.output
    after = {p.relative_to(sent).as_posix(): p.read_bytes() for p in sent.rglob("*") if p.is_file()}
    assert after == before
    r = runner.invoke(app, ["train", "--task", str(bad), "--set", f"general={tiny_suite}"])  # default directory
    assert r.exit_code == 2 and sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["sent"]


def test_rerun_into_a_finished_run_is_refused_unless_overwrite(tmp_path, tiny_model_dir, tiny_task, tiny_suite):
    out = tmp_path / "run"
    before = finished_run(out)
    with pytest.raises(RunDirError, match="holds a finished run.*--overwrite"):
        train(tiny_recipe(tmp_path, tiny_model_dir, tiny_task, tiny_suite, out))
    assert {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    result = train(tiny_recipe(tmp_path, tiny_model_dir, tiny_task, tiny_suite, out), overwrite=True)
    assert not (out / "plots" / "old.png").exists()  # the old run's files are gone, not mixed in
    assert "old: recipe" not in (out / "recipe.yaml").read_text()
    assert read_status(out)["state"] == "finished" and result.summary["steps"] == 2


def test_default_directory_is_new_for_every_run(tmp_path, tiny_model_dir, tiny_task, tiny_suite, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = train(tiny_recipe(tmp_path, tiny_model_dir, tiny_task, tiny_suite, None)).run_dir
    b = train(tiny_recipe(tmp_path, tiny_model_dir, tiny_task, tiny_suite, None)).run_dir
    assert a != b and a.resolve().parent == b.resolve().parent == (tmp_path / "runs").resolve()
    assert a.name.startswith("train-") and (a / "summary.json").exists() and (b / "summary.json").exists()
    assert "output_dir: runs/train-" in (a / "recipe.yaml").read_text()  # the resolved directory is recorded
    assert default_run_dir("data/tickets v2.jsonl").startswith("runs/tickets-v2-")


def test_a_second_run_into_a_directory_in_use_is_refused(tmp_path):
    with claim(tmp_path / "run"):
        with pytest.raises(RunDirError, match="another run is writing"):
            with claim(tmp_path / "run", overwrite=True):
                pass
    with claim(tmp_path / "other"):  # the lock is per directory, and released after use
        pass


def test_a_failed_run_is_marked_and_report_refuses_it(tmp_path, tiny_model_dir, tiny_task, tiny_suite,
                                                      monkeypatch):
    from tether.training import run

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(run.Run, "train_task", boom)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError):
        train(tiny_recipe(tmp_path, tiny_model_dir, tiny_task, tiny_suite, out))
    status = read_status(out)
    assert status["state"] == "failed" and status["error"] == "RuntimeError: disk on fire"
    r = runner.invoke(app, ["report", str(out)])
    assert r.exit_code == 2 and "failed" in r.output and "disk on fire" in r.output
    assert not (out / "report.html").exists()


def test_other_ranks_wait_for_the_main_process_and_write_nothing(tmp_path, monkeypatch):
    import threading
    import time

    from tether.training import rundir

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "launch-1")
    run = tmp_path / "run"
    finished_run(run)  # an older run: rank 1 must not take its status for this launch's
    entered = []

    def rank1():
        monkeypatch.setenv("RANK", "1")  # env is process-wide: set before rank 0 starts below
        with claim(run):
            entered.append(time.time())

    t = threading.Thread(target=rank1)
    monkeypatch.setenv("RANK", "1")
    t.start()
    time.sleep(0.5)
    assert not entered  # still waiting: the directory holds another run's status
    monkeypatch.setenv("RANK", "0")
    with claim(run, overwrite=True):
        t.join(timeout=10)
        assert entered and read_status(run)["run_id"] == "launch-1"
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(RunDirError, match="did not take the run directory"):
        rundir._wait_for_main(tmp_path / "never", timeout=0.3)


def test_saved_adapter_names_its_base_as_the_recipe_did(tmp_path, tiny_model_dir, tiny_task, tiny_suite,
                                                        monkeypatch):
    """Not this machine's cache path: the alias (or hub id) the recipe gave, which loads anywhere."""
    from tether import models

    monkeypatch.setitem(models.EMBEDDED, "tiny-alias", models.EMBEDDED[next(iter(models.EMBEDDED))])
    real = models.embedded_path
    monkeypatch.setattr(models, "embedded_path", lambda name: tiny_model_dir if name == "tiny-alias" else real(name))
    out = tmp_path / "run"
    r = tiny_recipe(tmp_path, tiny_model_dir, tiny_task, tiny_suite, out)
    train(r.model_copy(update={"model": r.model.model_copy(update={"name": "tiny-alias"})}))
    cfg = json.loads((out / "model" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "tiny-alias"
    model, _ = models.load(out / "model")
    assert models.is_peft_model(model)


def test_a_loss_that_is_not_a_number_stops_the_run_before_the_update(tmp_path, tiny_model_dir, tiny_task,
                                                                     tiny_suite, monkeypatch):
    from tether.training import trainer as T

    real = T._check_finite
    seen = {}

    def poisoned(loss, terms, step, output_dir):  # the loss turns NaN at the third step
        seen.setdefault("steps", []).append(step)
        return real(loss * float("nan") if step == 2 else loss, terms, step, output_dir)

    monkeypatch.setattr(T, "_check_finite", poisoned)
    out = tmp_path / "run"
    r = tiny_recipe(tmp_path, tiny_model_dir, tiny_task, tiny_suite, out)
    r = r.model_copy(update={"training": r.training.model_copy(update={"max_steps": 5})})
    with pytest.raises(T.TrainingDiverged, match=r"step 3: loss is nan \(the task loss\); stopped before the update"):
        train(r)
    assert seen["steps"] == [0, 1, 2] and read_status(out)["state"] == "failed"
    assert "TrainingDiverged" in read_status(out)["error"]


def test_the_same_seed_twice_gives_the_same_summary(tmp_path, tiny_model_dir, tiny_task, tiny_suite):
    """On CPU a run is a function of its recipe and seed: every number of the summary repeats exactly;
    only where it ran and how long it took differ."""
    runs = []
    for name in ("a", "b"):
        r = tiny_recipe(tmp_path, tiny_model_dir, tiny_task, tiny_suite, tmp_path / name,
                        methods={"lora": {"r": 4}, "replay": {"ratio": 0.25}, "lwf": {}})
        runs.append(json.loads((train(r).run_dir / "summary.json").read_text()))
    timing = {"run_dir", "seconds"}
    assert {k: v for k, v in runs[0].items() if k not in timing} == {k: v for k, v in runs[1].items()
                                                                       if k not in timing}
