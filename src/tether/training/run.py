"""`train(recipe)`: the whole run, in the order data flows.

data (validated before any model loads) -> model -> methods -> HF Trainer (+ guard) -> probes ->
report. The run directory gets the resolved recipe, metrics per step (JSONL), guard events, probe
results before/after, the final model or adapter, and ``summary.json`` — all written atomically.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Recipe, RecipeError, dump_recipe
from ..data.formats import encode_records, validate, validate_records
from ..data.readers import iter_valid, read_records
from ..io import append_jsonl, write_json, write_text
from ..progress import status
from .rundir import claim, default_run_dir

log = logging.getLogger(__name__)

# methods that reshape the model go first, so freezing sees the LoRA parameters it must freeze
_MODEL_ORDER = {"full": 0, "lora": 1, "freeze": 2}


@dataclass
class TrainResult:
    run_dir: Path
    summary: dict[str, Any]
    base_results: list
    final_results: list
    model: Any = None
    tokenizer: Any = None


def task_eval_items(recipe: Recipe, records) -> list[dict]:
    return records_to_eval_items(records, recipe.task.chat)


def records_to_eval_items(records, chat: bool | None) -> list[dict]:
    """Held-out task records -> generation items (a string prompt becomes a chat turn unless chat=False)."""
    items = []
    for r in records:
        d = r.data
        if "messages" in d:
            msgs = d["messages"]
            last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
            items.append({"prompt": msgs[:last], "answers": [msgs[last]["content"]]})
        elif "prompt" in d:
            prompt = d["prompt"] if chat is False else [{"role": "user", "content": d["prompt"]}]
            items.append({"prompt": prompt, "answers": [d["completion"]]})
        else:
            raise ValueError(f"{r.source}:{r.line}: task eval records need 'messages' or 'prompt'/'completion'")
    return items


def load_task(recipe: Recipe):
    """Read and validate the task's records (no model needed); returns (train, eval, skipped): the
    records, and the errors of those ``task.skip_invalid`` dropped."""
    if not recipe.task.train:
        raise ValueError("task.train: no training data given (a JSONL/JSON/CSV/Parquet file)")
    train = read_records(recipe.task.train, limit=recipe.task.limit)
    skipped: list = []
    if recipe.task.skip_invalid:  # drop (and count) what fails the check; the rest must still agree in shape
        report = iter_valid(train, validate, skip_invalid=True)
        if not report.records:
            raise report.skipped[0]
        train = report.records
        skipped = report.skipped
    validate_records(train)
    evals = read_records(recipe.task.eval) if recipe.task.eval else None
    if evals is not None:
        validate_records(evals)
        if recipe.task.eval_limit:
            evals = evals[: recipe.task.eval_limit]
    return train, evals, skipped


def build_methods(recipe: Recipe) -> dict[str, Any]:
    from ..registry import METHODS

    configs = recipe.method_configs()
    names = sorted(configs, key=lambda n: (_MODEL_ORDER.get(n, 9), list(configs).index(n)))
    return {n: METHODS.get(n)(configs[n]) for n in names}


def train(recipe: Recipe, *, base_results: dict[str, list] | None = None, keep_model: bool = False,
          compare_to: str | None = None, overwrite: bool = False) -> TrainResult:
    """Run one recipe.

    Args:
        base_results: ``{"general": [...], "guard": [...], "task": float}`` already measured on the
            base; skips re-scoring when several runs share a base (the demo and the benchmarks do).
        compare_to: measure general ability against this model instead of the one being trained
            (`tether recover` trains a model that already forgot, against its original base).
        overwrite: replace what ``recipe.output_dir`` holds; otherwise a directory holding anything
            is refused before anything is written.
    """
    from ..probes.suite import load_suite, validate_suite

    t_start = time.perf_counter()
    # 1. data and probes, validated before anything is written or loaded
    train_records, eval_records, read_skipped = load_task(recipe)
    general = load_suite(recipe.general)
    general_probes = validate_suite(general)
    guard_probes = validate_suite(recipe.guard.suite, limit=recipe.guard.limit) if recipe.guard.enabled else None
    methods = build_methods(recipe)
    wanting = [n for n, m in methods.items() if m.needs_general and not m.general_optional]
    if wanting and general.replay_path() is None:  # found now, not after minutes of scoring the base
        verb = "needs" if len(wanting) == 1 else "need"
        raise RecipeError(f"general: suite {general.origin} has no replay section, and {' and '.join(wanting)} "
                          f"{verb} general data; add `replay: {{data: FILE}}` to the suite, or turn "
                          f"{'it' if len(wanting) == 1 else 'them'} off (e.g. --set {wanting[0]}=false)")
    if recipe.output_dir is None:
        recipe = recipe.model_copy(update={"output_dir": default_run_dir(recipe.task.train)})
    with claim(recipe.output_dir, overwrite=overwrite) as run_dir:
        write_text(run_dir / "recipe.yaml", dump_recipe(recipe))
        return _run(recipe, run_dir, train_records, eval_records, read_skipped, general, general_probes, guard_probes,
                    methods, base_results=base_results, keep_model=keep_model, compare_to=compare_to, t_start=t_start)


def _run(recipe: Recipe, run_dir: Path, train_records, eval_records, read_skipped, general, general_probes,
         guard_probes, methods: dict[str, Any], *,
         base_results, keep_model: bool, compare_to: str | None, t_start: float) -> TrainResult:
    import torch

    from .. import models
    from .session import Session

    # 2. model
    torch.manual_seed(recipe.training.seed)
    with status(f"loading {recipe.model.name}"):
        model, tok = models.load(recipe.model.name, dtype=recipe.model.dtype)
    task_examples, skipped = encode_records(train_records, tok, max_length=recipe.task.max_length,
                                            chat=recipe.task.chat, skip_invalid=recipe.task.skip_invalid)
    skipped = read_skipped + skipped
    if skipped:
        log.warning("skipped %d invalid task records (first: %s)", len(skipped), skipped[0])
    session = Session(recipe, model, tok, general, general_probes, guard_probes,
                      task_eval_items(recipe, eval_records) if eval_records else None, run_dir)
    if compare_to is not None:
        session.base_name = compare_to

    # 3. the base model's scores, once
    base = session.score_base(known=base_results)
    session.base = base

    # 4. methods, trainer, guard
    trainer, guard = session.build_trainer(methods, task_examples)
    train_out = trainer.train()
    model = trainer.model
    for m in methods.values():
        m.on_task_end(model, trainer.context())

    # 5. save, score, report: once, on the main process (under torchrun / accelerate launch)
    if not trainer.is_world_process_zero():
        return TrainResult(run_dir, {}, base["general"], [])
    session.save_model(model, methods)
    final = session.score_final(model, guard)
    summary = session.summarise(base, final, train_out, guard, methods, skipped, time.perf_counter() - t_start)
    write_json(run_dir / "summary.json", summary)
    from ..report.html import write_report

    write_report(run_dir)  # report.html + plots/*.svg|png, readable without running anything
    append_jsonl(run_dir / "metrics.jsonl", {"event": "end", **{k: v for k, v in summary.items() if k == "task"}})
    return TrainResult(run_dir, summary, base["general"], final["general"],
                       model if keep_model else None, tok if keep_model else None)
