"""Name -> class registries for probes and methods.

Registering with a decorator is the only edit point (PEFT's ``register_peft_method``): a new probe
or method is one file, with no list to keep in step. Entries are found lazily, as lm-evaluation-
harness's ``api/registry.py`` finds its models: a built-in entry is found by reading its package's
module sources for ``@register_<kind>("name")``, and imported on first lookup, so listing names
or ``tether --help`` imports no torch; a plugin from another package registers ``"module:Class"``
under the entry-point group ``tether.<kind>s`` (or calls ``register_lazy``), imported only when named.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from importlib import resources
from importlib.metadata import entry_points
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries: built-ins are the public modules of one package, plugins ``module:Class`` strings."""

    def __init__(self, kind: str, package: str):
        self.kind = kind
        self._package = package
        self._entries: dict[str, T] = {}
        self._lazy: dict[str, str] = {}  # name -> "module" (a built-in) or "module:Class" (a plugin)
        self._found = False

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            obj.registered_name = name
            return obj

        return deco

    def register_lazy(self, name: str, target: str) -> None:
        """Register ``"package.module:Class"``, imported the first time ``name`` is looked up."""
        if ":" not in target:
            raise ValueError(f"{self.kind} {name!r}: expected 'module:Class', got {target!r}")
        self._lazy.setdefault(name, target)

    def _find(self) -> None:
        """Every name there is, without importing any entry: the package's module names, then plugins."""
        if self._found:
            return
        self._found = True
        decorator = re.compile(rf"^@register_{self.kind}\(\s*[\"']([\w.-]+)[\"']", re.MULTILINE)
        for f in sorted(resources.files(self._package).iterdir(), key=lambda f: f.name):
            if f.name.endswith(".py") and not f.name.startswith("_"):
                for name in decorator.findall(f.read_text(encoding="utf-8")):
                    self._lazy.setdefault(name, f"{self._package}.{f.name[:-3]}")
        for ep in entry_points(group=f"tether.{self.kind}s"):
            self._lazy.setdefault(ep.name, ep.value)

    def get(self, name: str) -> T:
        self._find()
        if name not in self._entries and name in self._lazy:
            module, _, attr = self._lazy[name].partition(":")
            loaded = importlib.import_module(module)
            if attr and name not in self._entries:  # a plugin class not decorated with our register
                self.register(name)(getattr(loaded, attr))
        if name not in self._entries:
            known = ", ".join(self.names()) or "none"
            raise KeyError(f"unknown {self.kind} {name!r}; known: {known}")
        return self._entries[name]

    def names(self) -> list[str]:
        self._find()
        return sorted(set(self._entries) | set(self._lazy))

    def __contains__(self, name: str) -> bool:
        self._find()
        return name in self._entries or name in self._lazy

    def classes(self) -> dict[str, T]:
        """Every entry, imported: for the conformance tests and the docs, not for a run."""
        return {n: self.get(n) for n in self.names()}


PROBES: Registry = Registry("probe", "tether.probes")
METHODS: Registry = Registry("method", "tether.methods")

register_probe = PROBES.register
register_method = METHODS.register
