"""Resume after a crash: what an HF checkpoint lacks, saved beside it, and put back.

HF's checkpoint holds the weights, the optimizer and scheduler, the RNG states and the step; the
run also needs every method's state (the replay stream's position and realised counts, MSSR's
strengths, EWC's Fisher and anchors, LwF's cursor), the guard's history and best weights, and the
running loss sum behind ``train_loss``. They go to ``tether_state.pt`` in the checkpoint folder,
written last: a checkpoint without it was cut off while saving and is not resumed from.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

STATE = "tether_state.pt"


class TrainingDone(Exception):
    """Raised before the first step of a resumed run whose checkpoint ended the training."""


class CheckpointState(TrainerCallback):
    """On every HF checkpoint, writes ``tether_state.pt`` into it; on a resumed run, restores the
    running loss at the start of training (HF counts ``train_loss`` over the steps of one process)."""

    def __init__(self, trainer, guard=None, restored: dict[str, Any] | None = None, phase: int = 0):
        self.trainer, self.guard, self.restored, self.phase = trainer, guard, restored, phase

    def on_train_begin(self, args, state, control, **kwargs):
        if self.restored is not None:
            self.trainer._total_loss_scalar = self.restored["total_loss"]
            self.trainer._initial_global_step = 0  # the mean over every step of the run, as uninterrupted

    def on_step_begin(self, args, state, control, **kwargs):
        # HF checks for the end only after a step: resumed from a checkpoint taken at the last step (or
        # where the guard stopped) it would train one more. The weights are the checkpoint's by now.
        if self.restored is not None and self.restored["done"]:
            raise TrainingDone

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        t = self.trainer
        payload = {
            "phase": self.phase, "step": state.global_step,
            "methods": {n: m.state_dict() for n, m in t.methods.items()},
            "guard": self.guard.state_dict() if self.guard is not None else None,
            "total_loss": t._total_loss_scalar + float(t._tr_loss),
            "done": state.global_step >= state.max_steps or control.should_training_stop,
        }
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        tmp = folder / f".{STATE}.tmp"
        torch.save(payload, tmp)
        os.replace(tmp, folder / STATE)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (one holding ``tether_state.pt``), or None."""
    found = [(int(m.group(1)), p) for p in (run_dir / "checkpoints").glob("checkpoint-*")
             if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and (p / STATE).is_file()]
    return max(found)[1] if found else None


def load_state(checkpoint: Path) -> dict[str, Any]:
    return torch.load(checkpoint / STATE, weights_only=False, map_location="cpu")


def truncate_logs(run_dir: Path, step: int) -> None:
    """Drop the log lines a killed run wrote after ``step``: the resumed run writes them again."""
    from ..io import write_text

    for name in ("metrics.jsonl", "guard.jsonl"):
        path = run_dir / name
        if not path.exists():
            continue
        keep = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut off by the kill
            if row.get("step", 0) <= step and row.get("event") != "end":
                keep.append(line)
        write_text(path, "".join(f"{line}\n" for line in keep))
