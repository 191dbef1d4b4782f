"""What a run scores with the live model: the base once, the guard's checks, the model after each task.

One object keeps the probes (read and checked before the model loaded) and the rule for the base's
view (PEFT: the adapter switched off; otherwise a frozen copy, or the base loaded again), so the
run driver, the guard and the final scores all score the same way and never the same weights twice.
"""

from __future__ import annotations

import logging
from typing import Any

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


class Scoring:
    """Args:
        tokenizer: the run's tokenizer.
        general_probes: the general suite's probes.
        guard_probes: the guard's probes (drift dropped where the model has no base view), or None.
        task_probes: one probe per task (held-out items), ``None`` for a task without eval data.
        guard_task_probes: the same on the first ``guard.task_limit`` items, for the guard's checks.
        base_name / dtype: the model general scores are compared against, loaded only when needed.
        base_view: the trained model can show the base's outputs itself (`Method.base_view`).
        guard_task_limit: task items the guard scores at each check.
    """

    def __init__(self, tokenizer, general_probes: list, guard_probes: list | None, task_probes: list,
                 guard_task_probes: list, *, base_name: str, dtype: str, batch_size: int = 16):
        self.tok = tokenizer
        self.general_probes = general_probes
        self.guard_probes = guard_probes
        self.task_probes = task_probes
        self.guard_task_probes = guard_task_probes
        self.base_name = base_name
        self.dtype = dtype
        self.batch_size = batch_size
        self.frozen_base = None  # a frozen copy of the base, where a teacher needed one anyway

    def scorer(self, model):
        from ..probes.scorer import Scorer

        return Scorer(model, self.tok, batch_size=self.batch_size)

    def _run(self, probes: list, model, reference):
        from ..probes.suite import run_suite

        return run_suite(probes, self.scorer(model), reference=reference)

    def _base_model(self, like):
        """The base for drift's reference: the frozen copy if one exists, else loaded for this scoring
        only (not kept beside the model while it trains)."""
        if self.frozen_base is not None:
            return self.frozen_base
        from .. import models

        return models.load(self.base_name, dtype=self.dtype, with_tokenizer=False, device=str(like.device))

    def base(self, model, model_name: str, known: dict[str, Any]) -> dict[str, Any]:
        """Base scores: ``general``, ``guard`` (the guard subset) and ``tasks`` (one per task); ``known``
        entries are reused, not re-scored. The general probes score ``base_name`` (a recovery run's
        original base), the tasks the model being trained."""
        out = dict(known)
        with status(f"scoring the base model ({self.base_name}) on the general probes"):
            ref = model
            if self.base_name != model_name and ("general" not in out or "guard" not in out):
                ref = self._base_model(model)
            if "general" not in out:
                out["general"] = self._run(self.general_probes, ref, "self")
            if self.guard_probes is not None and "guard" not in out:
                out["guard"] = self._guard_base(out["general"], ref)
            del ref
            if "tasks" not in out:
                scorer = self.scorer(model)
                out["tasks"] = [p.run(scorer).score if p else None for p in self.task_probes]
        return out

    def _guard_base(self, general: list, ref) -> list:
        """The base's guard scores: a guard probe identical to a general one (the guard watching the
        general suite itself) takes that result as is; only the others are scored."""
        reused = identical_results(self.guard_probes, self.general_probes, general)
        todo = [g for g, r in zip(self.guard_probes, reused) if r is None]
        if len(todo) < len(reused):
            log.info("guard: %d of %d base scores taken from the general suite's", len(reused) - len(todo), len(reused))
        return fill_in(reused, self._run(todo, ref, "self") if todo else [])

    def guard_check(self, model, task: int):
        """One guard check: the guard's probes and the guard's items of task ``task``."""
        probe = self.guard_task_probes[task]
        # drift (base view only) uses the adapter-disabled view; the task probe shares the merged block
        return self._with_task(self.guard_probes, probe, model, None)

    def _with_task(self, probes: list, task_probe, model, reference) -> tuple[list, float | None]:
        """Score ``probes`` and the task probe in one `run_suite` (one adapter merge on CPU)."""
        results = self._run(probes + ([task_probe] if task_probe else []), model, reference)
        return (results[:-1], results[-1].score) if task_probe else (results, None)

    def after(self, model, guard=None, task: int = 0) -> dict[str, Any]:
        """The trained model's general scores and every task's score. A probe the guard's last check
        scored on these very weights (the guard watching the general suite, checking at the last step)
        is taken from that check instead of being scored a second time (``from_guard_step``)."""
        from .guard import weights_stamp

        general, reused_task, reused_from = [None] * len(self.general_probes), None, None
        last = guard.last if guard is not None else None
        if last is not None and last["stamp"] == weights_stamp(model):
            general = identical_results(self.general_probes, self.guard_probes, last["results"])
            probe, checked = self.task_probes[task], self.guard_task_probes[task]
            if probe is not None and checked is not None and len(checked.items) == len(probe.items):
                reused_task = last["task_score"]
            if any(r is not None for r in general):
                reused_from = last["step"]
                log.info("scores of %d of %d general probes taken from the guard's check at step %d",
                         sum(r is not None for r in general), len(general), last["step"])
        todo = [p for p, r in zip(self.general_probes, general) if r is None]
        tasks = [None if p is None or (i == task and reused_task is not None) else p
                 for i, p in enumerate(self.task_probes)]
        scored_tasks: list = []
        if todo or any(tasks):
            with status("scoring the tuned model on the " + ("general probes" if todo else "task")):
                reference = None  # a base view: the adapter-disabled model
                if todo and not self.scorer(model).is_peft:
                    reference = self.scorer(self._base_model(model))
                # the last task probe rides in the general block (one adapter merge); others score after it
                rest = [p for p in tasks if p is not None]
                scored, last_score = self._with_task(todo, rest[-1] if rest else None, model, reference)
                scorer = self.scorer(model)
                scored_tasks = [p.run(scorer).score for p in rest[:-1]] + ([last_score] if rest else [])
            general = fill_in(general, scored)
        it = iter(scored_tasks)
        task_scores = [None if p is None else (reused_task if i == task and reused_task is not None else next(it))
                       for i, p in enumerate(self.task_probes)]
        return {"general": general, "tasks": task_scores, "from_guard_step": reused_from}

    def free(self) -> None:
        self.frozen_base = None
