"""Multiple-choice accuracy by comparing continuation log-likelihoods, as lm-evaluation-harness does.

Each item ``{"query", "choices", "gold"}`` becomes one log-likelihood request per choice, with
context ``query`` and continuation ``target_delimiter + choice``. Token ids are built the harness
way (``_encode_pair``: trailing whitespace of the context moves to the continuation, the pair is
tokenised jointly and split at the context's length), so tether's numbers match lm-eval's item by
item on the same model. ``acc`` is the argmax of summed log-probs; ``acc_norm`` divides each by the
choice's length in characters (without the delimiter), lm-eval's ``MultipleChoiceTask`` convention.

``prob`` is the probability the model puts on the gold choice among the choices (softmax of the
summed log-probs, the distribution lm-eval's ``brier_score`` uses). Accuracy moves in whole items —
on a model near chance, fine-tuning flips a few borderline items either way — while ``prob`` moves
with every item, so a 1% change in what the model knows is resolvable on a few hundred items.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..data.readers import DataError, Record
from ..registry import register_probe
from .base import Probe, ProbeResult
from .stats import check_options, probe_result

DEFAULTS: dict[str, Any] = {"target_delimiter": " ", "primary": "acc_norm", "n_boot": 1000}
METRICS = ("acc", "acc_norm", "prob")


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids exactly as lm-eval's ``HFLM`` builds them for a causal LM."""
    if not context:  # lm-eval conditions an empty context on the BOS (else EOS) token
        prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        cont = tok(continuation, add_special_tokens=False)["input_ids"]
        return ([prefix], cont) if cont[0] != prefix else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tok(context + continuation)["input_ids"]
    ctx = tok(context)["input_ids"]
    return ctx, whole[len(ctx):]


def decisions(lls: list[float], choices: list[str]) -> tuple[int, int]:
    """``(pred, pred_norm)``: argmax of log-likelihoods, raw and per character of the choice."""
    ll = np.asarray(lls, dtype=np.float64)
    return int(np.argmax(ll)), int(np.argmax(ll / np.array([float(len(c)) for c in choices])))


def gold_probability(lls: list[float], gold: int) -> float:
    """Probability of the gold choice under the softmax of the choices' summed log-likelihoods."""
    ll = np.asarray(lls, dtype=np.float64)
    ll = ll - ll.max()
    p = np.exp(ll)
    return float(p[gold] / p.sum())


@register_probe("multiple_choice")
class MultipleChoiceProbe(Probe):
    """Accuracy on ``{"query": str, "choices": [str], "gold": int}`` items (higher is better).

    Options:
        target_delimiter: put between query and choice (lm-eval's default ``" "``).
        primary: ``"acc_norm"`` (default), ``"acc"`` or ``"prob"``; the others go to ``extra`` (means)
            and ``item_extra`` (per item, so reports compare them with a paired CI too).
        n_boot: bootstrap resamples for the CI.
    """

    metric = "acc_norm"
    higher_is_better = True

    def __init__(self, name: str, items: list[dict], **kw: Any):
        super().__init__(name, items, **kw)
        self.opts = check_options(self, DEFAULTS)
        if self.opts["primary"] not in METRICS:
            raise ValueError(f"probe {name!r}: option 'primary' must be one of {', '.join(METRICS)}, "
                             f"got {self.opts['primary']!r}")
        self.metric = self.opts["primary"]
        self._requests: tuple[Any, list] | None = None  # (tokenizer, requests), reused across runs

    @staticmethod
    def validate_item(rec: Record) -> None:
        """Raise `DataError` naming file, line and field for a malformed item."""
        d = rec.data
        if not isinstance(d.get("query"), str):
            raise DataError(rec.source, rec.line, "query", "expected a string")
        choices = d.get("choices")
        if not isinstance(choices, list) or len(choices) < 2:
            raise DataError(rec.source, rec.line, "choices", "expected a list of at least 2 strings")
        for i, c in enumerate(choices):
            if not isinstance(c, str) or not c:
                raise DataError(rec.source, rec.line, f"choices[{i}]", "expected a non-empty string")
        gold = d.get("gold")
        if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
            raise DataError(rec.source, rec.line, "gold",
                            f"expected an index in [0, {len(choices)}), got {gold!r}")

    def _build(self, tok) -> list[tuple[list[int], list[int]]]:
        if self._requests is None or self._requests[0] is not tok:
            delim = self.opts["target_delimiter"]
            reqs = [encode_pair(tok, it["query"], delim + c) for it in self.items for c in it["choices"]]
            self._requests = (tok, reqs)
        return self._requests[1]

    def item_loglikelihoods(self, scorer) -> list[list[float]]:
        """Per item, the summed log-likelihood of each choice."""
        flat = scorer.loglikelihood(self._build(scorer.tokenizer))
        out, k = [], 0
        for it in self.items:
            out.append([ll for ll, _ in flat[k: k + len(it["choices"])]])
            k += len(it["choices"])
        return out

    def run(self, scorer, *, reference=None) -> ProbeResult:
        t0 = time.perf_counter()
        per: dict[str, list[float]] = {m: [] for m in METRICS}
        for it, lls in zip(self.items, self.item_loglikelihoods(scorer)):
            pred, pred_norm = decisions(lls, it["choices"])
            per["acc"].append(float(pred == it["gold"]))
            per["acc_norm"].append(float(pred_norm == it["gold"]))
            per["prob"].append(gold_probability(lls, it["gold"]))
        result = probe_result(self, per.pop(self.metric), n_boot=self.opts["n_boot"], item_extra=per)
        result.seconds = time.perf_counter() - t0
        return result
