"""The Python API. The CLI is a thin layer over these functions; each mirrors one command."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .io import write_json
from .report.compare import DEFAULT_THRESHOLD


def evaluate(model: str | Any, *, suite: str = "general", tokenizer: Any = None, limit: int | None = None,
             batch_size: int = 16, output: str | Path | None = None, device: str | None = None) -> list:
    """Score one model (name, directory, or a live model with ``tokenizer``) on a probe suite."""
    from . import models
    from .probes.scorer import Scorer
    from .probes.suite import load_suite, run_suite, validate_suite

    s = load_suite(suite)
    validate_suite(s)  # before any model is loaded
    if isinstance(model, (str, Path)):
        model, tokenizer = models.load(model, device=device)
    results = run_suite(s, Scorer(model, tokenizer, batch_size=batch_size), reference="self", limit=limit)
    if output:
        write_json(output, {"suite": s.name, "probes": [r.to_dict() for r in results]})
    return results


def compare(base: str | Any, tuned: str | Any, *, suite: str = "general", tokenizer: Any = None,
            threshold: float = DEFAULT_THRESHOLD, limit: int | None = None, batch_size: int = 16,
            output: str | Path | None = None, device: str | None = None, n_boot: int = 1000) -> dict[str, Any]:
    """The forgetting report: both models on the same items, paired relative change per probe.

    ``tuned`` may be a PEFT adapter directory on top of ``base``; then drift uses the adapter-disabled
    view and only one copy of the weights is in memory.
    """
    from . import models
    from .probes.scorer import Scorer
    from .probes.suite import load_suite, run_suite, validate_suite
    from .report.compare import compare_results, comparison_json

    s = load_suite(suite)
    validate_suite(s)
    t0 = time.perf_counter()
    base_name, tuned_name = str(base) if isinstance(base, (str, Path)) else "<model>", (
        str(tuned) if isinstance(tuned, (str, Path)) else "<model>")
    adapter = isinstance(tuned, (str, Path)) and models.is_adapter_dir(models.resolve(str(tuned)))
    if adapter:
        tuned_model, tokenizer = models.load(tuned, base=base, device=device)
        scorer = Scorer(tuned_model, tokenizer, batch_size=batch_size)
        with tuned_model.disable_adapter():
            base_results = run_suite(s, scorer, reference="self", limit=limit)
        tuned_results = run_suite(s, scorer, reference=None, limit=limit)  # drift: adapter-disabled view
    else:
        if isinstance(base, (str, Path)):
            base_model, tokenizer = models.load(base, device=device)
        else:
            base_model = base
        tuned_model = models.load(tuned, device=device, with_tokenizer=False) if isinstance(tuned, (str, Path)) else tuned
        base_scorer = Scorer(base_model, tokenizer, batch_size=batch_size)
        base_results = run_suite(s, base_scorer, reference="self", limit=limit)
        tuned_results = run_suite(s, Scorer(tuned_model, tokenizer, batch_size=batch_size), reference=base_scorer,
                                  limit=limit)
    comps = compare_results(base_results, tuned_results, threshold=threshold, n_boot=n_boot)
    meta = {"base": base_name, "tuned": tuned_name, "suite": s.name, "threshold": threshold,
            "seconds": round(time.perf_counter() - t0, 1)}
    report = comparison_json(comps, threshold, meta)
    report["base_results"] = [r.to_dict() for r in base_results]
    report["tuned_results"] = [r.to_dict() for r in tuned_results]
    if output:
        write_json(output, report)
    report["comparisons"] = comps
    return report


def build_data(name: str = "general-v1", tasks: tuple[str, ...] = ("fortune-topics",)) -> dict[str, Path]:
    """Build (or find cached) the default probe pack and the demo task data."""
    from .data.pack import build_task, ensure_pack

    out = {name: ensure_pack(name)}
    for t in tasks:
        out[t] = build_task(t)
    return out


def train(recipe: str | Path | None = None, *, overrides: list[str] | None = None, **fields: Any):
    """Run a training recipe (YAML path or defaults), with ``key=value`` overrides. Returns a TrainResult."""
    from .config import load_recipe
    from .training.run import train as run_train

    return run_train(load_recipe(recipe, overrides, **fields))
