"""Narrow tasks built offline from the Debian fortunes package: the demo task and a task sequence.

``fortune-topics`` routes a quote to one of 8 topics (the demo's narrow task: a one-word output
format is what makes a small instruct model forget); ``fortune-seq-a/b/c`` split other topics
into three disjoint 4-way tasks for `tether continual`.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

from ..io import tether_home, write_json, write_jsonl
from . import sources as S
from .pack import PACK_VERSION, _fresh, _rng, _sha256, _swap_into_place, normalise

TASKS = ("fortune-topics", "fortune-seq-a", "fortune-seq-b", "fortune-seq-c")
FORTUNE_TOPICS = ("art", "computers", "food", "law", "love", "politics", "science", "sports")
# a three-task sequence for `tether continual` benchmarks: disjoint 4-way label sets, so learning a
# later task pulls answers toward its labels and forgetting an earlier one shows
TASK_TOPICS = {
    "fortune-topics": FORTUNE_TOPICS,
    "fortune-seq-a": ("art", "computers", "food", "law"),
    "fortune-seq-b": ("love", "politics", "science", "sports"),
    "fortune-seq-c": ("literature", "people", "wisdom", "work"),
}
TASK_TRAIN_PER_CLASS, TASK_EVAL_PER_CLASS = 60, 25


def build_task(name: str = "fortune-topics", out_dir: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """Route a quote to one of its fortune topics (prompt/completion), train + eval.

    ``fortune-topics`` (8 topics) is the demo task; ``fortune-seq-a/b/c`` (4 topics each, disjoint)
    form a task sequence.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    topics = TASK_TOPICS[name]
    out = Path(out_dir) if out_dir else tether_home() / "data" / "tasks" / name
    instruction = f"Classify the topic of this quote. Answer with one word from: {', '.join(topics)}."
    quotes = {t: [re.sub(r"\s+", " ", q) for q in S.fortune_quotes(t)] for t in topics}
    count = defaultdict(set)
    for t, qs in quotes.items():
        for q in qs:
            count[normalise(q)].add(t)
    train, evals = [], []
    need = TASK_TRAIN_PER_CLASS + TASK_EVAL_PER_CLASS
    for t in topics:
        seen, pool = set(), []
        for i, q in enumerate(quotes[t]):
            k = normalise(q)
            if 20 <= len(q) <= 300 and len(count[k]) == 1 and k not in seen:  # one topic, no repeats
                seen.add(k)
                pool.append({"id": f"{t}/{i}", "source": "fortunes", "label": t, "completion": t,
                             "prompt": f"{instruction}\n\nQuote: {q}"})
        if len(pool) < need:
            raise S.SourceMissing(f"fortune topic {t!r} has {len(pool)} usable quotes, need {need}")
        picked = _rng(seed, f"task/{t}").sample(pool, need)
        train += picked[:TASK_TRAIN_PER_CLASS]
        evals += picked[TASK_TRAIN_PER_CLASS:]
    _rng(seed, "task/train").shuffle(train)
    _rng(seed, "task/eval").shuffle(evals)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        files = {}
        for split, rows in (("train", train), ("eval", evals)):
            p = write_jsonl(tmp / f"{split}.jsonl", rows)
            files[p.name] = {"items": len(rows), "sha256": _sha256(p)}
        write_json(tmp / "manifest.json", {
            "name": name, "builder_version": PACK_VERSION, "seed": seed, "labels": list(topics),
            "files": files, "sources": {"fortunes": dict(S.SOURCES["fortunes"])}})
        _swap_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def ensure_task(name: str = "fortune-topics") -> Path:
    path = tether_home() / "data" / "tasks" / name
    return path if _fresh(path) else build_task(name, path)
