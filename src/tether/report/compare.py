"""Rendering a base-vs-tuned comparison: rich tables of `probes.verdict`'s results, nothing decided here."""

from __future__ import annotations

from ..probes.base import ProbeResult
from ..probes.verdict import ProbeComparison


def render_comparison(comparisons: list[ProbeComparison], threshold: float, title: str = "Forgetting report"):
    """A rich Table: base, tuned, relative change with CI, verdict; replay-sharing probes marked."""
    from rich.table import Table

    loose = sorted({f"{c.kind} {c.threshold:.0%}" for c in comparisons if c.threshold != threshold})
    bounds = f"{threshold:.0%}" + (f" ({', '.join(loose)})" if loose else "")
    table = Table(title=title, caption=f"verdict: drop > {bounds} relative with a 95% CI excluding 0 = forgot"
                  "; * = probe shares a source with the replay data (flatters replay)")
    for col in ("probe", "metric", "n", "base", "tuned", "change", "95% CI", "lost/gained", "verdict"):
        table.add_column(col, justify="right" if col not in ("probe", "metric", "verdict") else "left")
    colours = {"forgot": "bold red", "uncertain": "yellow", "improved": "green", "ok": "green"}
    for c in comparisons:
        arrow = "" if c.higher_is_better else " (lower better)"
        table.add_row(
            c.probe + (" *" if c.shares_source_with_replay else ""), c.metric + arrow, str(c.n),
            f"{c.base:.4g}", f"{c.tuned:.4g}", f"{c.rel_change:+.1%}", f"[{c.ci_low:+.1%}, {c.ci_high:+.1%}]",
            f"{c.flips['lost']}/{c.flips['gained']}" if c.flips else "", f"[{colours[c.verdict]}]{c.verdict}[/]",
        )
        if "prob" in c.secondary:  # MC: the gold-choice probability, which moves with every item
            p = c.secondary["prob"]
            table.add_row("", "prob", str(c.n), f"{p['base']:.4g}", f"{p['tuned']:.4g}", f"{p['rel_change']:+.1%}",
                          f"[{p['ci_low']:+.1%}, {p['ci_high']:+.1%}]", "", "")
    return table


def render_flipped(comparisons: list[ProbeComparison], limit: int = 5):
    """The first ``limit`` lost items of each generation probe, base answer beside tuned: a collapse
    into the task's format shows in the answers themselves. None when no probe lost a generated item."""
    from rich.table import Table

    rows = [(c.probe, it) for c in comparisons if c.flipped
            for it in c.flipped["lost"][:limit] if "base" in it]
    if not rows:
        return None
    table = Table(title=f"Lost items (first {limit} per generation probe; all in the JSON report)")
    for col in ("probe", "item", "base answer", "tuned answer"):
        table.add_column(col, overflow="fold")
    for probe, it in rows:
        table.add_row(probe, it["id"], one_line(it["base"]), one_line(it["tuned"]))
    return table


def one_line(text: str, n: int = 80) -> str:
    """``text`` on one line (whitespace collapsed), cut to ``n`` characters with an ellipsis."""
    t = " ".join(str(text or "").split())
    return t if len(t) <= n else t[: n - 1] + "…"


def render_results(results: list[ProbeResult], title: str = "General probes"):
    from rich.table import Table

    table = Table(title=title, caption="* = probe shares a source with the replay data")
    for col in ("probe", "metric", "n", "score", "95% CI", "extra", "s"):
        table.add_column(col)
    for r in results:
        extra = ", ".join(f"{k}={v:.4g}" for k, v in r.extra.items() if isinstance(v, (int, float)))
        table.add_row(r.name + (" *" if r.shares_source_with_replay else ""), r.metric, str(r.n), f"{r.score:.4g}",
                      f"[{r.ci_low:.4g}, {r.ci_high:.4g}]", extra, f"{r.seconds:.1f}")
    return table
