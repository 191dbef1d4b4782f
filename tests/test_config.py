"""Recipes: defaults, YAML, overrides, and errors that name the key."""

from __future__ import annotations

import pytest

from tether.config import RecipeError, load_recipe, parse_overrides


def test_default_recipe_is_the_practical_one():
    r = load_recipe()
    assert set(r.methods) == {"lora", "replay", "lwf", "freeze"} and r.methods["lwf"]["on"] == "inputs"
    assert r.methods["replay"]["ratio"] == 0.2 and r.methods["replay"]["mode"] == "add"
    assert list(r.methods).index("freeze") > list(r.methods).index("lora")  # the bottom blocks' adapters too
    assert r.training.lr == 1e-4
    assert r.guard.enabled and r.guard.threshold == 0.05 and r.guard.action == "stop"


def test_overrides_nest_and_route_method_keys():
    assert parse_overrides(["a.b=3", "a.c=x", "d=[1, 2]"]) == {"a": {"b": 3, "c": "x"}, "d": [1, 2]}
    r = load_recipe(overrides=["lora.r=32", "training.lr=2e-4", "guard.action=warn"])
    assert r.methods["lora"]["r"] == 32 and "replay" in r.methods
    assert r.training.lr == 2e-4 and r.guard.action == "warn"
    assert "replay" not in load_recipe(overrides=["replay=false", "lwf=false"]).methods


def test_yaml_recipe_and_relative_paths(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"text": "x"}\n')
    p = tmp_path / "r.yaml"
    p.write_text("task:\n  train: t.jsonl\nmethods:\n  full:\n  ewc: {lambda_: 5}\ntraining: {max_steps: 3}\n")
    r = load_recipe(p, ["ewc.fisher_samples=8"])
    assert r.task.train == str(tmp_path / "t.jsonl")
    assert set(r.methods) == {"full", "ewc"} and r.methods["ewc"]["fisher_samples"] == 8
    assert r.training.max_steps == 3


@pytest.mark.parametrize("yaml_text, message", [
    ("training: {lr: -1}\n", "training.lr must be > 0"),
    ("training: {max_steps: 0}\n", "training.max_steps must be > 0"),
    ("trainin: {lr: 1}\n", "trainin"),
    ("methods: {nope: {}}\n", "methods.nope: unknown method"),
    ("methods: {lora: {r: 0}}\n", "lora.r"),
    ("guard: {threshold: 2}\n", "guard.threshold must be in (0, 1)"),
    ("methods: {lora: {}, full: {}}\n", "one of 'lora' and 'full'"),
    ("task: [1\n", "invalid YAML"),
])
def test_bad_recipes_name_file_and_key(tmp_path, yaml_text, message):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml_text)
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert str(e.value).startswith(str(p)) and message in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_override_format():
    with pytest.raises(RecipeError, match="expected key=value"):
        load_recipe(overrides=["lora.r"])


def test_every_shipped_recipe_and_suite_validates():
    from importlib import resources

    from tether.probes.suite import load_suite

    recipes = sorted(p for p in resources.files("tether.recipes").iterdir() if p.name.endswith(".yaml"))
    assert len(recipes) >= 4
    for p in recipes:
        r = load_recipe(p)
        load_suite(r.general)
        load_suite(r.guard.suite)
    # a shipped recipe loads by name from any directory; a path that exists wins; a typo is an error
    assert load_recipe("distil-inputs").methods == load_recipe(resources.files("tether.recipes") / "distil-inputs.yaml"
                                                                ).methods
    assert load_recipe("distil-inputs.yaml").methods["lwf"]["on"] == "inputs"
    with pytest.raises(RecipeError, match="distil-input: recipe not found"):
        load_recipe("distil-input")
    default = load_recipe(resources.files("tether.recipes") / "default.yaml")
    assert default.methods == load_recipe().methods  # `tether train --task x` runs default.yaml's methods
    assert default.methods["replay"]["ratio"] == 0.2
    assert default.methods["lora"]["r"] == 32 and default.methods["lora"]["alpha"] == 256
    assert default.methods["lora"]["init"] == "contrast"
    assert default.methods["lora"]["dropout"] == 0.0
    assert default.methods["lwf"]["on"] == "inputs" and default.methods["lwf"]["alpha"] == 20.0
    assert default.methods["replay"]["answers"] == load_recipe().methods["replay"]["answers"] == "model"
    assert default.training.lr == 1e-4 and default.guard.threshold == 0.05
    suites = sorted(p.name[:-5] for p in resources.files("tether.suites").iterdir() if p.name.endswith(".yaml"))
    assert {"general", "general-quick", "general-demo", "general-mini"} <= set(suites)
    for name in suites:
        load_suite(name)


def test_lwf_on_replay_needs_replay():
    with pytest.raises(RecipeError, match=r"methods.lwf.on: 'replay' .* replay is off"):
        load_recipe(None, ["replay=false", "lwf.on=replay"])
    with pytest.raises(RecipeError, match="replay is off"):
        load_recipe(None, ["replay.ratio=0", "lwf.on=replay"])
    assert "lwf" not in load_recipe(None, ["replay=false", "lwf=false"]).methods
    assert load_recipe(None, ["replay=false", "lwf.on=general"]).methods["lwf"]["on"] == "general"
    # the default's LwF (on: inputs) distils the task rows' prompts, so it runs without replay
    assert load_recipe(None, ["replay=false"]).methods["lwf"]["on"] == "inputs"


def test_yaml_on_off_yes_no_are_strings_not_booleans(tmp_path):
    """YAML 1.1 reads `on:` as True: `lwf: {on: task+general}` must still mean the `on` field."""
    p = tmp_path / "r.yaml"
    p.write_text("task: {train: t.jsonl}\nmethods:\n  lora: {}\n  lwf: {on: task+general}\n"
                 "guard: {enabled: no}\n")
    r = load_recipe(p, ["lwf.temperature=2.5", "replay=false"])
    assert r.methods["lwf"] == {"on": "task+general", "temperature": 2.5}
    assert r.guard.enabled is False and "replay" not in r.methods
    assert load_recipe(p, ["guard.enabled=true"]).guard.enabled is True


def test_a_file_in_the_working_directory_wins_over_a_shipped_recipe_of_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "naive.yaml").write_text("methods:\n  lora: {r: 4}\n")
    assert load_recipe("naive.yaml").methods == {"lora": {"r": 4}}
    assert load_recipe("naive").methods == {"full": {}}  # no file "naive" here: the shipped one
