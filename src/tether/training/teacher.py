"""The teacher: the base model's view of a batch, which the trainer hands methods as ``ctx.reference``.

Under PEFT the teacher is the *same* model with its adapters switched off (no second copy in
memory); otherwise a frozen copy. Right after the student's forward of the same batch it may start
at the first block that trains (`tether.trunk`), checked once against a whole forward. Methods see
only the `tether.methods.base.Reference` protocol this implements.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch

from .. import prefix, trunk
from ..methods.base import Batch, eval_mode
from ..models import adapter_layers, adapters_off, unwrap_parallel

log = logging.getLogger(__name__)


def run_logits(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """``model``'s logits on ``batch``; the rows of each of its ``prefix_groups`` run their shared prefix once."""
    return prefix.logits(model, batch.input_ids, batch.attention_mask, batch.prefix_groups)


class TrunkState:
    """Whether the teacher starts from the student's activations (`tether.trunk`), and from which block."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.trunk: trunk.Trunk | None = None
        self.key: tuple | None = None
        self.verified = False

    @property
    def depth(self) -> int:
        """Blocks the teacher skips (0: it runs them all)."""
        return self.trunk.k if self.enabled and self.trunk is not None and self.verified else 0

    def off(self, why: str, warn: bool = False) -> None:
        (log.warning if warn else log.info)("lwf: the teacher runs every block from now on (%s)", why)
        self.enabled = False
        if self.trunk is not None:
            self.trunk.close()
            self.trunk = None


def _distributed_unsafe(m: torch.nn.Module) -> bool:
    """Sharded models (FSDP, DeepSpeed) gather weights per block in step on every rank: a rank that
    skipped blocks another ran would hang them. Plain DDP (or one process) runs the teacher locally."""
    if isinstance(m, torch.nn.parallel.DistributedDataParallel):
        return False
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _teacher(run: Callable[[], torch.Tensor], model: torch.nn.Module, teacher: torch.nn.Module | None, batch: Batch,
             state: TrunkState, student_ran: bool) -> torch.Tensor:
    """``run()`` (the teacher's logits on ``batch``), started at the first block the student (``model``, as
    the trainer holds it) trains where that is exact; the first such run is checked against a whole one.
    ``teacher``: a frozen copy, or ``None`` for the student itself with its adapters off."""
    if not (student_ran and state.enabled) or _distributed_unsafe(model):
        return run()
    student = unwrap_parallel(model)
    teacher = student if teacher is None else teacher
    key = (id(student), id(teacher), sum(p.requires_grad for p in student.parameters()))
    if state.key != key:  # a new model, or another task's adapters: look again
        if state.trunk is not None:
            state.trunk.close()
        state.key, state.verified = key, False
        state.trunk = trunk.Trunk.build(student, teacher)
        return run()  # the student's forward ran before the hook existed
    if state.trunk is None:
        return run()
    try:
        records = state.trunk.take(trunk.calls(batch.prefix_groups))
        with state.trunk.replaying(records):
            logits = run()
    except trunk.Mismatch as e:
        state.off(str(e))
        return run()
    if not state.verified:
        whole = run()
        mask = batch.attention_mask
        mask = torch.ones(whole.shape[:2], dtype=torch.bool, device=whole.device) if mask is None else mask.bool()
        err = prefix.relative_error(whole[mask], logits[mask])
        if err > prefix.RTOL:
            state.off(f"starting at block {state.trunk.k} changed its logits by {err:.3g} of their spread", warn=True)
            return whole
        state.verified = True
        log.info("lwf: the teacher starts at block %d; blocks 0-%d compute what the student's did (frozen, "
                 "adapters at zero)", state.trunk.k, state.trunk.k - 1)
    return logits


class Teacher:
    """A `tether.methods.base.Reference`: a frozen copy's logits, or (``frozen`` None) the trained
    model's own with its adapters off. ``trunk`` says whether, and from which block, it starts from
    the student's activations."""

    def __init__(self, frozen: torch.nn.Module | None, share_trunk: bool = True):
        self.frozen = frozen
        self.trunk = TrunkState(share_trunk)
        self._view: dict = {}  # the adapter-disabled view's model and module walks, built once per model

    @property
    def skipped_blocks(self) -> int:
        return self.trunk.depth

    def __call__(self, model: torch.nn.Module, batch: Batch, student_ran: bool = False) -> torch.Tensor:
        frozen = self.frozen
        if frozen is not None:
            def run() -> torch.Tensor:
                with torch.no_grad():
                    return run_logits(frozen, batch).detach()

            return _teacher(run, model, frozen, batch, self.trunk, student_ran)

        m = unwrap_parallel(model)  # disable_adapter lives on the PeftModel inside
        view = self._view
        if view.get("model") is not m:  # once per model: the walks below are most of the cost
            view.update(model=m, modules=list(m.modules()), layers=adapter_layers(m))

        def run() -> torch.Tensor:
            with torch.no_grad(), eval_mode(view["modules"]), adapters_off(m, view["layers"]):
                return run_logits(m, batch).detach()

        return _teacher(run, model, None, batch, self.trunk, student_ran)


def make_reference(model: torch.nn.Module, frozen_copy: torch.nn.Module | None = None,
                   share_trunk: bool = True) -> Teacher:
    """Build ``ctx.reference`` (see `tether.methods.base.Reference` for its contract).

    - ``frozen_copy`` given: it is evaluated (the ``model`` argument of a call is ignored).
    - PEFT model (has ``disable_adapter``): the same model runs with its adapters off, so the
      teacher costs no memory.
    - otherwise: a frozen deep copy of ``model`` is made now (one more model in memory).

    ``share_trunk``: with ``student_ran=True``, skip the leading blocks whose activations the teacher
    shares with the student (`tether.trunk`); the same logits to float rounding.
    """
    if frozen_copy is None and not hasattr(model, "disable_adapter"):
        frozen_copy = copy.deepcopy(model)
        mb = sum(p.numel() * p.element_size() for p in frozen_copy.parameters()) / 2**20
        log.info("lwf: teacher is a frozen copy of the model (%.1f MB)", mb)
    if frozen_copy is not None:
        frozen_copy.eval()
        frozen_copy.requires_grad_(False)
    return Teacher(frozen_copy, share_trunk)
