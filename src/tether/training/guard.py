"""The forgetting guard: a Trainer callback that scores general probes every N steps and acts.

It compares each checkpoint with the base scores measured once before training, using the same
paired-bootstrap verdict as ``tether eval`` (a probe "forgot" when its relative drop passes the
threshold *and* its CI excludes zero, so sampling noise on a small probe subset does not fire it).
Actions: ``stop`` (end the run, restore the best checkpoint that stayed within budget), ``adapt``
(lower the learning rate and ask the data for more replay), ``warn``.

Runs identically on every process under DDP (same items, deterministic), so all ranks reach the
same decision without a collective.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from ..io import append_jsonl
from ..models import keep_requires_grad
from ..probes.verdict import compare_results
from .trainer import native_forward

log = logging.getLogger(__name__)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in model.named_parameters() if p.requires_grad}


def weights_stamp(model: torch.nn.Module) -> tuple:
    """Changes whenever a parameter is written in place (an optimizer step, a restore) or replaced, or
    modules are swapped (a merge that unloads adapters): scores taken under one stamp hold while it is
    unchanged. A write through ``.data`` bumps no version (PEFT's unsafe merge/unmerge round trip, at
    rounding level); nothing in a run writes that way between the last guard check and the final scoring."""
    return tuple((n, p.data_ptr(), p._version) for n, p in model.named_parameters())


def restore_trainable(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, v in state.items():
            params[n].copy_(v.to(params[n].device, params[n].dtype))


class ForgettingGuard(TrainerCallback):
    """Args:
        score: ``model -> (general ProbeResults, task score or None)``; scores the live model.
        base_results: general ProbeResults of the base model on the same items.
        threshold: relative drop that counts as forgetting (0.05 = 5%).
        action: ``stop`` | ``adapt`` | ``warn`` | ``recover`` (the reverse: training repairs a model
            that already forgot, and stops at the first check where every probe is back within budget).
        every: evaluate every this many optimizer steps (and at the last step).
        run_dir: where ``guard.jsonl`` and the best trainable weights go.
        on_adapt: called with the event when ``action == "adapt"`` (e.g. raise the replay ratio).
        log_fn: forwards guard metrics to the Trainer's log (and so to ``report_to``).
        kind_thresholds: per probe kind bounds (default `probes.verdict.KIND_THRESHOLDS`).
    """

    def __init__(self, score: Callable[[torch.nn.Module], tuple[list, float | None]], base_results: list, *,
                 threshold: float = 0.05, action: str = "stop", every: int = 20, run_dir: str | Path,
                 adapt_lr_factor: float = 0.5, on_adapt: Callable[[dict], dict] | None = None,
                 log_fn: Callable[[dict], None] | None = None, kind_thresholds: dict[str, float] | None = None):
        self.score = score
        self.base_results = base_results
        self.threshold = threshold
        self.kind_thresholds = kind_thresholds
        self.action = action
        self.every = every
        self.run_dir = Path(run_dir)
        self.adapt_lr_factor = adapt_lr_factor
        self.on_adapt = on_adapt
        self.log_fn = log_fn
        self.events: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None  # {"step", "task_score", "state"}
        self.stopped_at: int | None = None
        self.restored_step: int | None = None
        self.last: dict[str, Any] | None = None  # the latest check's results, for the final scoring to reuse

    # -- decisions -------------------------------------------------------------------------------
    def check(self, model: torch.nn.Module, step: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        with native_forward(model), keep_requires_grad(model):  # a check must not change what trains
            results, task_score = self.score(model)
        self.last = {"step": step, "results": results, "task_score": task_score, "stamp": weights_stamp(model)}
        comps = compare_results(self.base_results, results, threshold=self.threshold,
                                kind_thresholds=self.kind_thresholds)
        breached = [c.probe for c in comps if c.verdict == "forgot"]
        event = {
            "step": step, "task_score": task_score, "breached": breached, "within_budget": not breached,
            "worst_drop": max((c.drop for c in comps), default=0.0),
            "probes": {c.probe: {"score": c.tuned, "base": c.base, "drop": c.drop, "ci": [c.ci_low, c.ci_high],
                                 "verdict": c.verdict} for c in comps},
            "seconds": round(time.perf_counter() - t0, 2), "action": None,
        }
        if not breached:
            self._maybe_keep_best(model, step, task_score)
        return event

    def _maybe_keep_best(self, model, step: int, task_score: float | None) -> None:
        # without a task score the latest checkpoint within budget is the best one
        better = (self.best is None or task_score is None or self.best["task_score"] is None
                  or task_score >= self.best["task_score"])
        if better:
            self.best = {"step": step, "task_score": task_score, "state": trainable_state(model)}

    # -- callback hooks --------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and self.best is None:
            self.best = {"step": 0, "task_score": None, "state": trainable_state(model)}

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        step = state.global_step
        if step % self.every != 0 and step != state.max_steps:
            return control
        event = self.check(model, step)
        if self.action == "recover":
            if not event["breached"]:
                event["action"] = "recovered"
                control.should_training_stop = True
                self.stopped_at = step
                log.warning("guard: every probe is back within %.0f%% at step %d; stopping", 100 * self.threshold, step)
        elif event["breached"]:
            event["action"] = self.action
            if self.action == "stop":
                control.should_training_stop = True
                self.stopped_at = step
                log.warning("guard: %s dropped more than %.0f%% at step %d; stopping",
                            ", ".join(event["breached"]), 100 * self.threshold, step)
            elif self.action == "adapt":
                event["lr_factor"] = self.adapt_lr_factor
                _scale_lr(optimizer, lr_scheduler, self.adapt_lr_factor)
                changes = {"lr_factor": self.adapt_lr_factor, **((self.on_adapt(event) or {}) if self.on_adapt else {})}
                event.update(changes)
                log.warning("guard: adapting at step %d: %s", step, changes)
            else:
                log.warning("guard: %s dropped more than %.0f%% at step %d", ", ".join(event["breached"]),
                            100 * self.threshold, step)
        self.events.append(event)
        if state.is_world_process_zero:  # every rank decides alike; one writes
            append_jsonl(self.run_dir / "guard.jsonl", event)
        if self.log_fn is not None:
            metrics = {"guard/worst_drop": event["worst_drop"], "guard/breached": float(bool(event["breached"]))}
            if event["task_score"] is not None:
                metrics["guard/task_score"] = event["task_score"]
            for name, p in event["probes"].items():
                metrics[f"guard/{name}"] = p["score"]
            # logging resets control.should_log; keep the Trainer's own log of this step
            should_log = control.should_log
            self.log_fn(metrics)
            control.should_log = should_log
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.action != "recover" and self.stopped_at is not None and self.best is not None and model is not None:
            restore_trainable(model, self.best["state"])
            self.restored_step = self.best["step"]
            log.warning("guard: restored the weights of step %d (best within budget)", self.restored_step)
        return control

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to decide as this one would: the history and the best weights so far."""
        return {"events": self.events, "best": self.best, "stopped_at": self.stopped_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.events = list(state["events"])
        self.best = state["best"]
        self.stopped_at = state["stopped_at"]

    def summary(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold, "action": self.action, "every": self.every,
            "checks": len(self.events), "stopped_at": self.stopped_at, "restored_step": self.restored_step,
            "best_step": self.best["step"] if self.best else None,
            "events": [{k: v for k, v in e.items() if k != "probes"} for e in self.events],
        }


def _scale_lr(optimizer, lr_scheduler, factor: float) -> None:
    if optimizer is not None:
        for group in optimizer.param_groups:
            group["lr"] *= factor
    if lr_scheduler is not None and hasattr(lr_scheduler, "base_lrs"):
        lr_scheduler.base_lrs = [lr * factor for lr in lr_scheduler.base_lrs]


def without_drift(probes: list, base_view: bool) -> list:
    """The probes a guard can score: drift needs the base's outputs, which without adapters to switch
    off would take a second copy of the model, so it is left out there."""
    if base_view:
        return list(probes)
    dropped = [p.name for p in probes if p.registered_name == "drift"]
    if dropped:
        log.info("guard: skipping %s (drift needs an adapter to switch off; this model has none)", dropped)
    return [p for p in probes if p.registered_name != "drift"]


class GuardCallback(ForgettingGuard):
    """tether's forgetting guard for a training run of your own (HF `Trainer`, TRL `SFTTrainer`, ...)::

        trainer = SFTTrainer(model=model, args=args, train_dataset=data, ...)
        trainer.add_callback(GuardCallback(trainer, suite="general-quick", threshold=0.05, action="stop"))
        trainer.train()

    The suite's probes are read and checked here, before training. At ``on_train_begin`` the model
    as it starts (a fresh LoRA adapter changes nothing yet) is scored as the base; every ``every``
    steps the live model is scored in memory against it, the events go to ``guard.jsonl`` in the
    trainer's output directory and through ``trainer.log`` to its ``report_to``, and ``stop`` ends
    the run and restores the best weights within budget.

    Args:
        trainer: the run's trainer (its tokenizer, output directory and logger are used).
        suite: a built-in suite name, a suite YAML or a `SuiteSpec`.
        every: steps between checks; default the trainer's ``save_steps`` (each checkpoint scored).
        limit: items per probe (fewer: faster checks, wider CIs).
        drift_threshold: the looser bound for drift probes; drift needs a base view, so it is
            scored only for a PEFT model (adapters switched off), skipped otherwise.
    """

    def __init__(self, trainer, suite: Any = "general-quick", *, threshold: float = 0.05, action: str = "stop",
                 every: int | None = None, limit: int | None = None, drift_threshold: float = 0.25,
                 batch_size: int = 16):
        from ..probes.suite import validate_suite

        args = trainer.args
        if every is None:
            every = args.save_steps if str(args.save_strategy).endswith("steps") and args.save_steps >= 1 else 50
        self.tokenizer = getattr(trainer, "processing_class", None) or getattr(trainer, "tokenizer", None)
        if self.tokenizer is None:
            raise ValueError("GuardCallback: the trainer has no tokenizer (processing_class) to score probes with")
        self.all_probes = validate_suite(suite, limit=limit)
        self.probes: list = []
        self.batch_size = batch_size
        super().__init__(self._score, [], threshold=threshold, action=action, every=int(every), run_dir=args.output_dir,
                         log_fn=trainer.log, kind_thresholds={"drift": drift_threshold})

    def _scorer(self, model):
        from ..probes.scorer import Scorer

        return Scorer(model, self.tokenizer, batch_size=self.batch_size)

    def _score(self, model) -> tuple[list, None]:
        from ..probes.suite import run_suite

        return run_suite(self.probes, self._scorer(model), reference=None, progress=False), None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from ..probes.suite import run_suite

        scorer = self._scorer(model)
        self.probes = without_drift(self.all_probes, scorer.is_peft)
        with native_forward(model), keep_requires_grad(model):
            self.base_results = run_suite(self.probes, scorer, reference="self", progress=False)
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        return super().on_train_begin(args, state, control, model=model, **kwargs)
