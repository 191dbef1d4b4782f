"""What every probe returns, and the small interface a probe implements.

A probe turns its items into requests for the shared `Scorer` (lm-evaluation-harness's three
request types: log-likelihood, rolling/completion loss, generation) and reduces the per-item
values to a score with a bootstrap CI. Per-item values are kept so that base and tuned runs on the
same items can be compared with a *paired* bootstrap.
"""

from __future__ import annotations

import abc
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar


@dataclass
class ProbeResult:
    """One probe's score on one model.

    ``score`` is ``sum(item_values) / sum(item_weights)`` (weights default to 1), so token-weighted
    losses and plain accuracies share one reduction and one bootstrap.
    """

    name: str
    kind: str
    metric: str
    higher_is_better: bool
    score: float
    n: int
    ci_low: float
    ci_high: float
    item_values: list[float]
    item_weights: list[float] | None = None
    extra: dict[str, float] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)
    shares_source_with_replay: bool = False
    seconds: float = 0.0
    samples: list[dict] = field(default_factory=list)  # a few model outputs to show in reports
    # per-item values of secondary metrics (same items, weights 1): compared with a paired CI too
    item_extra: dict[str, list[float]] = field(default_factory=dict)
    # what names each item in a report of lost/gained items: the item's "id" field, else its
    # 1-based position in the probe; and for generation probes the model's answer to each item
    item_ids: list[str] = field(default_factory=list)
    item_outputs: list[str] = field(default_factory=list)

    def to_dict(self, with_items: bool = True) -> dict[str, Any]:
        d = asdict(self)
        if not with_items:
            for key in ("item_values", "item_weights", "item_extra", "item_ids", "item_outputs"):
                d.pop(key)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ProbeResult":
        return cls(**d)


class Probe(abc.ABC):
    """Base class: ``__init__`` stores items and options, ``run`` scores a model.

    Subclasses register with ``@register_probe("kind")`` and set ``metric``/``higher_is_better``.
    """

    metric: ClassVar[str] = "score"
    higher_is_better: ClassVar[bool] = True

    def __init__(self, name: str, items: list[dict], *, sources: list[str] | None = None,
                 shares_source_with_replay: bool = False, seed: int = 0, **options: Any):
        self.name = name
        self.items = items
        self.sources = sources or []
        self.shares_source_with_replay = shares_source_with_replay
        self.seed = seed
        self.options = options

    def same_as(self, other: "Probe") -> bool:
        """Would ``other`` score every model exactly as this probe does (same kind, items, options)?"""
        return (type(self) is type(other) and self.name == other.name and self.options == other.options
                and self.sources == other.sources and self.seed == other.seed
                and self.shares_source_with_replay == other.shares_source_with_replay and self.items == other.items)

    @abc.abstractmethod
    def run(self, scorer, *, reference=None) -> ProbeResult:
        """Score the model behind ``scorer`` (``reference``: the base model's view, for drift)."""
