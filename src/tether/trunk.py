"""Let a teacher forward start where the student's weights first differ from the teacher's.

LwF's teacher runs the batch the student has just run, with the adapters off. When the lowest
blocks train nothing (frozen) and their adapters are zero (a LoRA ``B`` starts at 0 and a frozen one
stays there), the teacher computes in them exactly what the student already computed: under the
default recipe, half of its forward repeats work. A `Trunk` keeps the output of the last such block
(``k - 1``) from the student's forward and, while the teacher runs, swaps blocks ``0..k-1`` for stubs
that hand that output back, so the teacher's real work starts at block ``k``. Embeddings, rotary
positions and the attention mask are still built by the model's own forward (cheap, and whatever
the architecture does there, Gemma's input scaling say, it does for the teacher too).

A cached forward (shared prompt prefixes, `tether.prefix`) reads the prefix length from layer 0 of
the KV cache, which a stub never writes: the stubs give their layers placeholder keys of the right
length (``[rows, 1, tokens, 1]`` zeros; nothing reads them). What cannot be told from structure is
checked: the first use compares the trunk's logits with a whole teacher forward and, on any
difference beyond float rounding (dropout, an adapter type that changes outputs at zero, a cache
layout this does not know), switches the trunk off for the run with a warning.
"""

from __future__ import annotations

import collections
import inspect
import logging
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from . import prefix
from .models import find_blocks

log = logging.getLogger("tether")

_CACHE_KEYS = ("cache", "past_key_values", "past_key_value", "layer_past")
# forwards of one step the records must cover: two prefix groups (task, replay) at two calls each,
# a general mini-batch's as many again, and a recomputation under gradient checkpointing
_MAX_RECORDS = 16


class Mismatch(RuntimeError):
    """The recorded activations do not fit the forward being run (another batch, another order)."""


def shared_depth(blocks: Sequence[torch.nn.Module]) -> int:
    """How many leading blocks compute the same for student and adapter-disabled teacher: nothing in
    them trains, every LoRA ``B`` is zero, no DoRA magnitude, no dropout that training mode would apply."""
    k = 0
    for block in blocks:
        for name, p in block.named_parameters():
            if p.requires_grad or "lora_magnitude" in name:
                return k
            if ("lora_B" in name or "lora_embedding_B" in name) and bool(p.detach().any()):
                return k
        for mod in block.modules():
            if isinstance(mod, torch.nn.Dropout) and mod.p > 0:
                return k
            if float(getattr(mod, "attention_dropout", 0.0) or 0.0) > 0:
                return k
        k += 1
    return k


def trainable_below(model: torch.nn.Module, blocks: torch.nn.ModuleList) -> bool:
    """Whether a parameter that runs before block 0 trains: token or position embeddings (and PEFT's
    trainable token rows inside them). Parameters come in registration order, and every causal LM
    registers its embeddings before its blocks (a tied output head comes once, as the embedding)."""
    first = next(blocks.parameters(), None)
    for p in model.parameters():
        if p is first:
            return False
        if p.requires_grad:
            return True
    return False


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _cache_position(block: torch.nn.Module) -> int | None:
    """Where the block's forward takes the cache among the positional arguments after the hidden
    states (GPT-2 passes it positionally), or ``None``."""
    try:
        params = list(inspect.signature(type(block).forward).parameters)[2:]  # self, hidden_states
    except (TypeError, ValueError):
        return None
    return next((i for i, name in enumerate(params) if name in _CACHE_KEYS), None)


def _pad_cache(cache: Any, layer: int, hidden: torch.Tensor) -> None:
    """Placeholder keys/values for ``layer``: the cache's length reads as if the block had run."""
    z = hidden.new_zeros((hidden.shape[0], 1, hidden.shape[1], 1))
    cache.update(z, z, layer)


class Trunk:
    """Records block ``k - 1``'s output on the student's forwards; `replaying` runs a teacher on them.

    The hook keeps only forwards run with gradients on in training mode (the student's), at most
    ``_MAX_RECORDS``, and is removed with the trunk. A record may require gradients (PEFT makes the
    embedding output require them under gradient checkpointing); the teacher runs under ``no_grad``.
    """

    def __init__(self, student_blocks: Sequence[torch.nn.Module], teacher_blocks: Sequence[torch.nn.Module], k: int):
        if not 0 < k <= len(teacher_blocks):
            raise ValueError(f"trunk depth {k} outside 1..{len(teacher_blocks)}")
        self.k = k
        self.teacher_blocks = list(teacher_blocks)[:k]
        self.cache_at = [_cache_position(b) for b in self.teacher_blocks]
        self.records: collections.deque = collections.deque(maxlen=_MAX_RECORDS)
        handle = student_blocks[k - 1].register_forward_hook(_recorder(self.records))
        self._finalizer = weakref.finalize(self, handle.remove)

    @classmethod
    def build(cls, student: torch.nn.Module, teacher: torch.nn.Module) -> Trunk | None:
        """A trunk for ``student`` (the model in training) and ``teacher`` (the same model or a frozen
        copy), or ``None`` when block 0 already differs."""
        try:
            _, s_blocks = find_blocks(student)
            _, t_blocks = find_blocks(teacher)
        except ValueError:
            return None
        if len(s_blocks) != len(t_blocks) or trainable_below(student, s_blocks):
            return None
        k = shared_depth(s_blocks)
        return cls(s_blocks, t_blocks, k) if k else None

    def close(self) -> None:
        self._finalizer()
        self.records.clear()

    def take(self, calls: int) -> list:
        """The student's last ``calls`` records, oldest first; every record is dropped."""
        got = list(self.records)[-calls:] if calls else []
        self.records.clear()
        if len(got) < calls:
            raise Mismatch(f"{calls} forwards to replay, {len(got)} recorded")
        return got

    @contextmanager
    def replaying(self, records: list) -> Iterator[None]:
        """Blocks ``0..k-1`` of the teacher hand back ``records``, one per forward, in order."""
        queue = collections.deque(records)
        last = self.k - 1

        def stub(i: int, at: int | None):
            def forward(hidden_states, *args, **kwargs):
                if not queue:
                    raise Mismatch("more forwards than recorded")
                out = queue[0]
                if _hidden(out).shape != hidden_states.shape:
                    raise Mismatch(f"recorded {tuple(_hidden(out).shape)}, running {tuple(hidden_states.shape)}")
                cache = next((kwargs[n] for n in _CACHE_KEYS if kwargs.get(n) is not None), None)
                if cache is None and at is not None and at < len(args):
                    cache = args[at]
                if cache is not None and hasattr(cache, "update"):
                    _pad_cache(cache, i, hidden_states)
                if i == last:
                    queue.popleft()
                return out
            return forward

        # a block may carry an instance-level forward already (accelerate's device hooks): put it back
        saved = [block.__dict__.get("forward") for block in self.teacher_blocks]
        for i, block in enumerate(self.teacher_blocks):
            block.forward = stub(i, self.cache_at[i])
        try:
            yield
        finally:
            for block, own in zip(self.teacher_blocks, saved):
                if own is None:
                    del block.forward  # the class's forward again
                else:
                    block.forward = own
        if queue:
            raise Mismatch(f"{len(queue)} recorded forwards left over")


def _recorder(records: collections.deque):
    def hook(module: torch.nn.Module, _args, output):
        if module.training and torch.is_grad_enabled():
            records.append(output)
    return hook


def calls(groups: Sequence[prefix.Group] | None) -> int:
    """Model forwards `prefix.forward` makes for ``groups`` (one when there are none)."""
    return sum(2 if g.shared else 1 for g in groups) if groups else 1
