"""Probe suites: a YAML file (or Python list) naming probes, their data and the replay data.

Parse, validate, then run (torchtune's ``config.parse`` + ``validate``): `load_suite` turns YAML into
a typed `SuiteSpec` whose errors name the file and key; `validate_suite` reads and checks every
item of every probe before any model is loaded; `run_suite` scores a model on fixed subsets in a
fixed order, so two runs (base and tuned) see the same items and can be compared pairwise.

Example::

    name: general-v2
    probes:
      - name: knowledge_mc
        kind: multiple_choice
        data: pack://general-v2/knowledge_mc.jsonl   # or relative to this file, or absolute
        sources: [countryinfo, bsdgames]
        limit: 200
        options: {target_delimiter: " "}
    replay:
      data: pack://general-v2/replay.jsonl
      sources: [chatterbot, python-docs]
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from ..data.builtin.uri import SCHEMES, resolve
from ..data.readers import DataError, read_records
from ..io import load_yaml
from ..registry import PROBES


class SuiteError(ValueError):
    """A suite that cannot be used; the message names the YAML file and the key."""


class ProbeSpec(BaseModel):
    """One probe of a suite: a registered ``kind``, its items (``data`` file or inline ``items``)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    kind: str
    data: str | None = None
    items: list[dict[str, Any]] | None = None
    sources: list[str] = Field(default_factory=list)
    limit: int | None = Field(default=None, gt=0)
    seed: int = 0
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, v: str) -> str:
        if v not in PROBES:
            raise ValueError(f"unknown probe kind {v!r}; known: {', '.join(PROBES.names())}")
        return v

    @model_validator(mode="after")
    def _one_data_source(self) -> ProbeSpec:
        if (self.data is None) == (self.items is None):
            raise ValueError("give exactly one of 'data' (a file or pack:// reference) and 'items'")
        return self


class ReplaySpec(BaseModel):
    """General data mixed into training by the replay method, and where it came from."""

    model_config = ConfigDict(extra="forbid")

    data: str
    sources: list[str] = Field(default_factory=list)


class SuiteSpec(BaseModel):
    """A named, ordered list of probes plus optional replay data."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    description: str = ""
    probes: list[ProbeSpec] = Field(min_length=1)
    replay: ReplaySpec | None = None
    _base_dir: Path | None = PrivateAttr(default=None)  # relative data paths resolve here
    _origin: str = PrivateAttr(default="<python>")  # the YAML file, for error messages

    @model_validator(mode="after")
    def _unique_names(self) -> SuiteSpec:
        seen: set[str] = set()
        for p in self.probes:
            if p.name in seen:
                raise ValueError(f"duplicate probe name {p.name!r}")
            seen.add(p.name)
        return self

    @classmethod
    def from_probes(cls, probes: Sequence[ProbeSpec | dict], *, name: str = "custom",
                    replay: ReplaySpec | dict | None = None, base_dir: str | Path | None = None) -> SuiteSpec:
        """Build a suite in Python, e.g. ``SuiteSpec.from_probes([{"name": "mc", "kind":
        "multiple_choice", "items": [...]}])``; relative paths resolve against ``base_dir``."""
        try:
            suite = cls(name=name, probes=list(probes), replay=replay)
        except ValidationError as e:
            raise SuiteError(_format_errors("<python>", e)) from None
        suite._base_dir = Path(base_dir) if base_dir else None
        return suite

    @property
    def origin(self) -> str:
        return self._origin

    def resolve(self, ref: str) -> Path:
        """Path of a data reference: ``pack://NAME/FILE`` or ``task://NAME/FILE``, relative to the suite
        file, or absolute."""
        return resolve_data(ref, self._base_dir)

    def replay_path(self) -> Path | None:
        return self.resolve(self.replay.data) if self.replay else None

    def shares_source_with_replay(self, probe: ProbeSpec) -> bool:
        """True when the probe's data comes from a source the replay data also draws on; such a probe
        over-states how much replay protects general ability (the model trained on its source)."""
        if self.replay is None:
            return False
        return bool(_top_sources(probe.sources) & _top_sources(self.replay.sources))


def _top_sources(sources: Sequence[str]) -> set[str]:
    return {s.split("/", 1)[0].strip().lower() for s in sources}


def resolve_data(ref: str, base_dir: Path | None = None) -> Path:
    """``pack://NAME/FILE`` (the probe pack) or ``task://NAME/FILE`` (a built-in task) -> the file,
    built on first use; other paths relative to ``base_dir`` (the YAML file's folder) or the
    working directory."""
    if ref.startswith(SCHEMES):
        try:
            return resolve(ref)
        except DataError as e:
            raise SuiteError(e.problem) from None
    path = Path(ref).expanduser()
    return path if path.is_absolute() else (base_dir or Path.cwd()) / path


def builtin_suites() -> list[str]:
    folder = resources.files("tether") / "suites"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml")) \
        if folder.is_dir() else []


def load_suite(path_or_name: str | Path | SuiteSpec) -> SuiteSpec:
    """Parse a suite from a YAML path or a built-in name (``src/tether/suites/<name>.yaml``)."""
    import yaml

    if isinstance(path_or_name, SuiteSpec):
        return path_or_name
    path = Path(path_or_name).expanduser()
    if not path.exists():
        if path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
            raise SuiteError(f"{path}: suite file not found")
        builtin = resources.files("tether") / "suites" / f"{path_or_name}.yaml"
        if not builtin.is_file():
            raise SuiteError(f"unknown suite {str(path_or_name)!r}: not a file and not a built-in suite "
                             f"(built-in: {', '.join(builtin_suites()) or 'none'})")
        path = Path(str(builtin))
    try:
        raw = load_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise SuiteError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise SuiteError(f"{path}: expected a mapping with 'name' and 'probes' at the top level")
    try:
        suite = SuiteSpec.model_validate(raw)
    except ValidationError as e:
        raise SuiteError(_format_errors(str(path), e)) from None
    suite._base_dir = path.parent
    suite._origin = str(path)
    return suite


def _format_errors(origin: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"]).lstrip(".")
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        lines.append(f"{origin}: {key or '<top>'}: {msg}")
    return "\n".join(lines)


def validate_suite(suite: SuiteSpec | str | Path, *, limit: int | None = None) -> list:
    """Read and check every item of every probe, then build the probes; no model is touched.

    Args:
        limit: cap every probe at its first ``limit`` items (on top of each probe's own ``limit``).

    Returns:
        The probes, in suite order, ready for `run_suite`.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise SuiteError(f"limit must be a whole number of items >= 1 (leave it out for every item), got {limit!r}")
    suite = load_suite(suite)
    probes = []
    for k, spec in enumerate(suite.probes):
        where = f"{suite.origin}: probes[{k}] ({spec.name})"
        n = min(x for x in (spec.limit, limit) if x) if (spec.limit or limit) else None
        cls = PROBES.get(spec.kind)
        try:
            src = spec.items if spec.items is not None else suite.resolve(spec.data)
            records = read_records(src, limit=n)
            for rec in records:
                cls.validate_item(rec)
        except (DataError, SuiteError) as e:
            raise SuiteError(f"{where}: {e}") from None
        try:
            shares = suite.shares_source_with_replay(spec)
            probes.append(cls(spec.name, [r.data for r in records], sources=spec.sources, seed=spec.seed,
                              shares_source_with_replay=shares, **spec.options))
        except ValueError as e:
            raise SuiteError(f"{where}.options: {e}") from None
    return probes


def run_suite(suite: SuiteSpec | str | Path | list, scorer, *, reference=None, limit: int | None = None,
              progress: bool = True) -> list:
    """Score one model on every probe of a suite, in order.

    Args:
        suite: a `SuiteSpec`, a YAML path or built-in name, or probes from `validate_suite`
            (reuse them to avoid re-reading and re-tokenising items on every call).
        scorer: a `Scorer` over the model to score.
        reference: for drift probes: a `Scorer` over the base model, ``"self"`` when ``scorer`` is
            the base model, or ``None`` for a PEFT model (adapters disabled).
        limit: cap every probe at its first ``limit`` items (ignored for prepared probes).
        progress: show a progress bar.

    Returns:
        One `ProbeResult` per probe, in suite order (drift against disabled adapters runs last).
    """
    from ..progress import track

    probes = suite if isinstance(suite, list) else validate_suite(suite, limit=limit)
    drift = [p.name for p in probes if getattr(p, "registered_name", "") == "drift"]
    if drift and reference is None and not scorer.is_peft:
        raise ValueError(f"drift probe(s) {', '.join(drift)} need a reference: pass a Scorer over the base "
                         "model, reference='self' for the base model itself, or score a PEFT model")
    # drift against the same model with adapters off needs the adapters unmerged: it runs after the
    # block in which every other probe scores the model with its adapters folded in (one merge)
    separate = [reference is None and getattr(p, "registered_name", "") == "drift" for p in probes]
    order = [i for i, s in enumerate(separate) if not s] + [i for i, s in enumerate(separate) if s]
    results: list = [None] * len(probes)
    merged = contextlib.ExitStack()
    if not all(separate) and hasattr(scorer, "merged"):
        merged.enter_context(scorer.merged())
    with merged:
        for i in (track(order, "probes", total=len(order)) if progress else order):
            if separate[i]:
                merged.close()
            results[i] = probes[i].run(scorer, reference=reference)
    return results
