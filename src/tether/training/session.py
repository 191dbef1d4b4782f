"""The pieces of one training run that need the live model: scoring, the Trainer, saving, the summary."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any

from ..config import Recipe
from ..data.formats import Example, encode_records
from ..io import write_json
from ..methods.base import Context
from ..progress import status

log = logging.getLogger(__name__)


def identical_results(probes: list, others: list, results: list) -> list:
    """For each of ``probes``, the result an identical probe (`Probe.same_as`) among ``others`` got
    (``results`` in ``others``' order), else ``None``: what need not be scored again."""
    return [next((r for o, r in zip(others, results) if p.same_as(o)), None) for p in probes]


def fill_in(reused: list, scored: list) -> list:
    """``reused`` with its ``None`` entries replaced, in order, by ``scored``."""
    rest = iter(scored)
    return [r if r is not None else next(rest) for r in reused]


class Session:
    def __init__(self, recipe: Recipe, model, tokenizer, general, general_probes: list, guard_probes: list | None,
                 task_items, run_dir: Path):
        self.recipe = recipe
        self.model = model
        self.tok = tokenizer
        self.general = general
        self.peft = "lora" in recipe.methods
        # probes were read and checked before the model loaded; they are reused at every check
        self.general_probes = general_probes
        self.guard_probes = self._guard_probes(guard_probes)
        self.task_items = task_items
        self.run_dir = run_dir
        self.base: dict[str, Any] = {}
        self.frozen_base = None  # a frozen copy, only when a method or probe needs one and PEFT can't serve
        self.base_name = recipe.model.name  # the model general scores are compared against
        self.batch_size = 16

    # -- scoring -----------------------------------------------------------------------------------
    def scorer(self, model):
        from ..probes.scorer import Scorer

        return Scorer(model, self.tok, batch_size=self.batch_size)

    def task_probe(self, limit: int | None = None):
        from ..registry import PROBES

        if not self.task_items:
            return None
        t = self.recipe.task
        items = self.task_items[:limit] if limit else self.task_items
        return PROBES.get(t.eval_kind)("task", items, metric=t.eval_metric, max_new_tokens=t.max_new_tokens)

    def _guard_probes(self, probes: list | None) -> list | None:
        if probes is None:
            return None
        wanted = self.recipe.guard.probes
        keep = [p for p in probes if wanted is None or p.name in wanted]
        if not self.peft:
            # drift needs the base model's view; without PEFT that is a second copy, so the guard skips it
            dropped = [p.name for p in keep if p.registered_name == "drift"]
            if dropped:
                log.info("guard: skipping %s (drift needs an adapter to disable; full fine-tuning has none)", dropped)
            keep = [p for p in keep if p.registered_name != "drift"]
        return keep

    def _run(self, probes: list, model, reference):
        from ..probes.suite import run_suite

        return run_suite(probes, self.scorer(model), reference=reference)

    def score_base(self, known: dict[str, Any] | None = None) -> dict[str, Any]:
        """Base scores (general suite, guard subset, task); ``known`` entries are reused, not re-scored."""
        from .. import models

        out = dict(known or {})
        with status(f"scoring the base model ({self.base_name}) on the general probes"):
            ref = self.model
            if self.base_name != self.recipe.model.name and ("general" not in out or "guard" not in out):
                ref = models.load(self.base_name, dtype=self.recipe.model.dtype, with_tokenizer=False,
                                  device=str(self.model.device))
            if "general" not in out:
                out["general"] = self._run(self.general_probes, ref, "self")
            if self.guard_probes is not None and "guard" not in out:
                out["guard"] = self._guard_base(out["general"], ref)
            del ref
            if "task" not in out:
                probe = self.task_probe()
                out["task"] = probe.run(self.scorer(self.model)).score if probe else None
        write_json(self.run_dir / "probes_base.json", {k: [r.to_dict() for r in v] if isinstance(v, list) else v
                                                       for k, v in out.items()})
        return out

    def _guard_base(self, general: list, ref) -> list:
        """The base's guard scores: a guard probe identical to a general one (the guard watching the
        general suite itself) takes that result as is; only the others are scored."""
        reused = identical_results(self.guard_probes, self.general_probes, general)
        todo = [g for g, r in zip(self.guard_probes, reused) if r is None]
        if len(todo) < len(reused):
            log.info("guard: %d of %d base scores taken from the general suite's", len(reused) - len(todo), len(reused))
        return fill_in(reused, self._run(todo, ref, "self") if todo else [])

    def guard_score(self, model):
        probe = self.task_probe(limit=self.recipe.guard.task_limit)
        # drift (PEFT only) uses the adapter-disabled view; the task probe shares the merged block
        return self._with_task(self.guard_probes, probe, model, None)

    def _with_task(self, probes: list, task_probe, model, reference) -> tuple[list, float | None]:
        """Score ``probes`` and the task probe in one `run_suite` (one adapter merge on CPU)."""
        results = self._run(probes + ([task_probe] if task_probe else []), model, reference)
        return (results[:-1], results[-1].score) if task_probe else (results, None)

    def score_final(self, model, guard=None) -> dict[str, Any]:
        """The tuned model's general and task scores. A probe the guard's last check scored on these
        very weights (the guard watching the general suite, checking at the last step) is taken from
        that check instead of being scored a second time."""
        from .. import models
        from .guard import weights_stamp

        general, task, reused_from = [None] * len(self.general_probes), None, None
        last = guard.last if guard is not None else None
        if last is not None and last["stamp"] == weights_stamp(model):
            general = identical_results(self.general_probes, self.guard_probes, last["results"])
            limit = self.recipe.guard.task_limit
            if self.task_items and (limit is None or limit >= len(self.task_items)):
                task = last["task_score"]
            if any(r is not None for r in general):
                reused_from = last["step"]
                log.info("final scores of %d of %d general probes taken from the guard's check at step %d",
                         sum(r is not None for r in general), len(general), last["step"])
        todo = [p for p, r in zip(self.general_probes, general) if r is None]
        task_probe = self.task_probe() if task is None else None
        if todo or task_probe:
            with status("scoring the tuned model on the " + ("general probes" if todo else "task")):
                reference = None  # PEFT: the adapter-disabled view
                if todo and not self.scorer(model).is_peft:
                    base = self.frozen_base or models.load(self.base_name, dtype=self.recipe.model.dtype,
                                                           with_tokenizer=False, device=str(model.device))
                    reference = self.scorer(base)
                scored, task_score = self._with_task(todo, task_probe, model, reference)
            task = task_score if task_probe else task
            general = fill_in(general, scored)
        out = {"general": general, "task": task if self.task_items else None}
        write_json(self.run_dir / "probes_final.json", {**{k: [r.to_dict() for r in v] if isinstance(v, list) else v
                                                           for k, v in out.items()},
                                                        "general_from_guard_step": reused_from})
        return out

    # -- training ----------------------------------------------------------------------------------
    def replay_examples(self) -> list[Example]:
        from ..data.readers import read_records

        path = self.general.replay_path()
        if path is None:
            return []
        examples, _ = encode_records(read_records(path), self.tok, max_length=self.recipe.task.max_length)
        return examples

    def build_trainer(self, methods: dict, task_examples: list[Example]):
        from ..data.collate import Collator
        from .guard import ForgettingGuard
        from .trainer import JsonlMetrics, TetherTrainer, start_task, training_arguments

        r, t = self.recipe, self.recipe.training
        needs_general = any(m.needs_general for m in methods.values())
        ctx = Context(
            tokenizer=self.tok, general_examples=self.replay_examples() if needs_general else [],
            task_examples=task_examples, output_dir=str(self.run_dir), device=str(self.model.device), seed=t.seed,
            grad_accum_steps=t.grad_accum, batch_size=t.batch_size, num_batches=t.max_steps * t.grad_accum,
        )
        if any(m.needs_reference for m in methods.values()) and not self.peft:
            self.frozen_base = copy.deepcopy(self.model).eval().requires_grad_(False)
        model = self.model
        for m in methods.values():
            model = m.prepare_model(model, ctx)
        ctx, data = start_task(model, methods, ctx, self.frozen_base)
        args = training_arguments(t, str(self.run_dir / "checkpoints"))
        trainer = TetherTrainer(model=model, args=args, train_dataset=data,
                                data_collator=Collator.for_tokenizer(self.tok), methods=methods, context=ctx,
                                share_prefix=t.share_prefix)
        trainer.add_callback(JsonlMetrics(self.run_dir / "metrics.jsonl"))
        guard = None
        if self.guard_probes is not None:
            g = r.guard
            guard = ForgettingGuard(
                self.guard_score, self.base["guard"], threshold=g.threshold, action=g.action, every=g.every,
                run_dir=self.run_dir, adapt_lr_factor=g.adapt_lr_factor,
                on_adapt=lambda ev: _raise_replay(data, g.adapt_replay_step, ev["step"] * t.grad_accum),
                log_fn=trainer.log, kind_thresholds={"drift": g.drift_threshold},
            )
            trainer.add_callback(guard)
        self.model = model
        return trainer, guard

    def save_model(self, model, methods: dict) -> Path:
        out = self.run_dir / "model"
        with status(f"saving the model to {out}"):
            saver = next((m for m in methods.values() if hasattr(m, "save_model")), None)
            if saver is not None:
                saver.save_model(model, out)
            else:
                model.save_pretrained(out, safe_serialization=True)
            self.tok.save_pretrained(out)
            for m in methods.values():
                if hasattr(m, "save"):
                    m.save(self.run_dir)
            _portable_base(out, self.recipe.model.name)
        return out

    def summarise(self, base, final, train_out, guard, methods, skipped, seconds: float) -> dict[str, Any]:
        from ..report.compare import compare_results, summary

        g = self.recipe.guard
        comps = compare_results(base["general"], final["general"], threshold=g.threshold,
                                kind_thresholds={"drift": g.drift_threshold})
        task_base, task_final = base.get("task"), final.get("task")
        return {
            "run_dir": str(self.run_dir),
            "methods": list(methods),
            "steps": train_out.global_step,
            "train_loss": train_out.training_loss if math.isfinite(train_out.training_loss) else None,
            "seconds": round(seconds, 1),
            "task": {"base": task_base, "final": task_final,
                     "gain": None if task_base is None or task_final is None else task_final - task_base},
            "general": summary(comps, g.threshold),
            "probes": [dataclasses.asdict(c) for c in comps],
            "guard": guard.summary() if guard else None,
            "skipped_records": [str(e) for e in skipped],
            "method_metrics": {n: m.metrics() for n, m in methods.items()},
            "extra_memory_mb": self.extra_memory_mb(methods),
        }

    def extra_memory_mb(self, methods: dict) -> float:
        """Memory a method adds beyond the model: a frozen teacher copy, Fisher and anchors, ..."""
        copy_mb = 0.0
        if self.frozen_base is not None:
            copy_mb = sum(p.numel() * p.element_size() for p in self.frozen_base.parameters()) / 2**20
        return copy_mb + sum(v for m in methods.values() for k, v in m.metrics().items() if k.endswith("memory_mb"))


def _raise_replay(dataset, step: float, start: int) -> dict:
    """Guard 'adapt': ask a replay-mixed dataset for a higher ratio in the batches still to come."""
    if getattr(dataset, "ratio", None) is not None and hasattr(dataset, "set_ratio"):
        new = min(0.9, dataset.ratio + step)
        dataset.set_ratio(new, start)
        return {"replay_ratio": new}
    return {"replay_ratio": None}


def _portable_base(model_dir: Path, name: str) -> None:
    """Adapters name their base as the recipe did (the alias or hub id), not as this machine's cache
    path, so that ``PeftModel.from_pretrained`` and ``tether eval --tuned`` find it anywhere."""
    for cfg in [*model_dir.glob("adapter_config.json"), *model_dir.glob("*/adapter_config.json")]:
        data = json.loads(cfg.read_text(encoding="utf-8"))
        if data.get("base_model_name_or_path") not in (None, name):
            data["base_model_name_or_path"] = name
            write_json(cfg, data)
