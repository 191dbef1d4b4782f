"""The run driver: one recipe object for `tether train`, `continual`, `recover` and the demo.

Its phases follow torchtune's ``recipes/interfaces.py``: everything read and checked before any
model loads (``__init__``), ``setup`` (model, methods' general data, the base's scores),
``train_task`` and ``score`` for each task, ``save``, ``cleanup``. A single run is a sequence of one
task, so a sequence gets the guard, the saved model and the resolved recipe as a single run does.

The run directory gets the resolved recipe, metrics per step (JSONL), guard events, the probe
results, the final model or adapter and ``summary.json`` (one task) or ``continual.json`` (a
sequence): all written atomically.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Recipe, RecipeError, SequenceSpec, dump_recipe
from ..data.formats import encode_records, validate, validate_records
from ..data.readers import iter_valid, read_records
from ..io import append_jsonl, write_json, write_text
from ..progress import status
from .rundir import claim, default_run_dir

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    summary: dict[str, Any]
    base_results: list
    final_results: list
    model: Any = None
    tokenizer: Any = None


@dataclass
class Task:
    """One task of a run, read and checked before any model loads; encoded once the tokenizer is there."""

    name: str
    train: list  # Records
    evals: list | None
    kind: str = "generation"
    metric: str = "exact_match"
    max_new_tokens: int = 16
    max_length: int = 512
    chat: bool | None = None
    skip_invalid: bool = False
    skipped: list = field(default_factory=list)  # what skip_invalid dropped, as DataErrors
    examples: list = field(default_factory=list)


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


def read_task(name: str, train: str | None, evals: str | None, *, limit: int | None = None,
              eval_limit: int | None = None, skip_invalid: bool = False, **how: Any) -> Task:
    """Read and validate one task's records (no model needed)."""
    from ..data.builtin.uri import resolve

    if not train:
        raise ValueError("task.train: no training data given (a JSONL/JSON/CSV/Parquet file)")
    records = read_records(resolve(train), limit=limit)
    skipped: list = []
    if skip_invalid:  # drop (and count) what fails the check; the rest must still agree in shape
        report = iter_valid(records, validate, skip_invalid=True)
        if not report.records:
            raise report.skipped[0]
        records, skipped = report.records, report.skipped
    validate_records(records)
    held_out = read_records(resolve(evals)) if evals else None
    if held_out is not None:
        validate_records(held_out)
        held_out = held_out[:eval_limit] if eval_limit else held_out
    return Task(name, records, held_out, skip_invalid=skip_invalid, skipped=skipped, **how)


def load_task(recipe: Recipe):
    """The recipe's task records: (train, eval, skipped)."""
    t = read_recipe_tasks(recipe)[0]
    return t.train, t.evals, t.skipped


def read_recipe_tasks(spec: Recipe | SequenceSpec) -> list[Task]:
    if isinstance(spec, SequenceSpec):
        return [read_task(t.name, t.train, t.eval, eval_limit=spec.eval_limit, kind=t.eval_kind,
                          metric=t.eval_metric, max_new_tokens=t.max_new_tokens, max_length=spec.max_length,
                          chat=spec.chat) for t in spec.tasks]
    t = spec.task
    return [read_task("task", t.train, t.eval, limit=t.limit, eval_limit=t.eval_limit, skip_invalid=t.skip_invalid,
                      kind=t.eval_kind, metric=t.eval_metric, max_new_tokens=t.max_new_tokens,
                      max_length=t.max_length, chat=t.chat)]


class Run:
    """One recipe, phase by phase. Everything that can be wrong in the inputs is found here, before
    the run directory is touched or a model loaded.

    Args:
        spec: a `Recipe` (one task) or a `SequenceSpec` (tasks one after another, or all at once).
        base_results: the base's scores already measured on the same items (``general``, ``tasks``,
            maybe ``guard``), when several runs share a base (the demo, the benchmarks).
        compare_to: measure general ability against this model instead of the one being trained
            (`tether recover` trains a model that already forgot, against its original base).
    """

    def __init__(self, spec: Recipe | SequenceSpec, *, base_results: dict[str, Any] | None = None,
                 compare_to: str | None = None):
        from ..probes.suite import load_suite, validate_suite

        self.t_start = time.perf_counter()
        self.spec = spec
        self.sequence = isinstance(spec, SequenceSpec)
        self.tasks = read_recipe_tasks(spec)
        self.suite = load_suite(spec.general)
        self.general_probes = validate_suite(self.suite, limit=spec.general_limit)
        g = spec.guard
        self.guard_probes = validate_suite(g.suite, limit=g.limit) if g.enabled else None
        self.methods = spec.build_methods()
        self.base_view = any(m.base_view for m in self.methods.values())
        self.needs_reference = any(m.needs_reference for m in self.methods.values())
        if self.guard_probes is not None:
            self.guard_probes = self._guard_subset(self.guard_probes)
        self.replay_path = self._replay_path()
        self.base_name = compare_to or spec.model.name
        self.known_base = dict(base_results or {})
        self.multitask = self.sequence and spec.multitask
        names = [t.name for t in self.tasks]
        self.phases = [("multitask", list(range(len(names))))] if self.multitask else \
            [(n, [i]) for i, n in enumerate(names)]
        self.rows: list[dict[str, Any]] = []  # scores after each phase
        self.guards: list = []
        self.train_outs: list = []
        self.resume_from: Path | None = None  # a checkpoint of this very run to continue from
        self.resume_state: dict[str, Any] = {}

    @classmethod
    def resume(cls, run_dir: str | Path) -> "Run":
        """A killed or failed `tether train` run, rebuilt from its own resolved recipe and base scores, to
        continue from its newest complete checkpoint with every method's and the guard's state."""
        from ..config import load_recipe
        from ..io import load_yaml
        from ..probes.base import ProbeResult
        from .resume import latest_checkpoint, load_state
        from .rundir import RunDirError, read_status

        run_dir = Path(run_dir)
        if (read_status(run_dir) or {}).get("state") == "finished":
            raise RunDirError(f"{run_dir}: holds a finished run: nothing to resume")
        if not (run_dir / "recipe.yaml").is_file():
            raise RecipeError(f"{run_dir}: no recipe.yaml here: not a tether run directory")
        if "tasks" in (load_yaml((run_dir / "recipe.yaml").read_text(encoding="utf-8")) or {}):
            raise RecipeError(f"{run_dir}: a task sequence; --resume continues `tether train` runs")
        spec = load_recipe(run_dir / "recipe.yaml").model_copy(update={"output_dir": str(run_dir)})
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None or not (run_dir / "probes_base.json").is_file():
            raise RecipeError(f"{run_dir}: no complete checkpoint to resume from (one is saved every "
                              f"training.save_steps = {spec.training.save_steps} steps)")
        base = json.loads((run_dir / "probes_base.json").read_text(encoding="utf-8"))
        known = {k: [ProbeResult.from_dict(r) for r in base[k]] for k in ("general", "guard") if base.get(k)}
        known["tasks"] = base["tasks"]
        run = cls(spec, base_results=known, compare_to=base.get("base_model"))
        run.resume_from, run.resume_state = ckpt, load_state(ckpt)
        return run

    def _guard_subset(self, probes: list) -> list:
        wanted = self.spec.guard.probes
        from .guard import without_drift

        return without_drift([p for p in probes if wanted is None or p.name in wanted], self.base_view)

    def _replay_path(self) -> Path | None:
        """The general data methods read (`replay_data`); refused now, not after minutes of scoring the
        base, when a method needs it and there is none."""
        from ..config import DEFAULT_REPLAY_DATA
        from ..data.builtin.uri import resolve

        ref = self.spec.replay_data
        wanting = [n for n, m in self.methods.items() if m.needs_general]
        if not wanting:
            return None  # nothing reads it: not even built
        if ref is None or ref.lower() == "none":
            wanting = [n for n in wanting if not self.methods[n].general_optional]
            if wanting:
                verb = "needs" if len(wanting) == 1 else "need"
                raise RecipeError(f"replay_data: none, and {' and '.join(wanting)} {verb} general data; give a "
                                  f"file (--set replay_data=FILE) or turn {'it' if len(wanting) == 1 else 'them'} "
                                  f"off (e.g. --set {wanting[0]}=false)")
            return None
        if ref == "auto":
            return self.suite.replay_path() or resolve(DEFAULT_REPLAY_DATA)
        return resolve(ref)

    # -- phases ------------------------------------------------------------------------------------
    def setup(self, run_dir: Path) -> None:
        """Model and tokenizer, encoded tasks, task probes, the base's scores."""
        import torch

        from .. import models
        from ..registry import PROBES
        from .scoring import Scoring

        self.run_dir = run_dir
        spec = self.spec
        torch.manual_seed(spec.training.seed)
        with status(f"loading {spec.model.name}"):
            self.model, self.tok = models.load(spec.model.name, dtype=spec.model.dtype)
        for t in self.tasks:
            t.examples, skipped = encode_records(t.train, self.tok, max_length=t.max_length, chat=t.chat,
                                                 skip_invalid=t.skip_invalid)
            t.skipped = t.skipped + skipped
            if t.skipped:
                log.warning("%s: skipped %d invalid records (first: %s)", t.name, len(t.skipped), t.skipped[0])

        def probe(t: Task, limit: int | None = None):
            if not t.evals:
                return None
            items = records_to_eval_items(t.evals, t.chat)
            return PROBES.get(t.kind)(t.name, items[:limit] if limit else items, metric=t.metric,
                                      max_new_tokens=t.max_new_tokens)

        limit = spec.guard.task_limit
        self.scoring = Scoring(self.tok, self.general_probes, self.guard_probes, [probe(t) for t in self.tasks],
                               [probe(t, limit) for t in self.tasks], base_name=self.base_name,
                               dtype=spec.model.dtype)
        self.base = self.scoring.base(self.model, spec.model.name, self.known_base)
        write_json(run_dir / "probes_base.json", _results_json(
            {**self.base, **({"task": self.base["tasks"][0]} if not self.sequence else {}),
             "base_model": self.base_name}))
        if self.needs_reference and not self.base_view:
            self.scoring.frozen_base = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.general_examples = []
        if self.replay_path is not None:  # None unless a method reads general data
            self.general_examples = encode_records(read_records(self.replay_path), self.tok,
                                                   max_length=self.tasks[0].max_length)[0]

    def train_task(self, phase: int) -> Any:
        """Train one phase (a task, or all of them for the multitask bound); returns the HF TrainOutput."""
        from ..data.collate import Collator
        from ..methods.base import Context
        from .guard import ForgettingGuard
        from .resume import CheckpointState, TrainingDone
        from .teacher import make_reference
        from .trainer import JsonlMetrics, TetherTrainer, as_dataset, training_arguments

        spec, t = self.spec, self.spec.training
        label, ids = self.phases[phase]
        examples = [ex for i in ids for ex in self.tasks[i].examples]
        memory = []
        if self.sequence:  # examples of every finished task, replayed with the general data
            rng = random.Random(t.seed + phase)
            for j in range(ids[0]):
                memory += rng.sample(self.tasks[j].examples, min(spec.memory_per_task, len(self.tasks[j].examples)))
        steps = t.max_steps * len(ids)
        ctx = Context(task_index=phase, tokenizer=self.tok, general_examples=list(self.general_examples) + memory,
                      task_examples=examples, output_dir=str(self.run_dir), device=str(self.model.device),
                      seed=t.seed + phase, grad_accum_steps=t.grad_accum, batch_size=t.batch_size,
                      num_batches=steps * t.grad_accum)
        model = self.model
        if phase == 0:
            for m in self.methods.values():
                model = m.prepare_model(model, ctx)
            teacher = self.scoring.frozen_base  # the base: a frozen copy, or None for the adapter-disabled view
        else:  # LwF's teacher is the model as it was before this task
            teacher = copy.deepcopy(model).eval().requires_grad_(False) if self.needs_reference else None
        # the methods' view of the base (a frozen copy, or the adapter-disabled model), their task-start
        # work (EWC's Fisher, O-LoRA's new adapter), then their data (replay's exact per-batch mix)
        if self.needs_reference:
            ctx = dataclasses.replace(ctx, reference=make_reference(model, teacher))
        model.train()
        for m in self.methods.values():
            m.on_task_start(model, ctx)
        data: Any = ctx.task_examples
        for m in self.methods.values():
            data = m.prepare_data(data, ctx)
        data = as_dataset(data)
        args = training_arguments(t.model_copy(update={"max_steps": steps}), str(self.run_dir / "checkpoints"))
        trainer = TetherTrainer(model=model, args=args, train_dataset=data,
                                data_collator=Collator.for_tokenizer(self.tok), methods=self.methods, context=ctx,
                                share_prefix=t.share_prefix)
        trainer.add_callback(JsonlMetrics(self.run_dir / "metrics.jsonl", {"task": phase} if self.sequence else None))
        restored = self.resume_state if self.resume_from is not None and self.resume_state["phase"] == phase else None
        if restored is not None:
            for name, m in self.methods.items():
                m.load_state_dict(restored["methods"][name])
        guard = None
        if self.guard_probes is not None:
            g = spec.guard
            guard = ForgettingGuard(
                lambda m: self.scoring.guard_check(m, ids[-1]), self.base["guard"], threshold=g.threshold,
                action=g.action, every=g.every, run_dir=self.run_dir, adapt_lr_factor=g.adapt_lr_factor,
                on_adapt=lambda ev: _raise_replay(data, g.adapt_replay_step, ev["step"] * t.grad_accum),
                log_fn=trainer.log, kind_thresholds={"drift": g.drift_threshold},
            )
            trainer.add_callback(guard)
            if restored is not None:
                guard.load_state_dict(restored["guard"])
        trainer.add_callback(CheckpointState(trainer, guard, restored, phase))
        try:
            out = trainer.train(resume_from_checkpoint=str(self.resume_from) if restored is not None else None)
        except TrainingDone:  # the checkpoint ended the training: finish as the killed run would have
            from transformers.trainer_utils import TrainOutput

            if guard is not None:
                guard.on_train_end(trainer.args, trainer.state, trainer.control, model=trainer.model)
            step = trainer.state.global_step
            out = TrainOutput(step, restored["total_loss"] / max(step, 1), {})
        self.model = trainer.model
        for m in self.methods.values():
            m.on_task_end(self.model, trainer.context())
        self.guards.append(guard)
        self.train_outs.append(out)
        self.main = trainer.is_world_process_zero()
        return out

    def score(self, phase: int) -> dict[str, Any]:
        """Every task's score and the general probes, after a phase (on the main process only)."""
        label, ids = self.phases[phase]
        with status(f"scoring after {label}" if self.sequence else "scoring the tuned model"):
            row = self.scoring.after(self.model, self.guards[phase], task=ids[-1])
        self.rows.append(row)
        if self.sequence:
            from ..probes.verdict import compare_results

            row["comps"] = compare_results(self.base["general"], row["general"])
            self._write_sequence()
        return row

    def save(self) -> Path:
        """The trained model (the method that owns the weights decides the form), its tokenizer and the
        methods' artefacts."""
        out = self.run_dir / "model"
        with status(f"saving the model to {out}"):
            written = None
            for m in self.methods.values():
                written = written or m.save_model(self.model, out)
            if written is None:
                self.model.save_pretrained(out, safe_serialization=True)
            self.tok.save_pretrained(out)
            for m in self.methods.values():
                m.save(self.run_dir)
            _portable_base(out, self.spec.model.name)
        return out

    def cleanup(self) -> None:
        self.scoring.free()

    # -- outputs -----------------------------------------------------------------------------------
    def summarise(self) -> dict[str, Any]:
        """``summary.json`` of a one-task run."""
        from ..probes.verdict import compare_results, summary

        g = self.spec.guard
        final, out, guard = self.rows[-1], self.train_outs[-1], self.guards[-1]
        write_json(self.run_dir / "probes_final.json", {**_results_json({"general": final["general"]}),
                                                        "task": final["tasks"][0],
                                                        "general_from_guard_step": final["from_guard_step"]})
        comps = compare_results(self.base["general"], final["general"], threshold=g.threshold,
                                kind_thresholds={"drift": g.drift_threshold})
        task_base, task_final = self.base["tasks"][0], final["tasks"][0]
        return {
            "run_dir": str(self.run_dir),
            "methods": list(self.methods),
            "steps": out.global_step,
            "train_loss": out.training_loss if math.isfinite(out.training_loss) else None,
            "seconds": round(time.perf_counter() - self.t_start, 1),
            "task": {"base": task_base, "final": task_final,
                     "gain": None if task_base is None or task_final is None else task_final - task_base},
            "general": summary(comps, g.threshold),
            "probes": [dataclasses.asdict(c) for c in comps],
            "guard": guard.summary() if guard else None,
            "skipped_records": [str(e) for e in self.tasks[0].skipped],
            "method_metrics": {n: m.metrics() for n, m in self.methods.items()},
            "extra_memory_mb": self._extra_memory_mb(),
        }

    def _extra_memory_mb(self) -> float:
        """Memory a method adds beyond the model: a frozen teacher copy, Fisher and anchors, ..."""
        frozen = self.scoring.frozen_base
        copy_mb = sum(p.numel() * p.element_size() for p in frozen.parameters()) / 2**20 if frozen is not None else 0.0
        return copy_mb + sum(v for m in self.methods.values() for k, v in m.metrics().items()
                             if k.endswith("memory_mb"))

    def _write_sequence(self, metrics: dict | None = None) -> dict[str, Any]:
        base_general = self.base["general"]
        comps = [r["comps"] for r in self.rows]
        out = {
            "tasks": [t.name for t in self.tasks], "matrix": [r["tasks"] for r in self.rows],
            "base": self.base["tasks"], "multitask": self.multitask,
            "general_probes": [r.name for r in base_general],
            "general": [[c.rel_change for c in row] for row in comps],
            "general_drop": [[c.drop for c in row] for row in comps],
            "general_base": {r.name: r.score for r in base_general},
            "metrics": metrics, "methods": list(self.methods),
            "method_metrics": {n: m.metrics() for n, m in self.methods.items()},
            "guard": [g.summary() if g else None for g in self.guards],
            "steps_per_task": self.spec.training.max_steps,
            "seconds": None if metrics is None else round(time.perf_counter() - self.t_start, 1),
        }
        write_json(self.run_dir / "continual.json", out)
        return out

    def finish_sequence(self) -> dict[str, Any]:
        """Accuracy matrix, transfer and forgetting metrics, the matrix plot."""
        from .cl_metrics import cl_metrics, plot_accuracy_matrix

        names = [t.name for t in self.tasks]
        R = [r["tasks"] for r in self.rows]
        R = R if not self.multitask else [R[0]] * len(names)  # multitask: one model, every row alike
        gen_mean = [sum(c.drop for c in r["comps"]) / len(r["comps"]) if r["comps"] else 0.0 for r in self.rows]
        metrics = cl_metrics(R, self.base["tasks"], general=[1.0 - d for d in gen_mean], general_base=1.0)
        out = self._write_sequence(metrics.to_dict())
        if not self.multitask:
            plot_accuracy_matrix(R, names, self.run_dir / "plots" / "accuracy_matrix.png")
        return out

    # -- the whole run -----------------------------------------------------------------------------
    def execute(self, *, overwrite: bool = False, keep_model: bool = False):
        """Claim the run directory, then setup -> (train_task -> score) per phase -> save -> cleanup."""
        spec = self.spec
        if spec.output_dir is None:
            stem = f"{self.tasks[0].name}-sequence" if self.sequence else spec.task.train
            kind = "continual" if self.sequence else "train"
            spec = spec.model_copy(update={"output_dir": default_run_dir(stem, kind)})
            self.spec = spec
        resume = self.resume_from is not None
        with claim(spec.output_dir, overwrite=overwrite, kind="continual" if self.sequence else "train",
                   resume=resume) as run_dir:
            if resume:
                from .resume import truncate_logs

                truncate_logs(run_dir, self.resume_state["step"])
                log.info("resuming %s from %s (step %d)", run_dir, self.resume_from.name, self.resume_state["step"])
            else:
                write_text(run_dir / "recipe.yaml", dump_recipe(spec))
            self.setup(run_dir)
            try:
                for phase in range(len(self.phases)):
                    self.train_task(phase)
                    if not self.main:  # scored and saved once, on the main process (torchrun / accelerate launch)
                        continue
                    if phase == len(self.phases) - 1:
                        self.save()  # before the last scoring, whose adapter merges may round the weights
                    self.score(phase)
                if not self.main:
                    return TrainResult(run_dir, {}, self.base["general"], []) if not self.sequence else {}
                return self._finish(keep_model)
            finally:
                self.cleanup()

    def _finish(self, keep_model: bool):
        from ..report.html import write_report

        if self.sequence:
            out = self.finish_sequence()
            out["_base"] = (self.base["tasks"], self.base["general"])  # for callers sharing one base
            return out
        summary = self.summarise()
        write_json(self.run_dir / "summary.json", summary)
        write_report(self.run_dir)  # report.html + plots/*.svg|png, readable without running anything
        append_jsonl(self.run_dir / "metrics.jsonl", {"event": "end", "task": summary["task"]})
        return TrainResult(self.run_dir, summary, self.base["general"], self.rows[-1]["general"],
                           self.model if keep_model else None, self.tok if keep_model else None)


def train(recipe: Recipe, *, base_results: dict[str, Any] | None = None, keep_model: bool = False,
          compare_to: str | None = None, overwrite: bool = False) -> TrainResult:
    """Run one recipe (one task).

    Args:
        base_results: ``{"general": [...], "task": float}`` (and maybe ``"guard"``) already measured
            on the base; skips re-scoring when several runs share a base (the demo and the benchmarks do).
        compare_to: measure general ability against this model instead of the one being trained.
        overwrite: replace what ``recipe.output_dir`` holds; otherwise a directory holding anything
            is refused before anything is written.
    """
    known = dict(base_results or {})
    if "task" in known:
        known["tasks"] = [known.pop("task")]
    return Run(recipe, base_results=known, compare_to=compare_to).execute(overwrite=overwrite, keep_model=keep_model)


def run_continual(seq: SequenceSpec, *, base: tuple[list[float], list] | None = None,
                  overwrite: bool = False) -> dict[str, Any]:
    """Train a sequence; ``base`` (task scores, general ProbeResults of the untrained model on the same
    items, as returned under ``"_base"``) skips re-scoring it when several runs share a base."""
    known = {"tasks": base[0], "general": base[1]} if base is not None else None
    return Run(seq, base_results=known).execute(overwrite=overwrite)


def _results_json(results: dict[str, Any]) -> dict[str, Any]:
    return {k: [r.to_dict() for r in v] if isinstance(v, list) and v and hasattr(v[0], "to_dict") else v
            for k, v in results.items()}


def _raise_replay(dataset, step: float, start: int) -> dict:
    """Guard 'adapt': ask a replay-mixed dataset for a higher ratio in the batches still to come."""
    from ..methods.base import PlannedData

    if isinstance(dataset, PlannedData) and dataset.ratio is not None:
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
