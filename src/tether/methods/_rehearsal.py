"""Self-synthesised rehearsal: the model's own answers to general prompts, used as replay data.

A helper of the replay method (`methods.replay`), private so the method registry does not take it for a
method; it generates with the probes' `Scorer`, which is why it lives above the probes layer.

Why: replaying a dataset's answers pulls the model toward *that dataset's* style (ChatterBot's
replies are terse), not toward what the model said before tuning. Replaying its own greedy
answers keeps its behaviour on general prompts: pseudo-rehearsal (Robins 1995,
https://doi.org/10.1080/09540099550039318) as done for LLMs by Huang et al., "Mitigating
Catastrophic Forgetting in Large Language Models with Self-Synthesized Rehearsal",
https://arxiv.org/abs/2403.01244.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from ..data.formats import IGNORE_INDEX, Example
from ..probes.scorer import Scorer


def prompt_ids(example: Example) -> list[int] | None:
    """The tokens before the first target token, or None for plain text (no prompt) / no target."""
    first = next((i for i, t in enumerate(example.labels) if t != IGNORE_INDEX), None)
    return list(example.input_ids[:first]) if first else None


def self_rehearsal(model: torch.nn.Module, tokenizer, examples: Sequence[Example], *, max_new_tokens: int = 96,
                   batch_size: int = 16) -> tuple[list[Example], int]:
    """Replace each example's answer with ``model``'s greedy answer to the same prompt.

    A multi-turn chat keeps its prompt up to the first target turn and becomes single-turn; an
    answer that stopped on EOS keeps the EOS as a target (so the model keeps learning when to stop).
    Plain-text examples (no prompt) are returned unchanged. Generation is the probes' own
    (`Scorer.generate_ids`: eval mode, no grad, every module's mode restored). Returns
    ``(examples, number rewritten)``.
    """
    todo = [(i, p) for i, p in ((i, prompt_ids(e)) for i, e in enumerate(examples)) if p]
    answers = Scorer(model, tokenizer, batch_size=batch_size).generate_ids([p for _, p in todo],
                                                                           max_new_tokens=max_new_tokens)
    out = list(examples)
    for (i, p), answer in zip(todo, answers):
        out[i] = dataclasses.replace(examples[i], input_ids=p + answer, labels=[IGNORE_INDEX] * len(p) + answer,
                                     completion=tokenizer.decode(answer, skip_special_tokens=True))
    return out, len(todo)
