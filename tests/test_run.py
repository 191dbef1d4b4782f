"""The run driver: one recipe object for a task and a sequence; methods known only by what they declare."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from tether.config import RecipeError, load_recipe, load_sequence
from tether.registry import METHODS
from tether.training import run as run_mod


def test_a_sequence_gets_the_guard_and_the_saved_model(tmp_path, tiny_model_dir, tiny_suite, two_tasks):
    """`continual` runs through the same driver as `train`: the guard checks every task against the
    base, the trained adapter is saved, and the resolved recipe is written, as for a single run."""
    seq = load_sequence(None, model={"name": str(tiny_model_dir)}, tasks=two_tasks, general=str(tiny_suite),
                        methods={"lora": {"r": 2, "target_modules": ["q_proj", "v_proj"]}, "replay": {"ratio": 0.25}},
                        guard={"enabled": True, "suite": str(tiny_suite), "every": 1, "action": "warn"},
                        memory_per_task=2, output_dir=str(tmp_path / "run"),
                        training={"max_steps": 2, "batch_size": 4, "lr": 1e-3, "logging_steps": 1})
    out = run_mod.run_continual(seq)
    run = tmp_path / "run"
    assert [g["checks"] for g in out["guard"]] == [2, 2]  # every step of each task, against the base
    assert (run / "model" / "adapter_config.json").exists()
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    events = [json.loads(x) for x in (run / "guard.jsonl").read_text().splitlines()]
    assert len(events) == 4
    resolved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert resolved["methods"]["replay"]["ratio"] == 0.25 and "balance_loss" in resolved["methods"]["replay"]


def test_the_resolved_recipe_holds_every_methods_defaults():
    from tether.config import dump_recipe

    r = load_recipe(None, task={"train": "x.jsonl"}, methods={"lora": {"r": 4}, "ewc": {}})
    methods = yaml.safe_load(dump_recipe(r))["methods"]
    assert methods["lora"]["r"] == 4 and set(methods["lora"]) == set(METHODS.get("lora").config_class.model_fields)
    fields = METHODS.get("ewc").config_class.model_fields
    assert set(methods["ewc"]) == {f.alias or n for n, f in fields.items()} and "lambda" in methods["ewc"]
    again = load_recipe(None, task={"train": "x.jsonl"}, methods=methods)  # and reads back the same
    assert again.method_configs() == r.method_configs()


def test_methods_are_ordered_by_what_they_declare():
    r = load_recipe(None, task={"train": "x.jsonl"}, methods={"freeze": {}, "replay": {}, "lora": {}})
    assert list(r.build_methods()) == ["lora", "freeze", "replay"]
    with pytest.raises(RecipeError, match="choose one of 'full' and 'lora'"):
        load_recipe(None, task={"train": "x.jsonl"}, methods={"full": {}, "lora": {}})


def test_replay_data_is_its_own_setting(tmp_path, tiny_task, tiny_suite, monkeypatch):
    """What is replayed is apart from what is measured: a suite without a `replay:` section gets the
    pack's replay split by default; an explicit file wins over the suite's; none is refused up front."""
    from tether.config import DEFAULT_REPLAY_DATA
    from tether.data.builtin import uri

    seen = []
    picked = tmp_path / "r.jsonl"
    monkeypatch.setattr(uri, "resolve", lambda ref: seen.append(str(ref)) or (
        picked if str(ref) in (DEFAULT_REPLAY_DATA, "mine.jsonl") else Path(ref)))
    plain = tmp_path / "plain.yaml"
    plain.write_text("\n".join(ln for ln in tiny_suite.read_text().splitlines() if not ln.startswith("replay"))
                     .replace("data: ", f"data: {tiny_suite.parent}/"))
    task = {"train": str(tiny_task[0])}
    run = run_mod.Run(load_recipe(None, task=task, general=str(plain), guard={"enabled": False}))
    assert DEFAULT_REPLAY_DATA in seen and run.replay_path == picked
    own = run_mod.Run(load_recipe(None, task=task, general=str(tiny_suite), guard={"enabled": False}))
    assert own.replay_path == tiny_suite.parent / "replay.jsonl"
    mine = run_mod.Run(load_recipe(None, task=task, general=str(tiny_suite), guard={"enabled": False},
                                   replay_data="mine.jsonl"))
    assert seen[-1] == "mine.jsonl" and mine.replay_path == picked
    naive = run_mod.Run(load_recipe(None, task=task, general=str(plain), methods={"full": {}}, replay_data=None,
                                    guard={"enabled": False}))
    assert naive.replay_path is None  # nothing needs general data: nothing is read
    with pytest.raises(RecipeError, match="replay_data: none, and lora and replay need general data"):
        run_mod.Run(load_recipe(None, task=task, general=str(tiny_suite), replay_data="none", guard={"enabled": False}))


def test_listing_methods_imports_no_torch():
    code = "import sys; from tether.registry import METHODS; print(METHODS.names(), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "'ewc'" in out and "'oplora'" in out and out.strip().endswith("False")


def test_a_new_method_is_one_file(tmp_path, monkeypatch):
    """A method from the user's own module, registered lazily as ``module:Class``: recipes validate it,
    the driver orders and builds it, and nothing else in tether names it."""
    (tmp_path / "my_method.py").write_text(textwrap.dedent('''
        from pydantic import BaseModel
        from tether.methods.base import Method

        class ScaleConfig(BaseModel):
            factor: float = 2.0

        class Scale(Method):
            config_class = ScaleConfig
            order = 5

            def check(self, others):
                if "full" in others:
                    raise ValueError("methods.scale: not beside full fine-tuning")
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    METHODS.register_lazy("scale", "my_method:Scale")
    try:
        r = load_recipe(None, task={"train": "x.jsonl"}, methods={"lora": {}, "scale": {"factor": 3}})
        assert list(r.build_methods()) == ["scale", "lora"] and r.method_configs()["scale"].factor == 3
        with pytest.raises(RecipeError, match="not beside full fine-tuning"):
            load_recipe(None, task={"train": "x.jsonl"}, methods={"full": {}, "scale": {}})
        with pytest.raises(RecipeError, match="methods.scale: scale.factor"):
            load_recipe(None, task={"train": "x.jsonl"}, methods={"scale": {"factor": "big"}})
    finally:
        METHODS._lazy.pop("scale", None)
        METHODS._entries.pop("scale", None)


def test_no_file_outside_methods_names_a_method():
    """The run driver, config, trainer and CLI learn about methods only through the Method interface."""
    import re

    import tether

    root = Path(tether.__file__).parent
    names = METHODS.names()
    pattern = re.compile("[\"']({})[\"']".format("|".join(names)))
    # the layers a run flows through (data files name a "replay" split, reports a probe's replay marker)
    checked = {"training", "probes", "config.py", "registry.py", "api.py", "cli.py", "models.py", "prefix.py"}
    offenders = []
    for f in root.rglob("*.py"):
        rel = f.relative_to(root)
        if rel.parts[0] not in checked:
            continue
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if pattern.search(line) and "replay_" not in line and not line.lstrip().startswith("#"):
                offenders.append(f"{rel}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_train_limits_its_general_suite_like_eval(tiny_task, tiny_suite):
    r = load_recipe(None, task={"train": str(tiny_task[0])}, general=str(tiny_suite), general_limit=2,
                    methods={"full": {}}, guard={"enabled": False})
    assert [len(p.items) for p in run_mod.Run(r).general_probes] == [2, 2, 2, 2]
    with pytest.raises(RecipeError, match="general_limit must be a whole number of items >= 1"):
        load_recipe(None, general_limit=0)
