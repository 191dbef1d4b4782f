"""Run the prompt prefix a batch's rows share once, not once per row.

Task data for instruction-tuned models repeats one system prompt and one instruction in every
example: in the demo's quote routing, 59 of a row's ~90 tokens. A causal model's activations over a
shared prefix do not depend on what follows it, so the prefix runs as a batch of one, its keys and
values are expanded (a view, no copy) to every row, and each row runs only its own suffix on top.
Gradients flow back through the expand and sum over the rows, as if every row had computed the
prefix itself: the same logits and gradients to float rounding, with ``(rows - 1) x prefix`` fewer
token positions through every layer and the output head.

Rows are grouped first (the trainer splits task rows from replay rows, which share only the system
prompt); each group runs at its own padded length, so a long replay answer no longer pads the short
task rows. Not for dropout (one mask would serve every row's prefix), gradient checkpointing (it turns
the cache off) or wrapped distributed models: the caller decides, see ``TetherTrainer``.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Sequence
from typing import Any

import torch

log = logging.getLogger("tether")

MIN_SHARED = 16  # below this the second, small forward costs about what it saves
# largest |plain - shared| logit, in units of the plain logits' spread, that still counts as the same
# forward (float32 rounding: ~1e-5; a cache that loses the prefix: ~1)
RTOL = 5e-2


@dataclasses.dataclass(frozen=True)
class Group:
    """Rows that run together: ``shared`` leading tokens common to all of them (0: a plain forward
    of these rows), ``length`` the longest row's non-padding length."""

    rows: tuple[int, ...]
    shared: int
    length: int


def plan(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, split: torch.Tensor | None = None,
         min_shared: int = MIN_SHARED) -> list[Group]:
    """Group a right-padded ``[B, L]`` batch by ``split`` (a ``[B]`` bool, e.g. ``is_replay``; one
    group when ``None``) and find each group's shared prefix. Every row keeps at least one token of
    its own after the prefix; a left-padded row shares nothing."""
    n, width = input_ids.shape
    if attention_mask is None:
        lengths = [width] * n
    else:
        mask = attention_mask.bool()
        counts = mask.sum(1)
        lengths = counts.tolist()
        # right padding only: a row's ones must come first (a left-padded row gets its own plain group)
        right = (mask.cumprod(1).sum(1) == counts).tolist()
    keys = [0] * n if split is None else [int(v) for v in split.tolist()]
    groups = []
    for key in dict.fromkeys(keys):
        rows = [i for i in range(n) if keys[i] == key]
        length = max(lengths[i] for i in rows)
        shared = 0
        if len(rows) > 1 and (attention_mask is None or all(right[i] for i in rows)):
            limit = min(lengths[i] for i in rows) - 1
            ids = input_ids[rows, :max(limit, 0)]
            same = (ids == ids[:1]).all(0)
            shared = int(same.int().cumprod(0).sum().item()) if limit > 0 else 0
            if shared < min_shared:
                shared = 0
        groups.append(Group(tuple(rows), shared, int(length)))
    return groups


def common_prefix(seqs: Sequence[Sequence[int]], min_shared: int = MIN_SHARED) -> int:
    """Leading tokens every sequence shares, each keeping at least one of its own; 0 below
    ``min_shared`` or for fewer than two sequences (unpadded token lists, as the scorer holds them)."""
    if len(seqs) < 2:
        return 0
    limit = min(len(s) for s in seqs) - 1
    first = seqs[0]
    n = 0
    while n < limit and all(s[n] == first[n] for s in seqs):
        n += 1
    return n if n >= min_shared else 0


def saves(groups: Sequence[Group], width: int) -> bool:
    """Whether ``groups`` share a prefix and run fewer token positions than one plain ``[B, width]`` forward."""
    plain = sum(len(g.rows) for g in groups) * width
    return any(g.shared for g in groups) and positions(groups) < plain


def positions(groups: Sequence[Group]) -> int:
    """Token positions the grouped forward runs: each group's prefix once, then its rows' suffixes."""
    return sum(len(g.rows) * (g.length - g.shared) + g.shared for g in groups)


def cache_keyword(model: torch.nn.Module) -> str | None:
    """The forward argument that takes a KV cache (``cache`` in recent Transformers,
    ``past_key_values`` before), or ``None`` where the model takes neither."""
    base = model
    for attr in ("module", "get_base_model"):  # DDP, then PEFT
        inner = getattr(base, attr, None)
        if inner is not None:
            base = inner() if callable(inner) and attr == "get_base_model" else inner
    params = inspect.signature(base.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return None


def new_cache(model: torch.nn.Module):
    """An empty KV cache for ``model`` to fill with a prefix."""
    from transformers import DynamicCache

    config = getattr(model, "config", None)
    try:
        return DynamicCache(config=config) if config is not None else DynamicCache()
    except TypeError:  # an older Transformers without config-built layers
        return DynamicCache()


def expand_cache(cache: Any, n: int) -> None:
    """Give the batch-of-one prefix cache ``n`` rows: a view per layer where layers expose their
    tensors, else the cache's own (copying) ``batch_repeat_interleave``."""
    layers = getattr(cache, "layers", None)
    if layers and all(hasattr(layer, "keys") and hasattr(layer, "values") for layer in layers):
        for layer in layers:
            if isinstance(layer.keys, torch.Tensor):
                layer.keys = layer.keys.expand(n, *layer.keys.shape[1:])
                layer.values = layer.values.expand(n, *layer.values.shape[1:])
        return
    cache.batch_repeat_interleave(n)


def forward(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
            groups: Sequence[Group], keyword: str | None = None) -> torch.Tensor:
    """``[B, L, V]`` logits of the batch, each group run on its own (prefix once, then the rows'
    suffixes). Only the real (``attention_mask``) positions are the plain forward's logits; padding
    holds the model's output there or, past its group's longest row, zeros. ``keyword``: the cache
    argument (`cache_keyword`, looked up when not given)."""
    keyword = keyword or cache_keyword(model)
    if keyword is None and any(g.shared for g in groups):
        raise ValueError("shared prefix: the model's forward takes no KV cache")
    n, width = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    out: torch.Tensor | None = None
    for g in groups:
        idx = torch.tensor(g.rows, device=input_ids.device)
        ids, mask = input_ids[idx, :g.length], attention_mask[idx, :g.length]
        if g.shared:
            cache = new_cache(model)
            head = model(input_ids=ids[:1, :g.shared], attention_mask=mask[:1, :g.shared], use_cache=True,
                         **{keyword: cache}).logits
            expand_cache(cache, len(g.rows))
            tail = model(input_ids=ids[:, g.shared:], attention_mask=mask, use_cache=True, **{keyword: cache}).logits
            logits = torch.cat([head.expand(len(g.rows), -1, -1), tail], dim=1)
        else:
            logits = model(input_ids=ids, attention_mask=mask).logits
        if len(groups) == 1 and g.length == width:  # one group holds every row, in order
            return logits
        if out is None:
            out = logits.new_zeros((n, width, logits.shape[-1]))
        out[idx, :g.length] = logits
    assert out is not None
    return out


def logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
           groups: Sequence[Group] | None = None) -> torch.Tensor:
    """``model``'s ``[B, L, V]`` logits: grouped (`forward`) when ``groups`` are given, else one plain forward."""
    if groups:
        return forward(model, input_ids, attention_mask, groups)
    mask = {} if attention_mask is None else {"attention_mask": attention_mask}
    return model(input_ids=input_ids, **mask).logits


def relative_error(plain: torch.Tensor, shared: torch.Tensor) -> float:
    """``max |plain - shared|`` over the logits given, in units of ``plain``'s standard deviation."""
    return ((plain.float() - shared.float()).abs().max() / plain.float().std().clamp_min(1e-6)).item()


def agrees(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
           groups: Sequence[Group], keyword: str, rtol: float | None = None) -> bool:
    """Whether the grouped forward gives this model's plain logits on two rows of a shared group
    (checked once per run: an architecture whose cache does not continue a prefix exactly, a sliding
    window shorter than the prefix, say, must not train on wrong logits)."""
    g = next((g for g in groups if g.shared), None)
    if g is None:
        return True
    rows = list(g.rows[:2])
    ids = input_ids[rows, :g.length]
    mask = (torch.ones_like(ids) if attention_mask is None else attention_mask[rows, :g.length]).bool()
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask.long()).logits.float()
        shared = forward(model, ids, mask.long(), [Group((0, 1), g.shared, g.length)], keyword).float()
    err = relative_error(plain[mask], shared[mask])
    rtol = RTOL if rtol is None else rtol
    if err > rtol:
        log.warning("shared prefix: this model's cached forward differs from its plain one (max error %.3g of the "
                    "logits' spread); every row runs its own prefix", err)
    return err <= rtol
