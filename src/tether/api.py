"""The Python API. The CLI is a thin layer over these functions; each mirrors one command."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .io import check_writable, write_json
from .probes.verdict import DEFAULT_THRESHOLD


def evaluate(model: str | Any, *, suite: str = "general", tokenizer: Any = None, limit: int | None = None,
             batch_size: int = 16, output: str | Path | None = None, device: str | None = None) -> list:
    """Score one model (name, directory, or a live model with ``tokenizer``) on a probe suite."""
    from . import models
    from .probes.scorer import Scorer
    from .probes.suite import load_suite, run_suite, validate_suite

    s = load_suite(suite)
    probes = validate_suite(s, limit=limit)  # every item checked before any model is loaded
    if output:
        check_writable(output)
    if isinstance(model, (str, Path)):
        model, tokenizer = models.load(model, device=device)
    results = run_suite(probes, Scorer(model, tokenizer, batch_size=batch_size), reference="self")
    if output:
        write_json(output, {"suite": s.name, "probes": [r.to_dict() for r in results]})
    return results


def compare(base: str | Any, tuned: str | Any, *, suite: str = "general", tokenizer: Any = None,
            threshold: float = DEFAULT_THRESHOLD, limit: int | None = None, batch_size: int = 16,
            output: str | Path | None = None, device: str | None = None, n_boot: int = 1000,
            drift_threshold: float = 0.25) -> dict[str, Any]:
    """The forgetting report: both models on the same items, paired relative change per probe.

    ``tuned`` may be a PEFT adapter directory on top of ``base``; then drift uses the adapter-disabled
    view and only one copy of the weights is in memory.
    """
    from . import models
    from .probes.scorer import Scorer
    from .probes.suite import load_suite, run_suite, validate_suite
    from .probes.verdict import compare_results, comparison_json

    s = load_suite(suite)
    probes = validate_suite(s, limit=limit)  # every item checked before any model is loaded
    if output:
        check_writable(output)
    t0 = time.perf_counter()
    base_name, tuned_name = str(base) if isinstance(base, (str, Path)) else "<model>", (
        str(tuned) if isinstance(tuned, (str, Path)) else "<model>")
    adapter = isinstance(tuned, (str, Path)) and models.is_adapter_dir(models.resolve(str(tuned)))
    if adapter:
        tuned_model, tokenizer = models.load(tuned, base=base, device=device)
        scorer = Scorer(tuned_model, tokenizer, batch_size=batch_size)
        with tuned_model.disable_adapter():
            base_results = run_suite(probes, scorer, reference="self")
        tuned_results = run_suite(probes, scorer, reference=None)  # drift: adapter-disabled view
    else:
        if isinstance(base, (str, Path)):
            base_model, tokenizer = models.load(base, device=device)
        else:
            base_model = base
        tuned_model = (models.load(tuned, device=device, with_tokenizer=False)
                       if isinstance(tuned, (str, Path)) else tuned)
        base_scorer = Scorer(base_model, tokenizer, batch_size=batch_size)
        base_results = run_suite(probes, base_scorer, reference="self")
        tuned_results = run_suite(probes, Scorer(tuned_model, tokenizer, batch_size=batch_size), reference=base_scorer)
    comps = compare_results(base_results, tuned_results, threshold=threshold, n_boot=n_boot,
                            kind_thresholds={"drift": drift_threshold})
    meta = {"base": base_name, "tuned": tuned_name, "suite": s.name, "threshold": threshold,
            "drift_threshold": drift_threshold,
            "seconds": round(time.perf_counter() - t0, 1)}
    report = comparison_json(comps, threshold, meta)
    report["base_results"] = [r.to_dict() for r in base_results]
    report["tuned_results"] = [r.to_dict() for r in tuned_results]
    if output:
        write_json(output, report)
    report["comparisons"] = comps
    return report


def build_data(name: str = "general-v2", tasks: tuple[str, ...] = ("fortune-topics",)) -> dict[str, Path]:
    """Build (or find cached) the default probe pack and the demo task data."""
    from .data.builtin.pack import ensure_pack
    from .data.builtin.tasks import build_task

    out = {name: ensure_pack(name)}
    for t in tasks:
        out[t] = build_task(t)
    return out


def train(recipe: str | Path | None = None, *, overrides: list[str] | None = None, overwrite: bool = False,
          **fields: Any):
    """Run a training recipe (YAML path or defaults), with ``key=value`` overrides. Returns a TrainResult.

    The run writes into ``output_dir`` (default: a new ``runs/<task>-<time>``); a directory that holds
    anything is refused unless ``overwrite``."""
    from .config import load_recipe
    from .training.run import train as run_train

    return run_train(load_recipe(recipe, overrides, **fields), overwrite=overwrite)


def resume(run_dir: str | Path):
    """Continue a killed or failed ``train`` run from its newest checkpoint, with its own recipe, base
    scores and every method's and the guard's state. Returns a TrainResult."""
    from .training.run import Run

    return Run.resume(run_dir).execute()


def continual(sequence: str | Path | None = None, *, overrides: list[str] | None = None, overwrite: bool = False,
              **fields: Any) -> dict:
    """Train a task sequence (YAML or fields); returns the ``continual.json`` content."""
    from .config import load_sequence
    from .training.run import run_continual

    return run_continual(load_sequence(sequence, overrides, **fields), overwrite=overwrite)


def _task_probe(eval_data: str | Path | None, *, chat: bool | None = None, limit: int | None = 200,
                max_new_tokens: int = 16, metric: str = "exact_match"):
    """A generation probe over held-out task records (prompt/completion or chat), or ``None``."""
    if not eval_data:
        return None
    from .data.builtin.uri import resolve
    from .data.formats import validate_records
    from .data.readers import read_records
    from .registry import PROBES
    from .training.run import records_to_eval_items

    records = read_records(resolve(eval_data), limit=limit)
    validate_records(records)
    return PROBES.get("generation")("task", records_to_eval_items(records, chat), metric=metric,
                                    max_new_tokens=max_new_tokens)


def interpolate(base: str, tuned: str, *, task_eval: str | Path | None = None, suite: str = "general",
                alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0), budget: float = 0.05,
                limit: int | None = None, batch_size: int = 16, output_dir: str | Path = "runs/interpolate",
                max_new_tokens: int = 16):
    """WiSE-FT: score the interpolation path base -> tuned, pick the best task score within budget, save it.

    For a LoRA adapter the adapter is scaled (no merged copies); a full fine-tune is interpolated
    in place in one working model. Writes ``interpolate.json``, the plot and ``model/``.
    """
    from . import models
    from .after.interpolate import interpolate as run_interpolate
    from .after.interpolate import save_choice
    from .probes.suite import validate_suite

    bad = [a for a in alphas if not 0.0 <= a <= 1.0]
    if not alphas or bad:
        raise ValueError(f"alphas must lie in [0, 1] (0 = base, 1 = tuned), got {', '.join(map(str, bad)) or 'none'}")
    if not 0.0 < budget < 1.0:
        raise ValueError(f"budget is a relative drop in (0, 1), e.g. 0.05 for 5%; got {budget}")
    probes = validate_suite(suite, limit=limit)  # before any model is loaded
    task_probe = _task_probe(task_eval, max_new_tokens=max_new_tokens)
    out = check_writable(output_dir, directory=True)
    adapter = models.is_adapter_dir(models.resolve(str(tuned)))
    if adapter:
        tuned_model, tok = models.load(tuned, base=base)
        base_model = None
    else:
        base_model, tok = models.load(base)
        tuned_model = models.load(tuned, with_tokenizer=False)
    result = run_interpolate(base_model, tuned_model, tok, general_suite=probes, task_probe=task_probe,
                             alphas=alphas, budget=budget, batch_size=batch_size)
    save_choice(result, out / "model")
    write_json(out / "interpolate.json", result.to_dict())
    result.plot(out / "plots" / "interpolation.png")
    return result


def diagnose(base: str, tuned: str, *, prompts: str | Path | None = None, suite: str = "general",
             output_dir: str | Path = "runs/diagnose", batch_size: int = 8, max_prompts: int = 64):
    """Which blocks moved: per-block weight change, CKA of hidden states, output KL, and a suggestion.

    ``prompts``: a JSONL of ``{"prompt": ...}`` records; by default the suite's drift prompts.
    """
    from . import models
    from .after.diagnose import diagnose as run_diagnose
    from .data.builtin.uri import resolve
    from .data.readers import read_records
    from .probes.suite import load_suite

    if prompts is None:
        s = load_suite(suite)
        spec = next((p for p in s.probes if p.kind == "drift"), None)
        if spec is None:
            raise ValueError(f"suite {suite!r} has no drift prompts; pass --prompts FILE.jsonl")
        prompts = s.resolve(spec.data)
    records = read_records(resolve(prompts), limit=max_prompts)
    texts = []
    for r in records:
        if "prompt" not in r.data:
            raise ValueError(f"{r.source}:{r.line}: field 'prompt': missing")
        texts.append(r.data["prompt"])
    if models.is_adapter_dir(models.resolve(str(tuned))):
        tuned_model, tok = models.load(tuned, base=base)
        base_model = None
    else:
        base_model, tok = models.load(base)
        tuned_model = models.load(tuned, with_tokenizer=False)
    d = run_diagnose(base_model, tuned_model, tok, texts, batch_size=batch_size)
    out = Path(output_dir)
    write_json(out / "diagnose.json", d.to_dict())
    d.plot(out / "plots" / "layer_drift.png")
    return d


def recover(model: str, base: str, task: str, **kwargs: Any):
    """Repair a forgotten full model with replay-heavy training until the guard says it is back."""
    from .training.recover import recover as run_recover

    return run_recover(model, base, task, **kwargs)


def report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """One self-contained HTML page for any run directory (train, eval, continual, interpolate, diagnose)."""
    from .report.html import write_report
    from .training.rundir import read_status

    state = read_status(run_dir) if Path(run_dir).is_dir() else None
    if state and state.get("state") == "failed":
        raise ValueError(f"{run_dir}: this run failed ({state.get('error', 'no error recorded')}); "
                         "nothing to report")
    return write_report(run_dir, out)
