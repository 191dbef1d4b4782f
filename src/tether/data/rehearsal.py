"""Self-synthesised rehearsal: the model's own answers to general prompts, used as replay data.

Why: replaying a dataset's answers pulls the model toward *that dataset's* style (ChatterBot's
replies are terse), not toward what the model said before tuning. Replaying its own greedy
answers keeps its behaviour on general prompts: pseudo-rehearsal (Robins 1995,
https://doi.org/10.1080/09540099550039318) as done for LLMs by Huang et al., "Mitigating
Catastrophic Forgetting in Large Language Models with Self-Synthesized Rehearsal",
https://arxiv.org/abs/2403.01244.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import torch

from .formats import IGNORE_INDEX, Example


def prompt_ids(example: Example) -> list[int] | None:
    """The tokens before the first target token, or None for plain text (no prompt) / no target."""
    first = next((i for i, t in enumerate(example.labels) if t != IGNORE_INDEX), None)
    return list(example.input_ids[:first]) if first else None


@torch.no_grad()
def self_rehearsal(model: torch.nn.Module, tokenizer, examples: Sequence[Example], *, max_new_tokens: int = 96,
                   batch_size: int = 16) -> tuple[list[Example], int]:
    """Replace each example's answer with ``model``'s greedy answer to the same prompt.

    A multi-turn chat keeps its prompt up to the first target turn and becomes single-turn; an
    answer that stopped on EOS keeps the EOS as a target (so the model keeps learning when to stop).
    Plain-text examples (no prompt) are returned unchanged. Runs in ``eval()`` mode and restores
    every module's mode. Returns ``(examples, number rewritten)``.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen_cfg = copy.deepcopy(model.generation_config)
    gen_cfg.update(do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None,
                   max_new_tokens=max_new_tokens, pad_token_id=pad)
    if gen_cfg.eos_token_id is None:
        gen_cfg.eos_token_id = tokenizer.eos_token_id
    eos = set(gen_cfg.eos_token_id if isinstance(gen_cfg.eos_token_id, list) else [gen_cfg.eos_token_id])
    out = list(examples)
    todo = [(i, p) for i, p in ((i, prompt_ids(e)) for i, e in enumerate(examples)) if p]
    todo.sort(key=lambda ip: -len(ip[1]))  # similar lengths share a batch: less padding
    device = next(model.parameters()).device
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            width = max(len(p) for _, p in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, (_, p) in enumerate(chunk):  # left padding: every prompt ends at the same column
                ids[row, width - len(p):] = torch.tensor(p)
                mask[row, width - len(p):] = 1
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_cfg)
            for row, (i, p) in enumerate(chunk):
                new = gen[row, width:].tolist()
                cut = next((k + 1 for k, t in enumerate(new) if t in eos), len(new))  # keep the EOS
                answer = new[:cut]
                out[i] = dataclasses.replace(
                    examples[i], input_ids=p + answer, labels=[IGNORE_INDEX] * len(p) + answer,
                    completion=tokenizer.decode(answer, skip_special_tokens=True))
    finally:
        for m, training in modes.items():
            m.train(training)
    return out, len(todo)
