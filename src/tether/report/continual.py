"""A task sequence's accuracy matrix and transfer metrics as terminal tables."""

from __future__ import annotations

from typing import Any


def render_continual(result: dict[str, Any]):
    """The accuracy matrix and the summary metrics as rich tables."""
    from rich.table import Table

    names = result["tasks"]
    m = Table(title="accuracy matrix R[i][j]: score on task j (columns) after training task i (rows)")
    m.add_column("after")
    for n in names:
        m.add_column(n, justify="right")
    m.add_row("base", *[f"{v:.3f}" for v in result["base"]])
    labels = ["multitask"] if result["multitask"] else names
    for label, row in zip(labels, result["matrix"]):
        m.add_row(label, *[f"{v:.3f}" for v in row])
    s = Table(title="continual-learning metrics")
    for col in ("ACC", "BWT", "FWT", "forgetting per task", "general change (mean)"):
        s.add_column(col, justify="right")
    mt = result["metrics"] or {}
    fmt = lambda v: "-" if v is None else f"{v:+.3f}"  # noqa: E731
    s.add_row(f"{mt.get('acc', float('nan')):.3f}", fmt(mt.get("bwt")), fmt(mt.get("fwt")),
              ", ".join(f"{v:.3f}" for v in mt.get("forgetting") or []) or "-",
              fmt((mt.get("general_change") or [None])[-1]))
    return m, s
