"""Label-free drift: how far the tuned model's next-token distributions moved from the base model's.

Needs no answers, so it runs on any prompts (including the user's own). For every prompt, both
models are teacher-forced over the prompt tokens; at each position we take
``KL(p_base || p_tuned) = sum_v p_base(v) (log p_base(v) - log p_tuned(v))`` and whether the two
greedy (argmax) tokens agree. The base model is a second `Scorer`, or, for a PEFT model, the same
weights with adapters disabled (`Scorer.reference_view`), so no second copy is loaded.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..data.readers import Record
from ..registry import register_probe
from .base import Probe, ProbeResult
from .generation import check_prompt, prompt_ids
from .stats import check_options, probe_result

DEFAULTS: dict[str, Any] = {"chat": None, "n_boot": 1000}


def kl_and_agreement(ref_lp: torch.Tensor, lp: torch.Tensor) -> tuple[float, float]:
    """Mean over positions of ``KL(ref || model)`` and of argmax agreement, from ``[T, V]`` log-probs."""
    n = min(len(ref_lp), len(lp))  # scorers with different max_length cut at different points
    ref_lp, lp = ref_lp[:n], lp[:n]
    kl = (ref_lp.exp() * (ref_lp - lp)).sum(-1).clamp_min(0.0)  # clamp: float error below zero
    agree = (ref_lp.argmax(-1) == lp.argmax(-1)).float()
    return float(kl.mean()), float(agree.mean())


@register_probe("drift")
class DriftProbe(Probe):
    """Greedy agreement with the base model on ``{"prompt"}`` items (higher is better; 1 = no drift).

    ``reference`` in `run`: a `Scorer` over the base model; ``None`` for a PEFT model (its
    adapters are disabled for the reference pass); or ``"self"`` when the scored model *is* the
    base (agreement 1, KL 0 without running it twice). ``extra["kl"]`` is the mean KL in nats.

    Options:
        chat: use the chat template for string prompts (message-list prompts always use it).
        n_boot: bootstrap resamples for the CI.
    """

    metric = "agreement"
    higher_is_better = True

    def __init__(self, name: str, items: list[dict], **kw: Any):
        super().__init__(name, items, **kw)
        self.opts = check_options(self, DEFAULTS)
        self._prompts: tuple[Any, list] | None = None

    @staticmethod
    def validate_item(rec: Record) -> None:
        """Raise `DataError` naming file, line and field for a malformed item."""
        check_prompt(rec)

    def _ids(self, tok) -> list[list[int]]:
        return prompt_ids(self, tok)

    def run(self, scorer, *, reference=None) -> ProbeResult:
        t0 = time.perf_counter()
        ids = self._ids(scorer.tokenizer)
        if isinstance(reference, str) and reference == "self":
            kls, agree = [0.0] * len(ids), [1.0] * len(ids)
        elif reference is not None:
            kls, agree = self._compare(scorer, reference, ids)
        elif scorer.is_peft:
            with scorer.reference_view() as ref:
                kls, agree = self._compare(scorer, ref, ids)
        else:
            raise ValueError(f"probe {self.name!r} (drift) needs a reference: a Scorer over the base model, "
                             "a PEFT model (its adapters are switched off), or reference='self' when "
                             "scoring the base model itself")
        kl = sum(kls) / len(kls) if kls else float("nan")
        result = probe_result(self, agree, n_boot=self.opts["n_boot"], extra={"kl": kl})
        result.seconds = time.perf_counter() - t0
        return result

    @staticmethod
    def _compare(scorer, reference, ids: list[list[int]]) -> tuple[list[float], list[float]]:
        kls, agree = [0.0] * len(ids), [0.0] * len(ids)
        # both iterators order items by length alone, so they stay aligned item by item
        for (i, lp), (j, ref_lp) in zip(scorer.iter_logprobs(ids), reference.iter_logprobs(ids)):
            assert i == j, "scorers disagree on item order"
            kls[i], agree[i] = kl_and_agreement(ref_lp, lp)
        return kls, agree
