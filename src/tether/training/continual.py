"""`tether continual`: train tasks one after another, score every task after each, report transfer.

The accuracy matrix R[i][j] (score on task j after training task i), a base row (the untrained
model) and a general-probe row per step give average accuracy, backward/forward transfer and
forgetting per task (`cl_metrics`). Methods persist across tasks: online EWC consolidates, O-LoRA
adds one adapter per task, LwF distils from the model as it was before the current task, and
replay mixes in general data plus ``memory_per_task`` examples of every finished task.
"""

from __future__ import annotations

import copy
import logging
import random
import time
from pathlib import Path
from typing import Any

from ..config import SequenceSpec
from ..data.formats import encode_records, validate_records
from ..data.readers import read_records
from ..io import write_json
from ..methods.base import Context
from ..progress import status
from .rundir import claim, default_run_dir

log = logging.getLogger(__name__)


def run_continual(seq: SequenceSpec, *, base: tuple[list[float], list] | None = None,
                  overwrite: bool = False) -> dict[str, Any]:
    """Train the sequence; ``base`` (task scores, general ProbeResults of the untrained model on the
    same items, as returned under ``"_base"``) skips re-scoring it when several runs share a base.
    The run directory is taken as `tether train` takes it (refused if it holds a run, unless
    ``overwrite``), after every input was checked."""
    from ..probes.suite import load_suite, validate_suite

    t_start = time.perf_counter()
    # 1. every task's data and the general probes, checked before anything is written or loaded
    raw = []
    for t in seq.tasks:
        train, evals = read_records(t.train), read_records(t.eval)
        validate_records(train)
        validate_records(evals)
        raw.append((train, evals[: seq.eval_limit] if seq.eval_limit else evals))
    suite = load_suite(seq.general)
    general_probes = validate_suite(suite)
    out_dir = seq.output_dir or default_run_dir(f"{seq.tasks[0].name}-sequence", "continual")
    with claim(out_dir, overwrite=overwrite, kind="continual") as run_dir:
        return _run_sequence(seq, raw, suite, general_probes, base, run_dir, t_start)


def _run_sequence(seq, raw, suite, general_probes, base, run_dir: Path, t_start: float) -> dict[str, Any]:
    import torch

    from .. import models
    from ..probes.scorer import Scorer
    from ..probes.suite import run_suite
    from ..registry import PROBES
    from ..report.compare import compare_results
    from .cl_metrics import cl_metrics, plot_accuracy_matrix
    from .run import build_methods, records_to_eval_items

    torch.manual_seed(seq.training.seed)
    with status(f"loading {seq.model.name}"):
        model, tok = models.load(seq.model.name, dtype=seq.model.dtype)
    encoded = [encode_records(tr, tok, max_length=seq.max_length, chat=seq.chat)[0] for tr, _ in raw]
    task_probes = [PROBES.get(t.eval_kind)(t.name, records_to_eval_items(ev, seq.chat), metric=t.eval_metric,
                                            max_new_tokens=t.max_new_tokens) for t, (_, ev) in zip(seq.tasks, raw)]
    general_replay = []
    if suite.replay_path() is not None:
        general_replay = encode_records(read_records(suite.replay_path()), tok, max_length=seq.max_length)[0]

    def score_row(m, reference) -> tuple[list[float], list]:
        scorer = Scorer(m, tok)
        return [p.run(scorer).score for p in task_probes], run_suite(general_probes, scorer, reference=reference)

    if base is None:
        with status("scoring the base model on every task and the general probes"):
            base = score_row(model, "self")
    base_tasks, base_general = base
    peft_like = any(n in seq.methods for n in ("lora", "olora"))
    needs_drift_ref = not peft_like and any(p.registered_name == "drift" for p in general_probes)
    frozen_base = copy.deepcopy(model).eval().requires_grad_(False) if needs_drift_ref else None

    reference = Scorer(frozen_base, tok) if frozen_base is not None else None  # None: PEFT adapter-disabled view

    names = [t.name for t in seq.tasks]
    rows: list[list[float]] = []
    general_rows: list[list] = []
    methods = build_methods(seq)
    phases = [("multitask", list(range(len(seq.tasks))))] if seq.multitask else [(n, [i]) for i, n in enumerate(names)]
    for phase, (label, task_ids) in enumerate(phases):
        model = _train_phase(seq, model, tok, methods, phase, task_ids, encoded, general_replay, run_dir)
        with status(f"scoring after {label}"):
            scores, general = score_row(model, reference)
        rows.append(scores)
        general_rows.append(general)
        _write(run_dir, seq, names, rows, base_tasks, base_general, general_rows, methods, None, compare_results)

    R = rows if not seq.multitask else [rows[0]] * len(names)  # multitask: one model, every row alike
    gen_mean = [_mean_drop(compare_results(base_general, g)) for g in general_rows]
    metrics = cl_metrics(R, base_tasks, general=[1.0 - d for d in gen_mean], general_base=1.0)  # change = -drop
    out = _write(run_dir, seq, names, rows, base_tasks, base_general, general_rows, methods, metrics.to_dict(),
                 compare_results, seconds=time.perf_counter() - t_start)
    if not seq.multitask:
        plot_accuracy_matrix(R, names, run_dir / "plots" / "accuracy_matrix.png")
    out["_base"] = base  # not in continual.json: for callers running several methods from one base
    return out


def _train_phase(seq, model, tok, methods, phase: int, task_ids: list[int], encoded, general_replay, run_dir):
    from ..data.collate import Collator
    from .trainer import JsonlMetrics, TetherTrainer, start_task, training_arguments

    t = seq.training
    task_examples = [ex for i in task_ids for ex in encoded[i]]
    rng = random.Random(seq.training.seed + phase)
    memory = []
    for j in range(task_ids[0]):  # examples of every finished task, for replay
        memory += rng.sample(encoded[j], min(seq.memory_per_task, len(encoded[j])))
    steps = t.max_steps * len(task_ids)
    ctx = Context(task_index=phase, tokenizer=tok, general_examples=list(general_replay) + memory,
                  task_examples=task_examples, output_dir=str(run_dir), device=str(next(model.parameters()).device),
                  seed=t.seed + phase, grad_accum_steps=t.grad_accum, batch_size=t.batch_size,
                  num_batches=steps * t.grad_accum)
    if phase == 0:
        for m in methods.values():
            model = m.prepare_model(model, ctx)
    # LwF's teacher is the model before this task: the base at task 0, a frozen snapshot after
    needs_teacher = phase > 0 and any(m.needs_reference for m in methods.values())
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if needs_teacher else None
    ctx, data = start_task(model, methods, ctx, teacher)
    args = training_arguments(t.model_copy(update={"max_steps": steps}), str(run_dir / "checkpoints"))
    trainer = TetherTrainer(model=model, args=args, train_dataset=data,
                            data_collator=Collator.for_tokenizer(tok), methods=methods, context=ctx,
                            share_prefix=t.share_prefix)
    trainer.add_callback(JsonlMetrics(run_dir / "metrics.jsonl", {"task": phase}))
    trainer.train()
    for m in methods.values():
        m.on_task_end(trainer.model, trainer.context())
    return trainer.model


def _mean_drop(comps) -> float:
    return sum(c.drop for c in comps) / len(comps) if comps else 0.0


def _write(run_dir, seq, names, rows, base_tasks, base_general, general_rows, methods, metrics, compare_results,
           seconds: float | None = None) -> dict[str, Any]:
    comps = [compare_results(base_general, g) for g in general_rows]
    out = {
        "tasks": names, "matrix": rows, "base": base_tasks, "multitask": seq.multitask,
        "general_probes": [r.name for r in base_general],
        "general": [[c.rel_change for c in row] for row in comps],
        "general_drop": [[c.drop for c in row] for row in comps],
        "general_base": {r.name: r.score for r in base_general},
        "metrics": metrics, "methods": list(methods),
        "method_metrics": {n: m.metrics() for n, m in methods.items()},
        "steps_per_task": seq.training.max_steps, "seconds": None if seconds is None else round(seconds, 1),
    }
    write_json(run_dir / "continual.json", out)
    return out


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
