"""`tether recover`: repair a model that already forgot, with a replay-heavy mix and the guard watching.

The general probes are compared against the *original* base, and the guard runs in ``recover``
mode: training stops at the first check where every probe is back within budget (or at the step
limit). The summary says how much of the task score survived.
"""

from __future__ import annotations

from pathlib import Path

from ..config import load_recipe
from .run import TrainResult, train


def recover(model: str, base: str, task: str, *, eval_data: str | None = None, max_steps: int = 100,
            replay_ratio: float = 0.75, lr: float = 5e-5, batch_size: int = 8, every: int = 10,
            budget: float = 0.05, suite: str = "general", guard_suite: str = "general-quick",
            output_dir: str | Path | None = None, overrides: list[str] | None = None,
            overwrite: bool = False) -> TrainResult:
    """Continue full fine-tuning of ``model`` on ``task`` mixed with ``replay_ratio`` general replay.

    Args:
        model: the fine-tuned model that forgot (a full model directory).
        base: its original base, the reference for the general probes.
        task: the task's training data, so the task is not given up entirely.
    """
    from .. import models

    if models.is_adapter_dir(models.resolve(model)):
        raise ValueError(f"{model}: recover trains full models; for a LoRA adapter, `tether interpolate` "
                         "scales it back without training")
    recipe = load_recipe(  # recipes/recover.yaml: the methods; the command's options set the rest
        "recover", [f"replay.ratio={replay_ratio}", *(overrides or [])],
        model={"name": model}, task={"train": task, "eval": eval_data}, general=suite,
        training={"max_steps": max_steps, "lr": lr, "batch_size": batch_size},
        guard={"action": "recover", "every": every, "threshold": budget, "suite": guard_suite},
        output_dir=str(output_dir) if output_dir else None,
    )
    result = train(recipe, compare_to=base, overwrite=overwrite)
    task_s = result.summary["task"]
    kept = None
    if task_s["base"] is not None and task_s["final"] is not None and task_s["base"] > 0:
        kept = task_s["final"] / task_s["base"]
    g = result.summary.get("guard") or {}
    result.summary["recovery"] = {"recovered_at": g.get("stopped_at"), "max_steps": max_steps,
                                  "task_kept": kept, "replay_ratio": replay_ratio}
    from ..io import write_json

    write_json(result.run_dir / "summary.json", result.summary)
    return result
