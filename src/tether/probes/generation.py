"""Greedy generation scored against reference answers: catches a model that still ranks answers well
but no longer *says* them (format drift, chat-template breakage), which log-likelihood probes miss.
"""

from __future__ import annotations

import re
import string
import time
from typing import Any

from ..data.formats import ROLES
from ..data.readers import DataError, Record
from ..registry import register_probe
from .base import Probe, ProbeResult
from .stats import check_options, probe_result

DEFAULTS: dict[str, Any] = {"chat": None, "max_new_tokens": 32, "stop": None, "metric": "exact_match",
                            "n_boot": 1000, "n_samples": 20}
METRICS = ("exact_match", "contains")
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def check_prompt(rec: Record, key: str = "prompt") -> None:
    """A prompt is a non-empty string or a non-empty list of ``{"role", "content"}`` messages."""
    p = rec.data.get(key)
    if isinstance(p, str):
        if not p.strip():
            raise DataError(rec.source, rec.line, key, "empty")
        return
    if not isinstance(p, list) or not p:
        raise DataError(rec.source, rec.line, key, "expected a string or a non-empty list of messages")
    for i, m in enumerate(p):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(rec.source, rec.line, f"{key}[{i}]",
                            f"expected {{'role': one of {', '.join(ROLES)}, 'content': str}}")


def encode_prompt(tok, prompt: str | list[dict], chat: bool | None) -> list[int]:
    """Prompt ids: messages (or a string with ``chat=True``) through the chat template with the
    generation prompt appended; a plain string tokenised as is (with the tokenizer's specials)."""
    if isinstance(prompt, list) or chat:
        msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if not getattr(tok, "chat_template", None):
            raise ValueError("chat prompts need a tokenizer with a chat template")
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]
    return tok(prompt)["input_ids"]


def prompt_ids(probe, tok) -> list[list[int]]:
    """Token ids of a prompt probe's items, encoded once per tokenizer and cached on the probe."""
    if probe._prompts is None or probe._prompts[0] is not tok:
        probe._prompts = (tok, [encode_prompt(tok, it["prompt"], probe.opts["chat"]) for it in probe.items])
    return probe._prompts[1]


def normalise(text: str) -> str:
    """Lowercase, punctuation removed, whitespace collapsed: answers compare by content, not form."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def is_correct(prediction: str, answers: list[str], metric: str) -> bool:
    pred = normalise(prediction)
    golds = [normalise(a) for a in answers]
    if metric == "exact_match":
        return pred in golds
    return any(g and f" {g} " in f" {pred} " for g in golds)  # whole words: "4" is not in "42"


@register_probe("generation")
class GenerationProbe(Probe):
    """Exact-match or contains accuracy of greedy answers to ``{"prompt", "answers": [str]}`` items.

    Options:
        chat: use the chat template for string prompts (message-list prompts always use it).
        max_new_tokens: generation budget per item.
        stop: strings that end an answer (cut before them).
        metric: ``"exact_match"`` (normalised answer equals one reference) or ``"contains"``
            (a normalised reference appears as whole words in the answer).
        n_boot: bootstrap resamples; n_samples: predictions kept in ``result.samples``.
    """

    metric = "exact_match"
    higher_is_better = True

    def __init__(self, name: str, items: list[dict], **kw: Any):
        super().__init__(name, items, **kw)
        self.opts = check_options(self, DEFAULTS)
        if self.opts["metric"] not in METRICS:
            raise ValueError(f"probe {name!r}: option 'metric' must be one of {', '.join(METRICS)}, "
                             f"got {self.opts['metric']!r}")
        if isinstance(self.opts["stop"], str):
            self.opts["stop"] = [self.opts["stop"]]
        self._prompts: tuple[Any, list] | None = None

    @staticmethod
    def validate_item(rec: Record) -> None:
        """Raise `DataError` naming file, line and field for a malformed item."""
        check_prompt(rec)
        answers = rec.data.get("answers")
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise DataError(rec.source, rec.line, "answers", "expected a non-empty list of strings")

    def _ids(self, tok) -> list[list[int]]:
        return prompt_ids(self, tok)

    def run(self, scorer, *, reference=None) -> ProbeResult:
        t0 = time.perf_counter()
        preds = scorer.generate(self._ids(scorer.tokenizer), max_new_tokens=self.opts["max_new_tokens"],
                                stop=self.opts["stop"])
        metric = self.opts["metric"]
        values = [float(is_correct(p, it["answers"], metric)) for p, it in zip(preds, self.items)]
        samples = [{"prompt": it["prompt"], "prediction": p, "answers": it["answers"], "correct": bool(v)}
                   for it, p, v in list(zip(self.items, preds, values))[: self.opts["n_samples"]]]
        result = probe_result(self, values, metric=metric, samples=samples, n_boot=self.opts["n_boot"],
                              item_outputs=preds)
        result.seconds = time.perf_counter() - t0
        return result
