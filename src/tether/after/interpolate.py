"""WiSE-FT: interpolate between base and fine-tuned weights, keep the best task score that forgets
no more than a budget.

Wortsman et al., "Robust fine-tuning of zero-shot models", https://arxiv.org/abs/2109.01903:
``theta(a) = (1 - a) theta_base + a theta_tuned``. Intermediate ``a`` often keeps most of the task
gain and most of the general ability. A full fine-tune is swept in place: the tuned weights are
cloned once and ``theta(a)`` is written into the tuned model's own tensors with
``torch._foreach_lerp_`` (no copy per alpha), then restored. A LoRA adapter is swept by scaling
it (``scaling[adapter] = a * scaling``), which is the same line in weight space, at no copy at all.
``lerp`` is exact at both ends, so ``a = 0`` and ``a = 1`` score exactly like base and tuned.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_path, write_json
from ..models import is_peft_model
from ..probes.base import ProbeResult
from ..probes.verdict import ProbeComparison, compare_results

SELECTION_RULE = ("largest task score among the alphas whose worst per-probe general drop (point estimate, "
                  "relative to alpha=0; absolute where the base scores 0) is <= budget; ties go to the "
                  "smaller drop, then the smaller alpha; without a task probe, the largest such alpha")


@dataclass
class AlphaPoint:
    """Scores of ``theta(alpha)``: the general suite, the task probe, and the drops versus alpha=0."""

    alpha: float
    general: list[ProbeResult]
    task: ProbeResult | None
    comparisons: list[ProbeComparison] = field(default_factory=list)
    max_drop: float = 0.0
    within_budget: bool = True


@dataclass
class InterpolationResult:
    """The sweep, the chosen point, and handles to the models so `save_choice` can write it."""

    mode: str  # "full" | "lora"
    budget: float
    points: list[AlphaPoint]
    chosen: int
    models: tuple[Any, Any, Any] | None = field(default=None, repr=False, compare=False)  # base, tuned, tok

    @property
    def chosen_alpha(self) -> float:
        return self.points[self.chosen].alpha

    def to_dict(self) -> dict[str, Any]:
        """JSON for ``interpolate.json`` (the flat curve is what `tether report` plots)."""
        names = [c.probe for c in self.points[0].comparisons] if self.points else []
        return {
            "mode": self.mode, "budget": self.budget, "chosen_alpha": self.chosen_alpha,
            "alphas": [p.alpha for p in self.points],
            "task": [p.task.score if p.task else None for p in self.points],
            "general_drop": [p.max_drop for p in self.points],
            "per_probe": {n: [next(c.drop for c in p.comparisons if c.probe == n) for p in self.points] for n in names},
            "selection_rule": SELECTION_RULE,
            "points": [{"alpha": p.alpha, "max_drop": p.max_drop, "within_budget": p.within_budget,
                        "task": p.task.to_dict(with_items=False) if p.task else None,
                        "general": [r.to_dict(with_items=False) for r in p.general],
                        "comparisons": [asdict(c) for c in p.comparisons]} for p in self.points],
        }

    def render_table(self, title: str = "WiSE-FT interpolation"):
        from rich.table import Table

        task0 = self.points[0].task
        table = Table(title=title, caption=f"chosen: {SELECTION_RULE}; budget {self.budget:.1%}")
        table.add_column("alpha", justify="right")
        if task0:
            table.add_column(f"task {task0.metric}" + ("" if task0.higher_is_better else " (lower better)"),
                             justify="right")
        for r in self.points[0].general:
            table.add_column(r.name, justify="right")
        table.add_column("worst drop", justify="right")
        table.add_column("within budget")
        for i, p in enumerate(self.points):
            star = "[bold green]* " if i == self.chosen else ""
            row = [f"{star}{p.alpha:g}"] + ([f"{p.task.score:.4g}"] if task0 else [])
            row += [f"{r.score:.4g}" for r in p.general]
            row += [f"{p.max_drop:+.1%}", "yes" if p.within_budget else "[red]no[/]"]
            table.add_row(*row)
        return table

    def plot(self, path: str | Path) -> Path:
        """Task score against worst general drop, one labelled point per alpha, the budget as a line."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        xs = [100 * p.max_drop for p in self.points]
        task = self.points[0].task
        ys = [p.task.score for p in self.points] if task else [p.alpha for p in self.points]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(xs, ys, "o-", color="tab:blue")
        for p, x, y in zip(self.points, xs, ys):
            ax.annotate(f"α={p.alpha:g}", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.plot([xs[self.chosen]], [ys[self.chosen]], "*", color="tab:green", markersize=16, label="chosen")
        ax.axvline(100 * self.budget, color="tab:red", linestyle="--", label=f"budget {self.budget:.0%}")
        ax.set_xlabel("worst general-probe drop vs base (%)")
        ax.set_ylabel(f"task {task.metric}" if task else "alpha")
        ax.set_title("WiSE-FT: theta(α) = (1-α) base + α tuned")
        ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
        plt.close(fig)
        return Path(path)


def select_alpha(alphas: Sequence[float], task_scores: Sequence[float] | None, drops: Sequence[float],
                 budget: float, *, higher_is_better: bool = True) -> int:
    """Index of the chosen alpha (see `SELECTION_RULE`); a NaN drop counts as over budget.

    The point estimate, not the CI verdict, decides: with few items a real drop is often only
    "uncertain", and a budget should bound what we expect to lose, not what we can prove we lost.
    """
    ok = [i for i, d in enumerate(drops) if not math.isnan(d) and d <= budget]
    if not ok:  # nothing within budget (NaN scores): fall back to the point closest to the base
        return min(range(len(alphas)), key=lambda i: alphas[i])
    if task_scores is None:
        return max(ok, key=lambda i: alphas[i])
    sign = 1.0 if higher_is_better else -1.0

    def key(i: int) -> tuple[float, float, float]:
        s = task_scores[i]
        return (-math.inf if math.isnan(s) else sign * s, -drops[i], -alphas[i])

    return max(ok, key=key)


def _lora_layers(model) -> list:
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = []
    for name, mod in model.named_modules():
        if not isinstance(mod, BaseTunerLayer):
            continue
        if not isinstance(mod, LoraLayer) or getattr(mod, "lora_variant", {}):
            raise ValueError(f"interpolate: {name} is not a plain LoRA layer (DoRA or another tuner); "
                             "merge the adapter and interpolate the full model instead")
        if mod.merged:
            raise ValueError(f"interpolate: {name} has merged adapters; unmerge them first")
        layers.append(mod)
    if not layers:
        raise ValueError("interpolate: the PEFT model has no LoRA layers")
    return layers


@contextlib.contextmanager
def lerp_weights(base, tuned) -> Iterator[Callable[[float], None]]:
    """Yield ``set(a)`` writing ``lerp(base, tuned, a)`` into ``tuned``'s parameters; restore on exit.

    Holds one clone of the tuned parameters, on their device (the base's are read in place, never
    written). Buffers are not interpolated: in causal LMs they are fixed tables (rotary frequencies).
    """
    if base is tuned:
        raise ValueError("interpolate: base and tuned are the same model object")
    bp, tp = dict(base.named_parameters()), dict(tuned.named_parameters())
    if bp.keys() != tp.keys():
        raise ValueError(f"interpolate: parameter names differ (e.g. {sorted(bp.keys() ^ tp.keys())[:3]})")
    for n, p in tp.items():
        if p.shape != bp[n].shape or p.dtype != bp[n].dtype or p.device != bp[n].device:
            raise ValueError(f"interpolate: {n} differs in shape, dtype or device between base and tuned")
    work = [p.data for p in tp.values()]
    start = [bp[n].data for n in tp]
    end = [w.clone() for w in work]

    def set_alpha(a: float) -> None:
        torch._foreach_copy_(work, start)
        torch._foreach_lerp_(work, end, float(a))

    try:
        with torch.no_grad():
            yield set_alpha
    finally:
        with torch.no_grad():
            torch._foreach_copy_(work, end)


@contextlib.contextmanager
def scale_lora(model) -> Iterator[Callable[[float], None]]:
    """Yield ``set(a)`` setting each active adapter's ``scaling`` to ``a`` times its own; restore on exit.

    PEFT adds ``lora_B(lora_A(x)) * scaling``, so ``a = 0`` adds exact zeros (the base) and ``a = 1``
    is the adapter untouched. ``LoraModel.unscale_layer`` is not used: it resets to ``alpha / r``,
    which is wrong for rsLoRA.
    """
    saved = [(m, dict(m.scaling), [a for a in m.active_adapters if a in m.scaling])
             for m in _lora_layers(model)]

    def set_alpha(a: float) -> None:
        for m, orig, active in saved:
            for ad in active:
                m.scaling[ad] = a * orig[ad]

    try:
        yield set_alpha
    finally:
        for m, orig, _ in saved:
            m.scaling.update(orig)


def interpolate(base, tuned, tokenizer, *, general_suite, task_probe=None,
                alphas: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), budget: float = 0.05,
                limit: int | None = None, batch_size: int = 16) -> InterpolationResult:
    """Score ``theta(a)`` for each alpha and choose one.

    Args:
        base: the model before fine-tuning (unused, may be ``None``, when ``tuned`` is a PEFT LoRA
            model: its adapter scaled to 0 *is* the base). Never modified.
        tuned: the fine-tuned model or PEFT LoRA model; used as the working model, restored after.
        tokenizer: shared tokenizer.
        general_suite: suite name, YAML path, `SuiteSpec` or prepared probes (`run_suite`).
        task_probe: anything with ``.run(scorer) -> ProbeResult`` (a generation probe on task data).
        alphas: interpolation weights; 0 is always added (it is the reference).
        budget: largest tolerated relative drop of any general probe versus alpha=0.
        limit: items per general probe.
        batch_size: the `Scorer`'s batch size.
    """
    from ..probes.scorer import Scorer
    from ..probes.suite import run_suite, validate_suite
    from ..progress import track

    if budget < 0:
        raise ValueError("interpolate: budget must be >= 0")
    alphas = sorted({0.0, *map(float, alphas)})
    mode = "lora" if is_peft_model(tuned) else "full"
    if mode == "full" and base is None:
        raise ValueError("interpolate: a fully fine-tuned model needs its base model")
    probes = general_suite if isinstance(general_suite, list) else validate_suite(general_suite, limit=limit)
    scorer = Scorer(tuned, tokenizer, batch_size=batch_size)
    ref = Scorer(base, tokenizer, batch_size=batch_size) if mode == "full" else None  # drift's reference
    points = []
    with lerp_weights(base, tuned) if mode == "full" else scale_lora(tuned) as set_alpha:
        for a in track(alphas, "alphas"):
            set_alpha(a)
            general = run_suite(probes, scorer, reference="self" if a == 0 else ref, progress=False)
            points.append(AlphaPoint(a, general, task_probe.run(scorer) if task_probe is not None else None))
    excess = []  # how far the worst probe is past its own bound (budget; drift has a looser one)
    for p in points:
        p.comparisons = compare_results(points[0].general, p.general, threshold=budget)
        drops = [c.drop for c in p.comparisons]
        p.max_drop = math.nan if any(map(math.isnan, drops)) else max(drops, default=0.0)
        over = math.nan if math.isnan(p.max_drop) else max((c.drop - c.threshold for c in p.comparisons), default=0.0)
        p.within_budget = not math.isnan(over) and over <= 0
        excess.append(over + budget)
    task = points[0].task
    chosen = select_alpha(alphas, [p.task.score for p in points] if task else None, excess, budget,
                          higher_is_better=task.higher_is_better if task else True)
    return InterpolationResult(mode, budget, points, chosen, models=(base, tuned, tokenizer))


def save_choice(result: InterpolationResult, out_dir: str | Path, *, alpha: float | None = None) -> Path:
    """Save ``theta(alpha)`` (default: the chosen alpha) with ``interpolation.json`` beside it.

    Full fine-tune: a full model (``save_pretrained``) written through `lerp_weights`. LoRA: the
    adapter with ``a`` folded into ``lora_B`` (so it loads with its usual scaling); the live
    adapter's tensors are restored afterwards.
    """
    if result.models is None:
        raise ValueError("save_choice: this result holds no models (was it rebuilt from JSON?)")
    base, tuned, tok = result.models
    a = result.chosen_alpha if alpha is None else float(alpha)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if result.mode == "full":
        with lerp_weights(base, tuned) as set_alpha:
            set_alpha(a)
            tuned.save_pretrained(out)
    else:
        layers = _lora_layers(tuned)
        b_params = [p for m in layers for ad in m.active_adapters
                    for p in ([*m.lora_B[ad].parameters()] if ad in m.lora_B else [m.lora_embedding_B[ad]])]
        saved = [p.detach().clone() for p in b_params]
        active = sorted({ad for m in layers for ad in m.active_adapters})
        try:
            with torch.no_grad():
                torch._foreach_mul_([p.data for p in b_params], a)
            tuned.save_pretrained(out, selected_adapters=active)
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in b_params], saved)
    if tok is not None:
        tok.save_pretrained(out)
    write_json(out / "interpolation.json", {**result.to_dict(), "saved_alpha": a})
    return out
