"""Narrow tasks built offline from packaged data: the demo task and a task sequence.

``fortune-topics`` routes a quote to one of 8 topics (the demo's narrow task: a one-word output
format is what makes a small instruct model forget). Two sequences for `tether continual`:
``fortune-seq-a/b/c`` (three disjoint 4-way quote-routing tasks, one format) and the benchmark's
``fortune-seq-b`` -> ``foldoc-domain`` -> ``stdlib-module``: three input domains (quotes, a
computing dictionary, Python source) and three answer formats (a word, a letter, an import line),
so a model trained on a later task answers an earlier one in the wrong format when it forgets.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...io import tether_home, write_json, write_jsonl
from . import sources as S
from .pack import PACK_VERSION, _rng, _sha256, _swap_into_place, build_once, normalise

FORTUNE_TOPICS = ("art", "computers", "food", "law", "love", "politics", "science", "sports")
# disjoint 4-way label sets, so learning a later task pulls answers toward its labels
TASK_TOPICS = {
    "fortune-topics": FORTUNE_TOPICS,
    "fortune-seq-a": ("art", "computers", "food", "law"),
    "fortune-seq-b": ("love", "politics", "science", "sports"),
    "fortune-seq-c": ("literature", "people", "wisdom", "work"),
}
# FOLDOC's first-sense domain tag -> the option shown (answer: its letter)
FOLDOC_DOMAINS = {"language": "programming languages", "networking": "networking", "hardware": "hardware",
                  "operating system": "operating systems"}
STDLIB_PACKAGES = ("asyncio", "email", "logging", "tkinter")
TASK_TRAIN_PER_CLASS, TASK_EVAL_PER_CLASS = 60, 25


def _fortune_pools(name: str) -> tuple[dict[str, list[dict]], list[str]]:
    topics = TASK_TOPICS[name]
    instruction = f"Classify the topic of this quote. Answer with one word from: {', '.join(topics)}."
    quotes = {t: [re.sub(r"\s+", " ", q) for q in S.fortune_quotes(t)] for t in topics}
    kept = _single_label(quotes, normalise, lambda q: 20 <= len(q) <= 300)
    pools = {t: [{"id": f"{t}/{i}", "source": "fortunes", "label": t, "completion": t,
                  "prompt": f"{instruction}\n\nQuote: {q}"} for i, q in rows] for t, rows in kept.items()}
    return pools, ["fortunes"]


def _single_label(items: dict[str, list], key: Callable, keep: Callable) -> dict[str, list[tuple[int, Any]]]:
    """Per label, ``(index, item)`` of the items ``keep`` accepts whose ``key`` occurs under this label
    only (an input filed under two labels has no single answer), each key once."""
    labels = defaultdict(set)
    for label, rows in items.items():
        for x in rows:
            labels[key(x)].add(label)
    out = {}
    for label, rows in items.items():
        seen, out[label] = set(), []
        for i, x in enumerate(rows):
            k = key(x)
            if keep(x) and len(labels[k]) == 1 and k not in seen:
                seen.add(k)
                out[label].append((i, x))
    return out


def _clip(text: str, limit: int = 300) -> str:
    """The first sentences of ``text`` that fit in ``limit`` characters (at least the first one, cut)."""
    out = ""
    for sent in re.split(r"(?<=[.!?])\s+", text):
        if out and len(out) + 1 + len(sent) > limit:
            break
        out = f"{out} {sent}".strip()
    return out[:limit]


def _foldoc_pools(name: str) -> tuple[dict[str, list[dict]], list[str]]:
    letters = "ABCD"
    options = "\n".join(f"{letters[i]}) {v}" for i, v in enumerate(FOLDOC_DOMAINS.values()))
    instruction = f"Which area of computing is this dictionary entry about?\n{options}\nAnswer with the letter."
    pools: dict[str, list[dict]] = {d: [] for d in FOLDOC_DOMAINS}
    seen = set()
    for i, e in enumerate(S.foldoc_entries()):
        domains = [t for t in e["tags"] if t in FOLDOC_DOMAINS]
        text = _clip(e["text"])
        if len(set(domains)) != 1 or len(text) < 40 or normalise(text) in seen:
            continue  # exactly one of the four domains, some prose, no duplicate definitions
        seen.add(normalise(text))
        d = domains[0]
        letter = letters[list(FOLDOC_DOMAINS).index(d)]
        pools[d].append({"id": f"foldoc/{i}", "source": "foldoc", "label": d, "completion": letter,
                         "prompt": f"{instruction}\n\nTerm: {e['term']}\nDefinition: {text}"})
    return pools, ["foldoc"]


def _stdlib_pools(name: str) -> tuple[dict[str, list[dict]], list[str]]:
    instruction = ("Which Python standard-library package defines this function? "
                   "Answer with the import statement.")
    kept = _single_label(S.stdlib_functions(STDLIB_PACKAGES), lambda f: (f["name"], normalise(f["doc"])),
                         lambda f: 30 <= len(f["doc"]) <= 300)
    pools = {pkg: [{"id": f"{pkg}/{i}", "source": "python-stdlib", "label": pkg, "completion": f"import {pkg}",
                    "prompt": f'{instruction}\n\n{f["signature"]}\n    """{f["doc"]}"""'} for i, f in rows]
             for pkg, rows in kept.items()}
    return pools, ["python-stdlib"]


BUILDERS: dict[str, Callable[[str], tuple[dict[str, list[dict]], list[str]]]] = {
    **{n: _fortune_pools for n in TASK_TOPICS},
    "foldoc-domain": _foldoc_pools,
    "stdlib-module": _stdlib_pools,
}
TASKS = tuple(BUILDERS)


def build_task(name: str = "fortune-topics", out_dir: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """A balanced train + eval split (prompt/completion) of one named task, written atomically.

    Every class contributes the same number of examples, drawn with a seeded RNG from its pool;
    train and eval never share an input.
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    pools, sources = BUILDERS[name](name)
    out = Path(out_dir) if out_dir else tether_home() / "data" / "tasks" / name
    train, evals = [], []
    need = TASK_TRAIN_PER_CLASS + TASK_EVAL_PER_CLASS
    for label, pool in pools.items():
        if len(pool) < need:
            raise S.SourceMissing(f"task {name!r}: class {label!r} has {len(pool)} usable examples, need {need}")
        picked = _rng(seed, f"task/{label}").sample(pool, need)
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
            "name": name, "builder_version": PACK_VERSION, "seed": seed, "labels": list(pools),
            "files": files, "sources": {s: {**S.SOURCES[s], **S.READ.get(s, {})} for s in sources}})
        _swap_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def ensure_task(name: str = "fortune-topics") -> Path:
    return build_once(tether_home() / "data" / "tasks" / name, lambda path: build_task(name, path))

