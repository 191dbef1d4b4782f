"""Typed recipes: YAML -> dotted ``key=value`` overrides -> validated pydantic models.

Parse, validate, then run (torchtune's ``config.parse`` + ``validate``): every error names the
recipe key, and the resolved recipe is written next to the outputs.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .io import load_yaml
from .models import DEFAULT_MODEL


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    name: str = DEFAULT_MODEL
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class TaskSpec(_Strict):
    """The narrow task: training data, held-out evaluation data and how to score it."""

    train: str | None = None
    eval: str | None = None
    eval_kind: Literal["generation", "perplexity", "multiple_choice"] = "generation"
    eval_metric: Literal["exact_match", "contains"] = "exact_match"
    eval_limit: int | None = 200
    max_new_tokens: int = 16
    max_length: int = 512
    chat: bool | None = None  # wrap string prompt/completion in the chat template (None: if the tokenizer has one)
    skip_invalid: bool = False
    limit: int | None = None


class TrainingSpec(_Strict):
    max_steps: int = 60
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    scheduler: Literal["constant", "linear", "cosine", "constant_with_warmup"] = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    bf16: bool = False
    fp16: bool = False
    gradient_checkpointing: bool = False
    # run the prompt prefix a batch's rows share once (exact; see tether.prefix). None (auto): on a CPU,
    # where it was measured 1.26-1.5x faster; off on a GPU until measured there (true turns it on)
    share_prefix: bool | None = None
    logging_steps: int = 5
    # checkpoints (what `tether train --resume RUN_DIR` continues from): every 500 steps as HF's Trainer
    # does, the last two kept; None: none
    save_steps: int | None = 500
    save_total_limit: int | None = 2
    report_to: list[str] = Field(default_factory=lambda: ["none"])

    @field_validator("max_steps", "batch_size", "grad_accum", "logging_steps")
    @classmethod
    def _positive(cls, v: int, info) -> int:
        if v <= 0:
            raise ValueError(f"training.{info.field_name} must be > 0")
        return v

    @field_validator("lr")
    @classmethod
    def _lr(cls, v: float) -> float:
        if not v > 0:
            raise ValueError("training.lr must be > 0")
        return v


class GuardSpec(_Strict):
    """Forgetting guard: score the general probes every ``every`` steps and act on a drop."""

    enabled: bool = True
    every: int = 20
    threshold: float = 0.05
    drift_threshold: float = 0.25  # drift measures change, not lost ability: a looser bound (see probes.verdict)
    action: Literal["stop", "adapt", "warn", "recover"] = "stop"  # recover: stop once back within budget
    suite: str = "general-quick"
    probes: list[str] | None = None  # subset of the suite's probes; None = all
    limit: int | None = None  # items per probe
    task_limit: int | None = 40  # held-out task items scored at each check
    adapt_replay_step: float = 0.1
    adapt_lr_factor: float = 0.5

    @field_validator("every")
    @classmethod
    def _every(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("guard.every must be > 0")
        return v

    @field_validator("threshold")
    @classmethod
    def _thr(cls, v: float) -> float:
        if not 0 < v < 1:
            raise ValueError("guard.threshold must be in (0, 1)")
        return v


def default_methods(recipe: str = "default") -> dict[str, dict[str, Any]]:
    """The methods of a shipped recipe (``recipes/default.yaml`` for a run, ``naive.yaml`` for a
    sequence's baseline): the one place each is written down, so ``tether train --task x.jsonl`` and
    ``tether train recipes/default.yaml --task x.jsonl`` agree."""
    return copy.deepcopy(_shipped_yaml(recipe)["methods"])


@functools.cache
def _shipped_yaml(recipe: str) -> dict[str, Any]:
    from importlib import resources

    return load_yaml((resources.files("tether.recipes") / f"{recipe}.yaml").read_text(encoding="utf-8"))


#: the general data methods read (replayed into batches, EWC's Fisher, LwF's general prompts, LoRA's
#: contrast init): the probe pack's replay split, which shares no source with its knowledge probes
DEFAULT_REPLAY_DATA = "pack://general-v2/replay.jsonl"


class _RunSpec(_Strict):
    """What every run has, a single task or a sequence: model, methods, training, probes, guard."""

    model: ModelSpec = Field(default_factory=ModelSpec)
    general: str = "general"  # the probe suite measured before and after (name or YAML file)
    general_limit: int | None = None  # items per general probe (fewer: faster, wider CIs); None: all

    @field_validator("general_limit")
    @classmethod
    def _limit(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError("general_limit must be a whole number of items >= 1")
        return v
    # what is replayed is its own setting, apart from what is measured. "auto": the suite's own
    # `replay:` data if it names some, else the pack's replay split (so a suite of the user's own
    # probes still gets general data); a file or pack:// URI; null or "none": no general data
    replay_data: str | None = "auto"
    # the default recipe's methods, read from recipes/default.yaml (which says why each setting)
    methods: dict[str, dict[str, Any]] = Field(default_factory=lambda: default_methods())
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    guard: GuardSpec = Field(default_factory=GuardSpec)
    output_dir: str | None = None  # None: a new runs/<task>-<UTC time> every run
    _configs: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _check_methods(self) -> "_RunSpec":
        """Each method's typed config, built once here; then what the methods declare about each other."""
        from .registry import METHODS

        configs = {}
        for name, settings in self.methods.items():
            if name not in METHODS:
                raise ValueError(f"methods.{name}: unknown method {name!r}; known: {', '.join(METHODS.names())}")
            try:
                configs[name] = METHODS.get(name).make_config(settings)
            except ValidationError as e:
                raise ValueError(f"methods.{name}: {_first_error(e, prefix=name)}") from None
        self._configs = configs
        methods = self.build_methods()
        training = [n for n in self.methods if methods[n].trains]  # in recipe order
        if len(training) > 1:
            raise ValueError(f"methods: choose one of {' and '.join(repr(n) for n in training)} (each decides "
                             "which weights train)")
        for name, m in methods.items():
            m.check({n: o for n, o in methods.items() if n != name})
        return self

    def method_configs(self) -> dict[str, Any]:
        """Every method's typed settings, defaults filled in."""
        return dict(self._configs)

    def build_methods(self) -> dict[str, Any]:
        """Fresh method objects in model-preparation order (`Method.order`, ties in recipe order)."""
        from .registry import METHODS

        names = list(self._configs)
        ordered = sorted(names, key=lambda n: (METHODS.get(n).order, names.index(n)))
        return {n: METHODS.get(n)(self._configs[n]) for n in ordered}


class Recipe(_RunSpec):
    """A whole training run on one task. ``methods`` maps registered method names to their settings."""

    task: TaskSpec = Field(default_factory=TaskSpec)


class RecipeError(ValueError):
    """A recipe that does not validate: one line naming the file and key."""


def _first_error(e: ValidationError, prefix: str = "") -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    if prefix:
        loc = f"{prefix}.{loc}" if loc else prefix
    msg = err["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc and not msg.startswith(loc) else msg


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """``["lora.r=32", "training.lr=2e-4"]`` -> nested dict; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        value = load_yaml(raw) if raw != "" else ""
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _route_method_keys(d: dict) -> dict:
    """``lora.r=32`` is short for ``methods.lora.r=32``: top-level keys that name a method move under it."""
    from .registry import METHODS

    fields = set(Recipe.model_fields)
    out = {}
    for k, v in d.items():
        if k not in fields and k in METHODS:
            prev = out.get("methods", {}).get(k) or {}
            out.setdefault("methods", {})[k] = v if v is False else _deep_merge(prev, v or {})
        else:
            out[k] = _deep_merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def _check_names(data: dict, source: str) -> None:
    """An unknown top-level key gets its own message: a typo'd or missing method is the usual cause (an
    unknown name under ``methods`` is the Recipe's own check)."""
    from .registry import METHODS

    for k in data:
        if k not in Recipe.model_fields:
            raise RecipeError(f"{source}: {k!r} is neither a recipe section ({', '.join(Recipe.model_fields)}) "
                              f"nor a known method ({', '.join(METHODS.names())})")


def _read_yaml(p: Path, what: str) -> dict[str, Any]:
    """A YAML mapping, or a one-line `RecipeError` naming the file (and line)."""
    if not p.exists():
        raise RecipeError(f"{p}: {what} not found")
    if p.is_dir():
        raise RecipeError(f"{p}: is a directory; give a {what} YAML file")
    try:
        data = load_yaml(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise RecipeError(f"{p}: not UTF-8 text (byte {e.start}); a {what} is a YAML file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise RecipeError(f"{p}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{p}: a {what} is a mapping of sections (model, task, methods, ...)")
    return data


def shipped_recipe(name: str | Path | None) -> Path | None:
    """The packaged recipe ``name`` (``distil-inputs`` or ``distil-inputs.yaml``) when no such file
    exists where ``name`` points, so `tether train distil-inputs --task x.jsonl` works from any directory."""
    from importlib import resources

    if not name or Path(name).exists() or Path(name).name != str(name):
        return None
    stem = str(name).removesuffix(".yaml")
    f = resources.files("tether.recipes") / f"{stem}.yaml"
    return Path(str(f)) if f.is_file() else None


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None,
                **fields: Any) -> Recipe:
    """Read a recipe YAML (or start from the defaults), apply overrides, validate."""
    path = shipped_recipe(path) or path
    source = str(path) if path else "<defaults>"
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        data = _read_yaml(p, "recipe")
        data = _route_method_keys(data)
        base_dir = p.parent
        for key in ("train", "eval"):
            v = data.get("task", {}).get(key) if isinstance(data.get("task"), dict) else None
            if isinstance(v, str) and not Path(v).is_absolute() and (base_dir / v).exists():
                data["task"][key] = str(base_dir / v)
    fields = _route_method_keys(fields)
    if "methods" in fields:  # methods given in Python replace the recipe's, like a YAML section would
        data["methods"] = fields.pop("methods")
    elif "methods" not in data:
        data["methods"] = Recipe.model_fields["methods"].default_factory()
    data = _deep_merge(data, fields)
    data = _deep_merge(data, _route_method_keys(parse_overrides(overrides)))
    # `--set replay=false` switches a default method off; `name:` with no settings means defaults
    data["methods"] = {k: (v or {}) for k, v in data["methods"].items() if v is not False}
    _check_names(data, source)
    try:
        return Recipe(**data)
    except ValidationError as e:
        raise RecipeError(f"{source}: {_first_error(e)}") from None


def dump_recipe(recipe: _RunSpec) -> str:
    """The resolved recipe as YAML: every method's settings written out, defaults included, so the file
    says exactly what ran (and reruns it as such)."""
    data = recipe.model_dump(mode="json")
    data["methods"] = {n: c.model_dump(mode="json", by_alias=True) if isinstance(c, BaseModel) else c
                       for n, c in recipe.method_configs().items()}
    return yaml.safe_dump(data, sort_keys=False)


class SequenceTask(_Strict):
    """One task of a sequence: its data and how it is scored (exact match of greedy answers by default)."""

    name: str
    train: str
    eval: str
    eval_kind: Literal["generation", "perplexity", "multiple_choice"] = "generation"
    eval_metric: Literal["exact_match", "contains"] = "exact_match"
    max_new_tokens: int = 16


class SequenceSpec(_RunSpec):
    """`tether continual`: tasks trained one after another with the same methods, by the same run
    driver as a single task (so the guard and the saved model come with it).

    ``memory_per_task``: examples of each finished task kept and replayed (with the general replay
    data) while later tasks train — replay's continual-learning form. ``multitask`` trains all
    tasks at once for the same total steps instead: the upper bound to compare against.
    """

    tasks: list[SequenceTask]
    general: str = "general-quick"
    methods: dict[str, dict[str, Any]] = Field(default_factory=lambda: default_methods("naive"))
    training: TrainingSpec = Field(default_factory=TrainingSpec)  # per task
    # off unless asked for: a sequence's default is the plain baseline its metrics compare against
    guard: GuardSpec = Field(default_factory=lambda: GuardSpec(enabled=False))
    max_length: int = 512
    chat: bool | None = None
    eval_limit: int | None = 100
    memory_per_task: int = 50
    multitask: bool = False

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[SequenceTask]) -> list[SequenceTask]:
        if len(v) < 2:
            raise ValueError("tasks: a sequence needs at least two tasks")
        names = [t.name for t in v]
        if len(set(names)) != len(names):
            raise ValueError(f"tasks: names must be unique, got {names}")
        return v


def load_sequence(path: str | Path | None = None, overrides: list[str] | None = None, **fields: Any) -> SequenceSpec:
    """Read a sequence YAML, resolve task paths relative to it, apply overrides, validate."""
    source = str(path) if path else "<python>"
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        data = _read_yaml(p, "sequence")
        for t in data.get("tasks") or []:
            for key in ("train", "eval"):
                if isinstance(t, dict) and isinstance(t.get(key), str) and (p.parent / t[key]).exists():
                    t[key] = str(p.parent / t[key])
    data = _deep_merge(data, _route_method_keys(fields))
    data = _deep_merge(data, _route_method_keys(parse_overrides(overrides)))
    if isinstance(data.get("methods"), dict):
        data["methods"] = {k: (v or {}) for k, v in data["methods"].items() if v is not False}
    try:
        return SequenceSpec(**data)
    except ValidationError as e:
        raise RecipeError(f"{source}: {_first_error(e)}") from None
    except ValueError as e:
        raise RecipeError(f"{source}: {e}") from None
