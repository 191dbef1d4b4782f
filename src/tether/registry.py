"""Name -> class registries for probes and methods.

Registering with a decorator is the only edit point (lm-evaluation-harness's ``Registry``, PEFT's
``register_peft_method``): a new probe or method needs no central enum. Modules are imported lazily
on first lookup so ``tether --help`` does not import torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A named registry whose built-in entries live in one package, imported on first use."""

    def __init__(self, kind: str, package: str, modules: tuple[str, ...]):
        self.kind = kind
        self._package = package
        self._modules = modules
        self._entries: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            obj.registered_name = name
            return obj

        return deco

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for mod in self._modules:
                importlib.import_module(f"{self._package}.{mod}")

    def get(self, name: str) -> T:
        self._load()
        if name not in self._entries:
            known = ", ".join(sorted(self._entries)) or "none"
            raise KeyError(f"unknown {self.kind} {name!r}; known: {known}")
        return self._entries[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries


PROBES: Registry = Registry(
    "probe", "tether.probes", ("perplexity", "multiple_choice", "generation", "drift")
)
METHODS: Registry = Registry(
    "method", "tether.methods", ("full", "lora", "freeze", "replay", "ewc", "lwf", "olora", "oplora")
)

register_probe = PROBES.register
register_method = METHODS.register
