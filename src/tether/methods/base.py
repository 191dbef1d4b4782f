"""The method plugin interface.

A method is a small object whose hooks default to no-ops (Avalanche's plugin idea, far fewer
hooks). ``__init__`` only stores its typed config; learned state carries a trailing underscore
(``fisher_``). Methods never import each other and never mutate trainer state: ``extra_loss``
*returns* named loss terms that the trainer sums and logs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

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
        reference: callable ``(model, batch) -> logits`` of the base model's view of a batch
            (adapter disabled for PEFT models, a frozen copy otherwise), or ``None``. The one
            ``lwf.make_reference`` builds also takes ``student_ran=True`` (the student has just run this
            very batch: the teacher may start from its activations at the first trained block).
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
    reference: Callable[..., torch.Tensor] | None = None
    output_dir: str | None = None
    device: str = "cpu"
    seed: int = 0
    grad_accum_steps: int = 1
    task_examples: list = field(default_factory=list)
    batch_size: int = 8
    num_batches: int = 0


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
    """Base class for every method; all hooks are optional."""

    #: registered name, set by ``@register_method``
    registered_name: ClassVar[str] = ""
    #: does this method need a reference (base) model view in ``ctx.reference``?
    needs_reference: ClassVar[bool] = False
    #: does this method read ``ctx.general_examples`` (the replay split)? The session loads it only then;
    #: a property where a setting decides (LoRA's ``init: contrast``)
    needs_general: bool = False
    #: can it run without any general data (then it says so in the log)? If not, a suite without a
    #: ``replay:`` section is refused before the model loads
    general_optional: ClassVar[bool] = False

    def __init__(self, config: Any = None):
        self.config = config

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

    def extra_loss(self, model: torch.nn.Module, batch: dict, outputs: Any, ctx: Context) -> dict[str, torch.Tensor]:
        """Named loss terms to add to the task loss (already scaled as the method wants)."""
        return {}

    def example_weights(self, batch: dict, ctx: Context) -> torch.Tensor | None:
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

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None
