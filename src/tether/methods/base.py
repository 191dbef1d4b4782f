"""The method plugin interface.

A method is a small object whose hooks default to no-ops (Avalanche's plugin idea, far fewer
hooks). ``__init__`` only stores its typed config; learned state carries a trailing underscore
(``fisher_``). Methods never import each other and never mutate trainer state: ``extra_loss``
*returns* named loss terms that the trainer sums and logs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class Context:
    """What a hook may see. Built by the trainer; methods never reach into trainer internals.

    Attributes:
        task_index: index of the current task in a sequence (0 for a single run).
        step: optimizer steps taken so far.
        tokenizer: the run's tokenizer.
        general_examples: tokenised general data (list of ``tether.data.Example``), e.g. the
            replay split; used for Fisher estimation, LwF prompts and replay.
        reference: the base model's view of a batch (a `Reference`: adapters disabled for PEFT
            models, a frozen copy otherwise), or ``None``; the trainer gives one to methods with
            ``needs_reference`` (`tether.training.teacher.make_reference`).
        output_dir: run directory for artefacts a method saves (e.g. ``fisher.safetensors``).
        device: torch device of the model.
        seed: run seed.
        grad_accum_steps: gradient-accumulation steps, so loss terms scale the same at 1 and N.
        task_examples: tokenised examples of the current task (before any mixing).
        batch_size: examples per optimizer micro-batch on one process.
        num_batches: micro-batches the run will consume (max_steps * grad_accum_steps).
    """

    task_index: int = 0
    step: int = 0
    tokenizer: Any = None
    general_examples: list = field(default_factory=list)
    reference: Reference | None = None
    output_dir: str | None = None
    device: str = "cpu"
    seed: int = 0
    grad_accum_steps: int = 1
    task_examples: list = field(default_factory=list)
    batch_size: int = 8
    num_batches: int = 0


@dataclass(frozen=True)
class Batch:
    """One training micro-batch as the methods see it; the trainer builds it, methods only read it.

    Why typed: the fields one method fills and another reads (replay's row flags, which LwF
    distils on; the trainer's prefix plan, which LwF's teacher reuses) are part of the method
    interface, so they are named and documented here, not passed as loose dictionary keys.

    Attributes:
        input_ids: ``[B, L]`` token ids, right-padded.
        attention_mask: ``[B, L]``, 1 on real tokens, or ``None``.
        labels: ``[B, L]``, ``-100`` where no loss is taken.
        is_replay: ``[B]`` bool, the rows a replay-mixing dataset put in (``None``: no such dataset).
        replay_index: ``[B]`` long, each replay row's index in ``Context.general_examples`` (-1 on
            task rows), or ``None``.
        prefix_groups: the trainer's `tether.prefix` plan when the student's forward ran each
            group's shared prompt prefix once (a forward of this batch may reuse it), else ``None``.
        teacher_prefix_groups: a plan valid only for forwards in eval mode (the student's rows ran
            whole because of dropout; a teacher's forward, which has none, may still share), else ``None``.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor | None = None
    is_replay: torch.Tensor | None = None
    replay_index: torch.Tensor | None = None
    prefix_groups: list | None = None
    teacher_prefix_groups: list | None = None

    @classmethod
    def from_inputs(cls, inputs: dict[str, Any], **extra: Any) -> "Batch":
        """From a collated dictionary (`tether.data.collate.Collator`'s output), plus trainer fields."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in inputs.items() if k in known}, **extra)

    def forward_inputs(self) -> dict[str, torch.Tensor]:
        """What a model's forward takes from this batch."""
        out = {"input_ids": self.input_ids}
        if self.attention_mask is not None:
            out["attention_mask"] = self.attention_mask
        return out

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


class Reference(Protocol):
    """``Context.reference``: the base model's logits on a batch (LwF's teacher).

    Why a protocol: methods reach the teacher only through the context (they never import the
    training layer that builds it), so what they may ask of it is declared here.

    ``reference(model, batch, student_ran=False)`` returns detached ``[B, L, V]`` logits of
    ``batch.input_ids`` (with its ``attention_mask``; each of ``batch.prefix_groups``' shared prefixes
    run once when set), computed without gradients in eval mode, leaving weights, ``.grad`` and every
    module's mode as it found them. ``model`` is the model in training (whose adapters a PEFT view
    switches off). ``student_ran=True`` says the student has just run exactly this batch (its rows,
    its prefix groups) in training mode, so the reference may start from the student's activations
    at the first block that trains. ``skipped_blocks``: how many leading blocks it now skips that way
    (0: it runs them all), for the log.
    """

    skipped_blocks: int

    def __call__(self, model: torch.nn.Module, batch: Batch, student_ran: bool = False) -> torch.Tensor: ...


@runtime_checkable
class PlannedData(Protocol):
    """A dataset ``prepare_data`` returns when it fixes its own batches (replay's exact per-batch ratio).

    The trainer feeds ``batches`` (lists of indices) as the batch sampler instead of shuffling; the
    guard's ``adapt`` action asks for a higher ``ratio`` in the batches from ``start`` on.
    """

    batches: Any
    ratio: float | None

    def set_ratio(self, ratio: float, start: int) -> None: ...


def example_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: the summed next-token NLL over its target tokens (labels != -100) and their count.

    The one place the trainer (loss balancing, task/replay loss log) and replay (MSSR strengths)
    take per-example losses from a forward pass's logits; float32, shifted like HF's causal LM loss.
    Only the target positions reach the softmax: a task row has a few label tokens among ~100
    prompt tokens, and a full-vocabulary log-softmax over every position cost ~6% of a LoRA step.
    """
    shift_labels = labels[:, 1:].to(logits.device)
    rows, cols = (shift_labels != -100).nonzero(as_tuple=True)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1][rows, cols].float(), shift_labels[rows, cols],
                                            reduction="none")
    sums = torch.zeros(labels.shape[0], dtype=nll.dtype, device=nll.device).index_add(0, rows, nll)
    counts = torch.bincount(rows, minlength=labels.shape[0]).to(nll.dtype)
    return sums, counts


@contextlib.contextmanager
def eval_mode(modules: list[torch.nn.Module]) -> Iterator[None]:
    """Every module in eval mode for a block, then each back to its own mode.

    Why not ``model.eval()`` and ``mod.train(mode)``: ``train()`` recurses, so restoring module by
    module visits each subtree again; on Qwen2-0.5B under LoRA (2,000 modules) that alone cost more
    than a teacher forward's kernels on a GPU.
    """
    states = [vars(mod) for mod in modules]  # the flag lives there; nn.Module.__setattr__ is slow
    was = [state["training"] for state in states]
    for state in states:
        state["training"] = False
    try:
        yield
    finally:
        for state, training in zip(states, was):
            state["training"] = training


class Method:
    """Base class for every method; all hooks are optional.

    A method is one file under ``methods/`` registered with ``@register_method("name")``; the class
    attributes below are everything the rest of tether learns about it, so no other file names it.
    """

    #: registered name, set by ``@register_method``
    registered_name: ClassVar[str] = ""
    #: the typed settings of ``methods.<name>`` in a recipe (a pydantic model); None: no settings
    config_class: ClassVar[type | None] = None
    #: which weights this method makes trainable: ``"all"`` (full fine-tuning) or ``"adapters"`` (it
    #: wraps the model in adapters it owns, and saves them); at most one method in a recipe sets it
    trains: ClassVar[str | None] = None
    #: after ``prepare_model`` the model shows the base's outputs with its adapters switched off
    #: (PEFT's ``disable_adapter``), so a probe or teacher needs no second, frozen copy of the base
    base_view: ClassVar[bool] = False
    #: place in model preparation (lower first, ties in recipe order): a method that reshapes the
    #: model goes before one that freezes parameters, so freezing sees the adapters it must freeze
    order: ClassVar[int] = 50
    #: does this method need a reference (base) model view in ``ctx.reference``?
    needs_reference: ClassVar[bool] = False
    #: does this method read ``ctx.general_examples`` (the replay data)? The run loads it only then;
    #: a property where a setting decides (LoRA's ``init: contrast``)
    needs_general: bool = False
    #: can it run without any general data (then it says so in the log)? If not, a run without
    #: replay data is refused before the model loads
    general_optional: ClassVar[bool] = False

    def __init__(self, config: Any = None):
        self.config = config

    @classmethod
    def make_config(cls, settings: dict[str, Any] | None) -> Any:
        """The typed config from a recipe's ``methods.<name>`` mapping (pydantic errors propagate)."""
        return cls.config_class(**(settings or {})) if cls.config_class is not None else dict(settings or {})

    def provides(self) -> set[str]:
        """What this method, as configured, puts into every batch for others to read (e.g.
        ``{"replay_rows"}``: `Batch.is_replay` marks rows it mixed in)."""
        return set()

    def check(self, others: dict[str, "Method"]) -> None:
        """Cross-method validation, before any model loads: raise ``ValueError`` (message starting
        with the recipe key) when this method cannot run beside ``others`` as configured."""

    def prepare_model(self, model: torch.nn.Module, ctx: Context) -> torch.nn.Module:
        """Freezing, PEFT wrapping, extra adapters; runs before the optimizer is built."""
        return model

    def prepare_data(self, dataset: list, ctx: Context) -> list:
        """Change the task data, e.g. mix in replay examples."""
        return dataset

    def on_task_start(self, model: torch.nn.Module, ctx: Context) -> None:
        """Before training a task: snapshot anchors, estimate importance."""

    def on_task_end(self, model: torch.nn.Module, ctx: Context) -> None:
        """After training a task: Fisher estimation, subspace bookkeeping."""

    def extra_loss(self, model: torch.nn.Module, batch: Batch, outputs: Any, ctx: Context) -> dict[str, torch.Tensor]:
        """Named loss terms to add to the task loss (already scaled as the method wants)."""
        return {}

    def example_weights(self, batch: Batch, ctx: Context) -> torch.Tensor | None:
        """Per-example loss weights ``[B]``, or ``None`` for HF's plain per-token mean.

        With weights, each example's loss is first averaged over its own target tokens, then the
        batch loss is ``Σ w_i loss_i / Σ w_i``; weights from several methods multiply.
        """
        return None

    def before_optimizer_step(self, model: torch.nn.Module, ctx: Context) -> None:
        """Gradient projection or masking."""

    def lr_scale(self, name: str, param: torch.nn.Parameter) -> float:
        """Learning-rate multiplier for one trainable parameter (LoRA+ gives ``B`` more); scales multiply."""
        return 1.0

    def metrics(self) -> dict[str, float]:
        """Numbers worth logging (realised replay ratio, extra memory, ...)."""
        return {}

    def save_model(self, model: torch.nn.Module, out_dir: Path) -> Path | None:
        """Write the trained model to ``out_dir`` in this method's own form (a PEFT adapter, merged
        weights) and return where; None (the default) leaves it to ``model.save_pretrained``."""
        return None

    def save(self, run_dir: Path) -> None:
        """Write artefacts a later run can load (EWC's Fisher) into the run directory."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None
