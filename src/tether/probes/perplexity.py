"""Completion loss on held-out records: the cheapest, least noisy forgetting signal.

Items are records in any shape tether trains on (chat ``messages``, ``prompt``+``completion``,
``text``); they are encoded exactly as for training, so the loss covers the same tokens the
trainer's loss would (assistant turns / completions / whole text).
"""

from __future__ import annotations

import math
import time
from typing import Any

from ..data.formats import encode_record, validate
from ..data.readers import Record
from ..registry import register_probe
from .base import Probe, ProbeResult
from .stats import check_options, probe_result

DEFAULTS: dict[str, Any] = {"max_length": None, "chat": None, "n_boot": 1000}


@register_probe("perplexity")
class PerplexityProbe(Probe):
    """Token-weighted mean NLL of the completion tokens (lower is better).

    Options:
        max_length: truncate each encoded record to this many tokens.
        chat: wrap string prompt/completion records in the chat template (``None``: when the
            tokenizer has one), as `tether.data.formats.encode_record` does.
        n_boot: bootstrap resamples for the CI.

    ``item_values`` are summed NLLs and ``item_weights`` token counts, so the score and its
    bootstrap are token-weighted; ``extra["perplexity"]`` is ``exp(loss)``.
    """

    metric = "loss"
    higher_is_better = False

    def __init__(self, name: str, items: list[dict], **kw: Any):
        super().__init__(name, items, **kw)
        self.opts = check_options(self, DEFAULTS)
        self._encoded: tuple[Any, list] | None = None  # (tokenizer, examples), reused across runs

    @staticmethod
    def validate_item(rec: Record) -> None:
        """Raise `DataError` naming file, line and field for a record this probe cannot score."""
        validate(rec)

    def _examples(self, tok) -> list:
        if self._encoded is None or self._encoded[0] is not tok:
            exs = [encode_record(Record(item, self.name, i + 1), tok, max_length=self.opts["max_length"],
                                 chat=self.opts["chat"]) for i, item in enumerate(self.items)]
            self._encoded = (tok, exs)
        return self._encoded[1]

    def run(self, scorer, *, reference=None) -> ProbeResult:
        t0 = time.perf_counter()
        exs = self._examples(scorer.tokenizer)
        scored = scorer.completion_nll([(e.input_ids, e.labels) for e in exs])
        values = [nll for nll, _ in scored]
        weights = [n for _, n in scored]
        result = probe_result(self, values, weights, n_boot=self.opts["n_boot"])
        result.extra = {"perplexity": _exp(result.score), "perplexity_ci_low": _exp(result.ci_low),
                        "perplexity_ci_high": _exp(result.ci_high), "tokens": float(sum(weights))}
        result.seconds = time.perf_counter() - t0
        return result


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else float("inf")
