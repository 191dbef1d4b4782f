"""The report's figures, drawn with matplotlib's Agg canvas (no pyplot, so no global backend state).

Each plot function takes plain run data (lists/dicts as read from a run directory) and returns a
``Figure``, or ``None`` when there is nothing to draw; `save` writes it under ``<run>/plots/`` as SVG
(inlined in the HTML page) and PNG (for viewers and chat apps), each atomically.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..io import atomic_path

VERDICT_COLOURS = {"forgot": "#c62828", "uncertain": "#e08a00", "ok": "#2e7d32", "improved": "#1565c0"}
ACTION_COLOURS = {"stop": "#c62828", "adapt": "#e08a00", "warn": "#a89a00"}
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf", "#bcbd22"]
_SVG_META = {"Date": None, "Format": None, "Type": None, "Creator": None}


def _fig(width: float, height: float, rows: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0])
    for ax in axes:
        ax.grid(True, alpha=0.3, linewidth=0.6)
        ax.spines[["top", "right"]].set_visible(False)
    return fig, axes


def _num(v: Any) -> float:
    """A plottable float: ``None``/non-numbers become NaN (a gap in the line)."""
    try:
        return float(v) if v is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def save(fig: Figure, out_dir: str | Path, name: str, formats: Sequence[str] = ("svg", "png")) -> dict[str, Path]:
    """Write ``out_dir/name.<fmt>`` for each format; returns {fmt: path}."""
    out = {}
    for fmt in formats:
        path = Path(out_dir) / f"{name}.{fmt}"
        rc = {"svg.fonttype": "none", "svg.hashsalt": f"tether-{name}"}
        with matplotlib.rc_context(rc), atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=110, metadata=_SVG_META if fmt == "svg" else None)
        out[fmt] = path
    return out


def training_curves(metrics: list[dict]) -> Figure | None:
    """Loss (and its task/replay/regulariser parts) over steps; learning rate and grad norm below."""
    rows = [m for m in metrics if "loss" in m and "step" in m]
    if not rows:
        return None
    fig, (top, bottom) = _fig(9, 5, rows=2)
    steps = [m["step"] for m in rows]
    for i, key in enumerate(("loss", "loss_task", "loss_replay", "ewc", "lwf")):
        if any(key in m for m in rows):
            top.plot(steps, [_num(m.get(key)) for m in rows], label=key, color=PALETTE[i],
                     linewidth=2 if key == "loss" else 1.2, marker="." if len(rows) < 40 else None)
    top.set_ylabel("loss")
    top.legend(loc="upper right", fontsize=8, frameon=False)
    top.set_title("Training", loc="left", fontsize=11)
    if any("learning_rate" in m for m in rows):
        bottom.plot(steps, [_num(m.get("learning_rate")) for m in rows], color=PALETTE[3], label="learning rate")
        bottom.set_ylabel("learning rate")
        bottom.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    if any("grad_norm" in m for m in rows):
        twin = bottom.twinx()
        twin.plot(steps, [_num(m.get("grad_norm")) for m in rows], color=PALETTE[6], linewidth=1, alpha=0.8)
        twin.set_ylabel("grad norm", color=PALETTE[6])
        twin.spines[["top"]].set_visible(False)
    bottom.set_xlabel("step")
    return fig


def _mark_events(ax, checks: list[dict], restored_step: int | None, label: bool) -> None:
    for c in checks:
        action = c.get("action")
        if action:
            colour = ACTION_COLOURS.get(action, "#555555")
            ax.axvline(c["step"], color=colour, linestyle="--", linewidth=1.2, alpha=0.9)
            if label:
                ax.annotate(str(action), (c["step"], 1), xycoords=("data", "axes fraction"), xytext=(-3, -10),
                            textcoords="offset points", color=colour, fontsize=8, fontweight="bold", ha="right")
    if restored_step is not None:
        ax.axvline(restored_step, color="#2e7d32", linestyle=":", linewidth=1.5)
        if label:
            ax.annotate("restored", (restored_step, 1), xycoords=("data", "axes fraction"), xytext=(3, -22),
                        textcoords="offset points", color="#2e7d32", fontsize=8)


def guard_timeline(checks: list[dict], threshold: float | None, base_task: float | None = None,
                   restored_step: int | None = None) -> Figure | None:
    """Task score and each general probe's relative drop at every guard check, the budget line and
    the guard's actions (stop/adapt/warn) as vertical markers."""
    checks = [c for c in checks if "step" in c]
    if not checks:
        return None
    has_task = any(c.get("task_score") is not None for c in checks)
    fig, axes = _fig(9, 5.5 if has_task else 3.5, rows=2 if has_task else 1)
    steps = [c["step"] for c in checks]
    if has_task:
        ax = axes[0]
        xs = ([0] if base_task is not None else []) + steps
        ys = ([base_task] if base_task is not None else []) + [_num(c.get("task_score")) for c in checks]
        ax.plot(xs, ys, marker="o", color=PALETTE[0], linewidth=2, label="task score")
        if base_task is not None:
            ax.axhline(base_task, color="#777777", linestyle=":", linewidth=1, label="base model")
        ax.set_ylabel("task score")
        ax.set_ymargin(0.2)  # room for the action labels at the top
        ax.legend(loc="lower right", fontsize=8, frameon=False)
        _mark_events(ax, checks, restored_step, label=True)
    ax = axes[-1]
    probes = sorted({p for c in checks for p in (c.get("probes") or {})})
    for i, p in enumerate(probes):
        drops = [100 * _num((c.get("probes") or {}).get(p, {}).get("drop")) for c in checks]
        ax.plot(steps, drops, marker="o", markersize=4, linewidth=1.4, color=PALETTE[(i + 1) % len(PALETTE)], label=p)
    ax.plot(steps, [100 * _num(c.get("worst_drop")) for c in checks], color="#222222", linewidth=5, alpha=0.3,
            zorder=1, label="worst drop")
    if threshold is not None:
        ax.axhline(100 * threshold, color=VERDICT_COLOURS["forgot"], linestyle="--", linewidth=1.5,
                   label=f"budget {threshold:.0%}")
    ax.axhline(0, color="#999999", linewidth=0.8)
    _mark_events(ax, checks, restored_step, label=not has_task)
    ax.set_ylabel("general drop (%)\nabove 0 = worse")
    ax.set_xlabel("step")
    ax.legend(loc="upper left", fontsize=8, frameon=False, ncol=min(4, len(probes) + 2))
    axes[0].set_title("Forgetting guard", loc="left", fontsize=11)
    return fig


def drop_ci(row: dict) -> tuple[float, float]:
    """The CI of a comparison row's *drop* (positive = worse), from the CI of its relative change."""
    lo, hi = _num(row.get("ci_low")), _num(row.get("ci_high"))
    return (-hi, -lo) if row.get("higher_is_better", True) else (lo, hi)


def probe_changes(rows: list[dict], threshold: float | None) -> Figure | None:
    """Forest plot: each probe's relative drop with its 95% CI, coloured by verdict."""
    if not rows:
        return None
    fig, (ax,) = _fig(9, 1.2 + 0.42 * len(rows))
    for y, r in enumerate(rows):
        lo, hi = drop_ci(r)
        colour = VERDICT_COLOURS.get(r.get("verdict"), "#555555")
        d = 100 * _num(r.get("drop"))
        ax.errorbar([d], [y], xerr=[[max(0.0, d - 100 * lo)], [max(0.0, 100 * hi - d)]], fmt="o", color=colour,
                    capsize=3, markersize=6)
    ax.set_yticks(range(len(rows)), [r.get("probe", "?") + (" *" if r.get("shares_source_with_replay") else "")
                                     for r in rows])
    ax.invert_yaxis()
    ax.axvline(0, color="#999999", linewidth=0.8)
    if threshold is not None:
        ax.axvline(100 * threshold, color=VERDICT_COLOURS["forgot"], linestyle="--", linewidth=1.2,
                   label=f"threshold {threshold:.0%}")
        ax.legend(loc="lower right", fontsize=8, frameon=False)
    ax.set_xlabel("relative drop vs base (%), 95% CI  -  right of 0 = worse;  * = shares a source with replay")
    ax.set_title("Base vs tuned", loc="left", fontsize=11)
    return fig


def accuracy_matrix(tasks: list[str], matrix: list[list], base: list | None = None) -> Figure | None:
    """Continual learning: R[i][j] = score on task j after training task i (a base row on top)."""
    if not tasks or not matrix:
        return None
    rows = ([base] if base else []) + list(matrix)
    labels = (["base"] if base else []) + [f"after {t}" for t in tasks[: len(matrix)]]
    data = [[_num(v) for v in r] for r in rows]
    fig = Figure(figsize=(1.6 + 1.1 * len(tasks), 1.0 + 0.55 * len(rows)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    im = ax.imshow(data, cmap="viridis", aspect="auto", vmin=0, vmax=max(1e-9, max(
        (v for r in data for v in r if not math.isnan(v)), default=1)))
    for i, r in enumerate(data):
        for j, v in enumerate(r):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=9,
                        color="black" if v > 0.6 * im.norm.vmax else "white")
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_yticks(range(len(rows)), labels)
    ax.set_xlabel("evaluated on")
    ax.set_title("Accuracy matrix", loc="left", fontsize=11)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def continual_general(tasks: list[str], probes: list[str], general: list[list]) -> Figure | None:
    """Each general probe's relative change (%) after each task."""
    if not general or not probes:
        return None
    fig, (ax,) = _fig(9, 3.2)
    xs = list(range(len(general)))
    for k, p in enumerate(probes):
        ax.plot(xs, [100 * _num(r[k]) if k < len(r) else math.nan for r in general], marker="o",
                color=PALETTE[k % len(PALETTE)], label=p)
    ax.axhline(0, color="#999999", linewidth=0.8)
    ax.set_xticks(xs, [f"after {t}" for t in tasks[: len(general)]])
    ax.set_ylabel("relative change vs base (%)")
    ax.legend(fontsize=8, frameon=False, ncol=min(4, len(probes)))
    ax.set_title("General probes across tasks", loc="left", fontsize=11)
    return fig


def interpolation(alphas: list[float], task: list, general_drop: list, per_probe: dict[str, list] | None = None,
                  budget: float | None = None, chosen_alpha: float | None = None) -> Figure | None:
    """Weight interpolation base -> tuned: task score and general drop against alpha, the budget and the pick."""
    if not alphas:
        return None
    fig, (top, bottom) = _fig(9, 5.5, rows=2)
    top.plot(alphas, [_num(v) for v in task], marker="o", color=PALETTE[0], linewidth=2)
    top.set_ylabel("task score")
    top.set_title("Interpolation: base (alpha=0) to tuned (alpha=1)", loc="left", fontsize=11)
    for i, (name, vals) in enumerate((per_probe or {}).items()):
        bottom.plot(alphas, [100 * _num(v) for v in vals], linewidth=1.4, marker="o", markersize=3,
                    color=PALETTE[(i + 1) % len(PALETTE)], label=name)
    bottom.plot(alphas, [100 * _num(v) for v in general_drop], color="#222222", linewidth=5, alpha=0.3, zorder=1,
                label="worst drop")
    if budget is not None:
        bottom.axhline(100 * budget, color=VERDICT_COLOURS["forgot"], linestyle="--", label=f"budget {budget:.0%}")
    bottom.axhline(0, color="#999999", linewidth=0.8)
    if chosen_alpha is not None:
        for ax in (top, bottom):
            ax.axvline(chosen_alpha, color=VERDICT_COLOURS["ok"], linewidth=1.5, linestyle="-.")
        top.annotate(f"chosen alpha={chosen_alpha:g}", (chosen_alpha, 0.05), xycoords=("data", "axes fraction"),
                     xytext=(4, 0), textcoords="offset points", color=VERDICT_COLOURS["ok"], fontsize=9)
    bottom.set_ylabel("general drop (%)")
    bottom.set_xlabel("alpha")
    bottom.legend(fontsize=8, frameon=False, ncol=3, loc="upper left")
    return fig


def layer_drift(blocks: list[dict]) -> Figure | None:
    """Per transformer block: how far its weights moved (attention vs MLP) and its output CKA to base."""
    if not blocks:
        return None
    fig, (top, bottom) = _fig(9, 5.5, rows=2)
    idx = [b.get("index", i) for i, b in enumerate(blocks)]
    if any("attn_change" in b or "mlp_change" in b for b in blocks):
        w = 0.4
        top.bar([i - w / 2 for i in idx], [_num(b.get("attn_change")) for b in blocks], w, label="attention",
                color=PALETTE[0])
        top.bar([i + w / 2 for i in idx], [_num(b.get("mlp_change")) for b in blocks], w, label="MLP",
                color=PALETTE[1])
        top.legend(fontsize=8, frameon=False)
    else:
        top.bar(idx, [_num(b.get("weight_change")) for b in blocks], color=PALETTE[0])
    top.set_ylabel("relative weight change")
    top.set_title("Per-layer drift", loc="left", fontsize=11)
    cka = [_num(b.get("cka")) for b in blocks]
    bottom.bar(idx, [1 - c for c in cka], color=PALETTE[3])
    bottom.set_ylabel("1 - CKA to base\n(representation drift)")
    bottom.set_xlabel("block")
    return fig
