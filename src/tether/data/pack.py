"""The general probe pack (``general-v1``), built offline from packages (tasks: ``tasks.py``).

``ensure_pack()`` returns ``tether_home()/data/general-v1``, building it on first use: one JSONL
file per probe plus ``replay.jsonl`` and a ``manifest.json`` (items, sources, licenses, seed and
sha256 per file). The same seed gives byte-identical files.

Probe files (item schemas as the probes read them; every item also has ``id`` and ``source``):

============== =============== ============ =========================================================
file           kind            sources      what it measures
============== =============== ============ =========================================================
knowledge_mc   multiple_choice bigbench     commonsense / world knowledge (12 BIG-bench tasks)
mmlu_mc        multiple_choice mmlu         academic knowledge, cloze-style over the option texts
trivia_gen     generation      bigbench     short factual answers; collapse to task labels shows here
chat_loss      perplexity      chatterbot   loss on held-out assistant turns (shares replay's source)
code_loss      perplexity      humaneval    loss on canonical Python solutions
drift_prompts  drift           bigbench     next-token drift on general chat prompts
============== =============== ============ =========================================================

``replay.jsonl`` mixes chatterbot conversations (split from ``chat_loss`` by conversation, near
duplicates clustered to one side) with Python documentation prose. BIG-bench items carry a canary
and are never replayed; every replay record that overlaps any probe item is dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..io import file_lock, tether_home, write_json, write_jsonl
from ..progress import status
from . import sources as S

PACK_VERSION = 2  # bump when the builder's output changes: ensure_pack rebuilds older packs
PACKS = ("general-v1",)

# (file stem, kind, ability, sources, description)
PROBE_FILES = (
    ("knowledge_mc", "multiple_choice", "knowledge", ["bigbench"],
     "BIG-bench commonsense and world-knowledge multiple choice"),
    ("mmlu_mc", "multiple_choice", "knowledge", ["mmlu"],
     "MMLU questions (lm-eval flan CoT prompts), choices scored as continuations"),
    ("trivia_gen", "generation", "factual_recall", ["bigbench"],
     "short factual questions answered freely; scored by 'contains'"),
    ("chat_loss", "perplexity", "chat", ["chatterbot"], "loss on held-out chatterbot assistant turns"),
    ("code_loss", "perplexity", "code", ["humaneval"],
     "loss on HumanEval canonical solutions given the prompt"),
    ("drift_prompts", "drift", "general", ["bigbench"], "general chat prompts for next-token drift"),
)
REPLAY_SOURCES = ["chatterbot", "python-docs"]

# BIG-bench multiple-choice tasks: items drawn, query template (the probe appends " " + choice)
_Q = "Question: {x}\nAnswer:"
MC_TASKS: dict[str, tuple[int, str]] = {  # sizes favour tasks where SmolLM2-135M is above chance
    "physical_intuition": (70, _Q), "human_organs_senses": (40, _Q), "known_unknowns": (40, _Q),
    "misconceptions": (60, "Is the following statement true or false?\nStatement: {x}\nAnswer:"),
    "anachronisms": (40, "Sentence: {x}\nQuestion: Does this sentence contain an anachronism?\nAnswer:"),
    "date_understanding": (40, _Q), "odd_one_out": (40, _Q), "riddle_sense": (40, "Riddle: {x}\nAnswer:"),
    "strategyqa": (30, _Q), "social_iqa": (30, _Q), "crass_ai": (20, _Q),
}
_MC_CHOICE_MAP = {"misconceptions": {"T": "True", "F": "False"}}
# qa_wikidata relations asked as questions in trivia_gen: prefix, question template, items
WIKIDATA = (("The measured physical quantity of ", 'What physical quantity does the unit "{x}" measure?', 25),
            ("The developer of ", "Which company developed {x}?", 20),
            ("The capital of ", "What is the capital of {x}?", 25))
_NOT_A_COUNTRY = re.compile(r"Empire|Kingdom|dynasty|Republic|Region|Oblast|Province|Caliphate|Sultanate|"
                            r"Union|Soviet|Federal|Old |Confederation|Governorate|County|Duchy|State|Okrug|"
                            r"Krai|Principality|Emirate|Khanate")
DRIFT = {"topical_chat": 40, "tense": 15, "rephrase": 15, "scientific_press_release": 10,
         "natural_instructions/subtask045_miscellaneous_sentence_paraphrasing": 10, "auto_debugging": 10}
CHAT_LOSS_ITEMS = 150
DOCS_REPLAY = 1000


# ----------------------------------------------------------------------------------- text helpers
def normalise(text: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed: the form overlap checks compare."""
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", text.lower())).strip()


def ngrams(text: str, n: int = 3) -> frozenset[str]:
    words = normalise(text).split()
    return frozenset(" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1)))


def jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a and b else 0.0


def item_texts(item: dict) -> list[str]:
    """The texts of an item that must not be seen in training (prompts, turns, targets)."""
    out = []
    for key in ("query", "prompt", "completion", "text", "messages"):
        v = item.get(key)
        if isinstance(v, str):
            out.append(v)
        elif isinstance(v, list):
            out += [m["content"] for m in v if isinstance(m, dict)]
    return out


def _rng(seed: int, tag: str) -> random.Random:
    return random.Random(f"tether/{seed}/{tag}")  # str seeds hash with sha512: stable across runs


def _sample(rng: random.Random, items: list, k: int) -> list:
    return rng.sample(items, k) if len(items) > k else list(items)


def _dedupe(items: list[dict], text: str) -> list[dict]:
    """Drop later items asking the same question (normalised ``text`` field); sources repeat some.

    A repeat would count its question twice. Generation items pool their accepted answers into the
    kept item. Runs after the shuffle, so the kept items keep their order.
    """
    out: dict[str, dict] = {}
    for it in items:
        q = it[text]
        key = normalise(q if isinstance(q, str) else " ".join(m["content"] for m in q))
        if key not in out:
            out[key] = it
        elif "answers" in it:
            out[key]["answers"] = list(dict.fromkeys(out[key]["answers"] + it["answers"]))
    return list(out.values())


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ----------------------------------------------------------------------------------- probe items
def _knowledge_mc(bb: dict, seed: int) -> list[dict]:
    out, seen = [], set()
    for task, (k, template) in MC_TASKS.items():
        rng = _rng(seed, f"mc/{task}")
        cmap = _MC_CHOICE_MAP.get(task, {})
        pool = [it for it in S.bigbench_mc_items(bb[task]) if len(it[1]) <= 600]
        for idx, x, choices, gold in _sample(rng, pool, k):
            query = template.format(x=x)
            if normalise(query) in seen:
                continue
            seen.add(normalise(query))
            answer = choices[gold]
            others = [c for c in choices if c != answer]
            choices = [answer] + (rng.sample(others, 4) if len(others) > 4 else others)  # at most 5 choices
            rng.shuffle(choices)
            out.append({"id": f"{task}/{idx}", "source": "bigbench", "subset": task, "query": query,
                        "choices": [cmap.get(c, c) for c in choices], "gold": choices.index(answer)})
    _rng(seed, "mc").shuffle(out)  # so that a suite's `limit` takes a mix of tasks
    return out


def _mmlu_mc(seed: int) -> list[dict]:
    out = []
    for i, q in enumerate(S.mmlu_questions()):
        if len(q["question"]) > 800:  # long reading passages: slow to score, few of them
            continue
        subject = q["subject"].replace("_", " ")
        out.append({"id": f"{q['subject']}/{i}", "source": "mmlu", "subset": q["subject"],
                    "query": f"The following are questions (with answers) about {subject}.\n\n"
                             f"Question: {q['question']}\nAnswer:",
                    "choices": q["choices"], "gold": q["gold"]})
    _rng(seed, "mmlu").shuffle(out)
    return _dedupe(out, "query")


_NUMBERS = "zero one two three four five six seven eight nine ten eleven twelve".split()
_ALIASES = {"none": ["zero"], "Sol": ["Sun", "sun"], "foot": ["feet"], "Washington, D.C.": ["Washington"],
            "−273.15": ["-273.15", "273.15"], "meow": ["miaow", "purr"]}


def _answers(golds: list[str]) -> list[str]:
    out: list[str] = []
    for g in golds:
        out.append(g)
        out += _ALIASES.get(g, [])
        if g.lower() in _NUMBERS:
            out.append(str(_NUMBERS.index(g.lower())))
        if re.fullmatch(r"\d{1,3}(,\d{3})+", g):
            out.append(g.replace(",", ""))
        if g.isdigit() and int(g) < len(_NUMBERS):
            out.append(_NUMBERS[int(g)])
        if len(g) > 3 and g.endswith("s") and not g.endswith("ss"):
            out.append(g[:-1])  # "ears" -> "ear": 'contains' scoring then accepts either
    return list(dict.fromkeys(out))


def _trivia_gen(bb: dict, seed: int) -> list[dict]:
    out = []
    for i, e in enumerate(bb["general_knowledge"]["examples"]):
        golds = [c for c, v in e["target_scores"].items() if v == 1]
        if golds and all(len(g.split()) <= 3 for g in golds):
            out.append({"id": f"general_knowledge/{i}", "source": "bigbench", "subset": "general_knowledge",
                        "prompt": _user(e["input"].strip()), "answers": _answers(golds)})
    wiki = bb["qa_wikidata"]["examples"]
    for prefix, template, k in WIKIDATA:
        pool = []
        for i, e in enumerate(wiki):
            x, t = e["input"], e["target"]
            if not (x.startswith(prefix) and x.endswith(" is") and isinstance(t, str)) or len(t.split()) > 2:
                continue
            x = x[len(prefix):-3].strip()
            if len(x.split()) > 4 or not x.isascii():
                continue
            if prefix == "The capital of " and _NOT_A_COUNTRY.search(x):
                continue  # historical states and sub-regions: noisy gold answers
            pool.append({"id": f"qa_wikidata/{i}", "source": "bigbench", "subset": "qa_wikidata",
                         "prompt": _user(template.format(x=x)), "answers": [t]})
        out += _sample(_rng(seed, f"trivia/{prefix}"), pool, k)
    _rng(seed, "trivia").shuffle(out)
    return _dedupe(out, "prompt")


def _drift_prompts(bb: dict, seed: int) -> list[dict]:
    def topical(x):
        return x.split(":", 1)[1].strip().strip('"').strip()

    def tense(x):
        m = re.fullmatch(r"(.+?)\s*Change tense to ([A-Z ]+):\s*", x, re.S)
        return f"Change the tense of this sentence to {m.group(2).lower()}: {m.group(1)}" if m else None

    def rephrase(x):
        m = re.fullmatch(r"(.+?)\s*\nKeyword: (.+)", x.strip(), re.S)
        return f'Rephrase this sentence so that it uses the word "{m.group(2)}": {m.group(1)}' if m else None

    def paraphrase(x):
        m = re.search(r"\nSentence: (.+)$", x.strip())
        return f"Paraphrase this sentence: {m.group(1).strip()}" if m else None

    makers: dict[str, Callable[[str], str | None]] = {
        "topical_chat": topical, "tense": tense, "rephrase": rephrase,
        "scientific_press_release": lambda x: f"Write a press release title for this paper: {x.strip()}",
        "natural_instructions/subtask045_miscellaneous_sentence_paraphrasing": paraphrase,
        "auto_debugging": lambda x: x.strip(),
    }
    out, seen = [], set()
    for task, k in DRIFT.items():
        pool = []
        for i, e in enumerate(bb[task]["examples"]):
            p = makers[task](e["input"])
            if p and len(p) >= 15 and normalise(p) not in seen:
                seen.add(normalise(p))
                subset = task.split("/")[-1]
                pool.append({"id": f"{subset}/{i}", "source": "bigbench", "subset": subset,
                             "prompt": _user(p)})
        out += _sample(_rng(seed, f"drift/{task}"), pool, k)
    _rng(seed, "drift").shuffle(out)
    return out


def _code_loss(seed: int) -> list[dict]:
    out = [{"id": p["task_id"], "source": "humaneval", "prompt": p["prompt"],
            "completion": p["canonical_solution"]} for p in S.humaneval_problems()]
    _rng(seed, "code").shuffle(out)
    return out


# --------------------------------------------------------------------------------- chat split
def _chat_units() -> tuple[list[dict], list[int]]:
    """Chatterbot conversations as deduplicated chat records of at most three exchanges, and for
    each the cluster it belongs to (same conversation, a shared turn, or near-identical text)."""
    units, conv_of, seen = [], [], set()
    for c, (cat, turns) in enumerate(S.chatterbot_conversations()):
        turns = [t.strip() for t in turns if t.strip()]
        for start in range(0, len(turns) - 1, 6):
            window = turns[start:start + 6]
            window = window[: len(window) // 2 * 2]  # end on an assistant turn
            key = normalise(" | ".join(window))
            if len(window) < 2 or key in seen:
                continue
            seen.add(key)
            msgs = [{"role": ("user", "assistant")[j % 2], "content": t} for j, t in enumerate(window)]
            units.append({"id": f"{cat}/{c}/{start // 6}", "source": "chatterbot", "subset": cat,
                          "messages": msgs})
            conv_of.append(c)
    parent = list(range(len(units)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i, j):
        parent[find(i)] = find(j)

    first_with: dict[Any, int] = {}
    grams = [ngrams(" ".join(item_texts(u))) for u in units]
    by_gram: dict[str, list[int]] = defaultdict(list)
    for i, u in enumerate(units):
        keys = [("conv", conv_of[i])] + [("turn", normalise(m["content"])) for m in u["messages"]
                                         if len(normalise(m["content"]).split()) >= 3]
        for key in keys:
            union(i, first_with.setdefault(key, i))
        for j in sorted({j for g in grams[i] for j in by_gram[g]}):
            if find(i) != find(j) and jaccard(grams[i], grams[j]) >= 0.5:
                union(i, j)
        for g in grams[i]:
            by_gram[g].append(i)
    return units, [find(i) for i in range(len(units))]


def _chat_split(seed: int) -> tuple[list[dict], list[dict]]:
    units, cluster = _chat_units()
    members: dict[int, list[int]] = defaultdict(list)
    for i, c in enumerate(cluster):
        members[c].append(i)
    order = sorted(members)  # by representative index: deterministic before the shuffle
    _rng(seed, "chat-split").shuffle(order)
    held = []
    for c in order:
        if len(held) >= CHAT_LOSS_ITEMS:
            break
        if len(members[c]) <= 4:  # big clusters (greetings, tech support variants) stay in replay
            held += members[c]
    held_set = set(held)
    chat_loss = [units[i] for i in sorted(held)]
    _rng(seed, "chat-loss").shuffle(chat_loss)
    return chat_loss, [u for i, u in enumerate(units) if i not in held_set]


def _docs_replay(seed: int) -> tuple[list[dict], str]:
    paras, origin = S.python_docs_paragraphs()
    seen, pool = set(), []
    for i, (f, p) in enumerate(paras):
        if normalise(p) not in seen:
            seen.add(normalise(p))
            pool.append({"id": f"{f}#{i}", "source": "python-docs", "text": p})
    return _sample(_rng(seed, "docs"), pool, DOCS_REPLAY), origin


def decontaminate(candidates: list[dict], probe_items: list[dict],
                  threshold: float = 0.5) -> tuple[list[dict], int]:
    """Drop training records that contain a probe text (>= 3 words) or whose word-3-gram Jaccard
    with any probe item reaches ``threshold``."""
    keys: dict[str, set[str]] = defaultdict(set)  # probe texts of 3+ words, by their first 3 words
    for it in probe_items:
        for t in item_texts(it):
            words = normalise(t).split()
            if len(words) >= 3:
                keys[" ".join(words[:3])].add(" ".join(words))
    probe_grams = [ngrams(" ".join(item_texts(it))) for it in probe_items]
    index: dict[str, list[int]] = defaultdict(list)
    for j, g in enumerate(probe_grams):
        for gram in g:
            index[gram].append(j)
    kept = []
    for rec in candidates:
        text = " " + normalise(" ".join(item_texts(rec))) + " "
        g = ngrams(text)
        near = {j for gram in g for j in index.get(gram, ())}
        contains = any(f" {k} " in text for first in g if first in keys for k in keys[first])
        if contains or any(jaccard(g, probe_grams[j]) >= threshold for j in near):
            continue
        kept.append(rec)
    return kept, len(candidates) - len(kept)


# --------------------------------------------------------------------------------------- build
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_pack(name: str = "general-v1", out_dir: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """Build the probe pack ``name`` into ``out_dir`` (default ``tether_home()/data/name``), atomically."""
    if name not in PACKS:
        raise ValueError(f"unknown pack {name!r}; known: {', '.join(PACKS)}")
    out = Path(out_dir) if out_dir else tether_home() / "data" / name
    with status(f"building probe pack {name} (seed {seed})"):
        bb = S.bigbench_tasks(sorted({*MC_TASKS, "general_knowledge", "qa_wikidata", *DRIFT}))
        probes = {"knowledge_mc": _knowledge_mc(bb, seed), "mmlu_mc": _mmlu_mc(seed),
                  "trivia_gen": _trivia_gen(bb, seed), "code_loss": _code_loss(seed),
                  "drift_prompts": _drift_prompts(bb, seed)}
        probes["chat_loss"], chat_replay = _chat_split(seed)
        docs, docs_origin = _docs_replay(seed)
        all_probe_items = [it for items in probes.values() for it in items]
        replay, dropped = decontaminate(chat_replay + docs, all_probe_items)
        _rng(seed, "replay").shuffle(replay)
        files = {stem: probes[stem] for stem, *_ in PROBE_FILES} | {"replay": replay}
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            meta = {stem: (kind, ability, srcs, desc) for stem, kind, ability, srcs, desc in PROBE_FILES}
            meta["replay"] = ("replay", "replay", REPLAY_SOURCES, "records replayed during fine-tuning")
            manifest_files = {}
            for stem, items in files.items():
                kind, ability, srcs, desc = meta[stem]
                path = write_jsonl(tmp / f"{stem}.jsonl", items)
                manifest_files[path.name] = {
                    "kind": kind, "ability": ability, "role": "replay" if stem == "replay" else "probe",
                    "items": len(items), "sources": srcs,
                    "licenses": {s: S.SOURCES[s]["license"] for s in srcs},
                    "sha256": _sha256(path), "bytes": path.stat().st_size, "description": desc}
            manifest = {
                "name": name, "builder_version": PACK_VERSION, "seed": seed, "files": manifest_files,
                "probe_items": sum(len(v) for v in probes.values()), "replay_records": len(replay),
                "sources": {s: dict(S.SOURCES[s]) for s in sorted({s for f in manifest_files.values()
                                                                     for s in f["sources"]})},
                "decontamination": {
                    "replay_records_dropped": dropped,
                    "rule": "no probe text (>= 3 words) inside a replay record; word 3-gram Jaccard < 0.5"},
            }
            manifest["sources"]["python-docs"]["origin"] = docs_origin
            write_json(tmp / "manifest.json", manifest)
            _swap_into_place(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    return out


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Replace ``out`` by the finished build ``tmp``; one swap at a time per ``out``.

    Two processes may build the same directory at once (two benchmark runs started together,
    torchrun ranks): without the lock, the second one's rename of ``out`` finds it already moved.
    """
    with file_lock(out.parent / f".{out.name}.lock"):
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fresh(path: Path) -> bool:
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        return manifest.get("builder_version") == PACK_VERSION
    except (OSError, ValueError):
        return False


def ensure_pack(name: str = "general-v1") -> Path:
    """``tether_home()/data/name``, built on first use (and rebuilt when the builder changed)."""
    return build_once(tether_home() / "data" / name, lambda path: build_pack(name, path))


def build_once(path: Path, build: Callable[[Path], Path]) -> Path:
    """``path`` if its build is current, else ``build(path)``, one builder at a time: two runs started
    together on a fresh machine wait for one build instead of both reading (and one deleting) the
    BIG-bench archive."""
    if _fresh(path):
        return path
    with file_lock(path.parent / f".{path.name}.build.lock"):
        return path if _fresh(path) else build(path)


def resolve_pack_uri(uri: str) -> Path:
    """``pack://general-v1/knowledge_mc.jsonl`` -> the file's path, building the pack if needed."""
    m = re.fullmatch(r"pack://([^/]+)/(.+)", uri)
    if not m:
        raise ValueError(f"not a pack URI: {uri!r} (expected pack://NAME/FILE)")
    path = ensure_pack(m.group(1)) / m.group(2)
    if not path.exists():
        raise FileNotFoundError(f"{uri}: no such file in pack {m.group(1)} ({path.parent})")
    return path


def pack_summary(path: str | os.PathLike) -> list[dict]:
    """One row per file of a built pack: file, kind, ability, items, sources."""
    manifest = json.loads((Path(path) / "manifest.json").read_text(encoding="utf-8"))
    return [{"file": f, "kind": m["kind"], "ability": m["ability"], "items": m["items"],
             "sources": m["sources"]} for f, m in manifest["files"].items()]
