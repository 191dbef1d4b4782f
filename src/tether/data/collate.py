"""Pad a list of examples into one batch of tensors.

Right padding keeps positions ``0..n-1`` for the real tokens, so a causal model sees the same
prefix it would see unpadded; labels are padded with ``-100`` so padding never enters the loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .formats import IGNORE_INDEX


def _field(item: Any, key: str, default: Any = None) -> Any:
    if isinstance(item, dict):
        return item.get(key, default)
    return getattr(item, key, default)


class Collator:
    """Batch ``Example`` objects or dicts with ``input_ids`` / ``labels`` (and maybe ``is_replay``).

    Args:
        pad_token_id (int): id written into padded ``input_ids`` positions (masked out anyway).
        pad_to_multiple_of (int | None): round the padded length up to a multiple of this
            (tensor-core friendly shapes on GPU); ``None`` pads to the longest example.

    Returns (from ``__call__``): ``{"input_ids", "attention_mask", "labels"}`` as ``long``
    tensors of shape ``[batch, length]``, plus ``"is_replay"`` (``bool``, ``[batch]``) and
    ``"replay_index"`` (``long``, ``[batch]``, -1 on task rows) when the items carry ``is_replay``.
    A dictionary, as HF's Trainer moves it to the device; its keys are the fields of
    `tether.methods.base.Batch`, which the trainer builds from it for the methods.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        if pad_to_multiple_of is not None and pad_to_multiple_of <= 0:
            raise ValueError("pad_to_multiple_of must be > 0")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    @classmethod
    def for_tokenizer(cls, tokenizer) -> "Collator":
        """Padding with the tokenizer's pad id, or 0 where it has none (padding is masked out anyway)."""
        pad = getattr(tokenizer, "pad_token_id", None)
        return cls(pad if pad is not None else 0)

    def __call__(self, items: Sequence[Any]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        ids = [list(_field(it, "input_ids")) for it in items]
        labels = [_field(it, "labels") for it in items]
        labels = [list(lab) if lab is not None else list(i) for lab, i in zip(labels, ids)]
        width = max(len(i) for i in ids)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            width = (width + m - 1) // m * m
        n = len(ids)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        out_labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        for row, (i, lab) in enumerate(zip(ids, labels)):
            if len(lab) != len(i):
                raise ValueError(f"example {row}: {len(i)} input_ids but {len(lab)} labels")
            input_ids[row, : len(i)] = torch.as_tensor(i, dtype=torch.long)
            attention_mask[row, : len(i)] = 1
            out_labels[row, : len(lab)] = torch.as_tensor(lab, dtype=torch.long)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": out_labels}
        flags = [_field(it, "is_replay") for it in items]
        if any(f is not None for f in flags):
            batch["is_replay"] = torch.tensor([bool(f) for f in flags], dtype=torch.bool)
            batch["replay_index"] = torch.tensor([int(_field(it, "replay_index", -1)) for it in items])
        return batch
