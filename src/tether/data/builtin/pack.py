"""The general probe pack (``general-v2``), built offline from packages (tasks: ``tasks.py``).

``ensure_pack()`` returns ``tether_home()/data/general-v2``, building it on first use: one JSONL
file per probe plus ``replay.jsonl`` and a ``manifest.json`` (items, sources, licenses, seed and
sha256 per file). The same seed gives byte-identical files.

Probe files (item schemas as the probes read them; every item also has ``id`` and ``source``):

============== =============== ============ =========================================================
file           kind            sources      what it measures
============== =============== ============ =========================================================
knowledge_mc   multiple_choice countryinfo, world knowledge: capitals, continents, elements, words, poems,
                               bsdgames     presidents (11 subsets)
mmlu_mc        multiple_choice mmlu         academic knowledge, cloze-style over the option texts
trivia_gen     generation      countryinfo, short factual answers (capitals, elements); collapse to task
                               bsdgames     labels shows here
chat_loss      perplexity      chatterbot   loss on held-out assistant turns (shares replay's source)
code_loss      perplexity      humaneval    loss on canonical Python solutions
drift_prompts  drift           countryinfo, next-token drift on general chat requests (11 templates)
                               bsdgames
============== =============== ============ =========================================================

``replay.jsonl`` mixes chatterbot conversations (split from ``chat_loss`` by conversation, near
duplicates clustered to one side) with Python documentation prose; every replay record that overlaps
any probe item is dropped. The knowledge, trivia and drift probes share no source with replay.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import unicodedata
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...io import file_lock, tether_home, write_json, write_jsonl
from ...progress import status
from . import sources as S

PACK_VERSION = 3  # bump when the builder's output changes: ensure_pack rebuilds older packs
PACKS = ("general-v2",)

# (file stem, kind, ability, sources, description)
PROBE_FILES = (
    ("knowledge_mc", "multiple_choice", "knowledge", ["countryinfo", "bsdgames"],
     "world knowledge multiple choice: capitals, continents, elements, word forms, poems, presidents"),
    ("mmlu_mc", "multiple_choice", "knowledge", ["mmlu"],
     "MMLU questions (lm-eval flan CoT prompts), choices scored as continuations"),
    ("trivia_gen", "generation", "factual_recall", ["countryinfo", "bsdgames"],
     "short factual questions answered freely; scored by 'contains'"),
    ("chat_loss", "perplexity", "chat", ["chatterbot"], "loss on held-out chatterbot assistant turns"),
    ("code_loss", "perplexity", "code", ["humaneval"],
     "loss on HumanEval canonical solutions given the prompt"),
    ("drift_prompts", "drift", "general", ["countryinfo", "bsdgames"],
     "general chat requests for next-token drift"),
)
REPLAY_SOURCES = ["chatterbot", "python-docs"]

# Items drawn per subset. Facts come from countryinfo (countries) and the bsdgames quiz files; a fact
# asked in one probe is not asked in another (countries and elements are split between them).
MC_SUBSETS = {"world_capital": 100, "continent": 60, "population": 40, "element_name": 50, "state_capital": 30,
              "collective_noun": 60, "young_animal": 40, "female_form": 24, "shakespeare_play": 50,
              "poem_author": 46, "president_successor": 43}
TRIVIA_SUBSETS = {"world_capital": 90, "state_capital": 20, "element_name": 40}
DRIFT_TEMPLATES = (  # (subset, template, entity pool): general chat requests about everyday topics
    ("country_intro", "Tell me a little about {x}.", "country"),
    ("city_known_for", "What is {x} known for?", "capital"),
    ("trip_packing", "I am planning a trip to {x}. What should I pack?", "country"),
    ("flower_poem", "Write a short poem about the {x}.", "flower"),
    ("animal_facts", "Give me three fun facts about {x}.", "animals"),
    ("element_uses", "What is {x} used for in everyday life?", "element"),
    ("president_bio", "Who was {x}, and what is he remembered for?", "president"),
    ("poem_line", "Explain this line of poetry in plain words: \"{x}\"", "poem_line"),
    ("state_visit", "Why do people like to visit {x}? Answer in two or three sentences.", "state"),
    ("young_care", "How should someone look after a {x}?", "young"),
    ("country_food", "What is a traditional dish from {x}, and how is it made?", "country"),
)
DRIFT_PER_TEMPLATE = 11
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


def _fold(text: str) -> str:
    """Accents dropped (``Brasília`` -> ``Brasilia``): a greedy answer may spell either."""
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))


def _overlaps(a: str, b: str) -> bool:
    """``a`` and ``b`` share a word (``Kuwait City`` / ``Kuwait``): the question would give the answer away."""
    return bool(set(normalise(_fold(a)).split()) & set(normalise(_fold(b)).split()))


def _printable(text: str) -> bool:
    return bool(text) and all(c.isprintable() for c in text)


def _fact(subset: str, key: str, question: str, answers: list[str], group: str = "") -> dict:
    """A fact asked as a question; ``answers[0]`` is the form shown as a choice, the rest also count."""
    answers = list(dict.fromkeys(a for x in answers for a in (x, _fold(x)) if a))
    return {"subset": subset, "key": key, "question": question, "answers": answers, "group": group}


def _continent(country: dict) -> str:
    if country["region"] != "Americas":
        return country["region"]
    return "South America" if country["subregion"] == "South America" else "North America"


def _country_facts(countries: list[dict], seed: int) -> dict[str, list[dict]]:
    """Capitals alternate by population rank between trivia and multiple choice, so both probes hold
    well-known and obscure countries and no capital is asked twice."""
    ok = [c for c in countries if _printable(c["name"]) and not _overlaps(c["name"], c["capital"])]
    ranked = sorted(ok, key=lambda c: (-c["population"], c["name"]))
    capital = {}
    for half, rows in (("trivia", ranked[0::2]), ("mc", ranked[1::2])):
        capital[half] = [_fact("world_capital", c["name"], f"What is the capital of {c['name']}?", [c["capital"]],
                               c["region"]) for c in rows]
    rng = _rng(seed, "facts/continent")
    continent = [_fact("continent", c["name"], f"On which continent is {c['name']}?", [_continent(c)])
                 for c in _sample(rng, [c for c in ok if c["region"] in
                                        ("Africa", "Americas", "Asia", "Europe", "Oceania")], len(ok))]
    rng = _rng(seed, "facts/population")
    populous = [c for c in ok if c["population"] > 0]
    population = []
    for i in range(10 * MC_SUBSETS["population"]):
        four = sorted(rng.sample(populous, 4), key=lambda c: -c["population"])
        if four[0]["population"] >= 2 * four[1]["population"]:  # a clear answer, whatever the census year
            names = ", ".join(sorted(c["name"] for c in four))
            population.append({**_fact("population", f"{i}", f"Which of these countries has the largest population: "
                                       f"{names}?", [four[0]["name"]]), "distractors": [c["name"] for c in four[1:]]})
    return {"capital_trivia": capital["trivia"], "capital_mc": capital["mc"], "continent": continent,
            "population": population}


def _quiz_facts(seed: int) -> dict[str, list[dict]]:
    """Facts from the bsdgames quiz files, one list per subset (elements and states split below)."""
    out: dict[str, list[dict]] = defaultdict(list)
    for sym, _num, weight, name in S.quiz("elements"):
        if not weight[0].startswith("("):  # long-lived elements only: their names are common knowledge
            out["element_name"].append(_fact("element_name", sym[0], f"Which chemical element has the symbol "
                                              f"{sym[0]}?", name))
    for state, cap, *_ in S.quiz("state"):
        if not _overlaps(state[0], cap[0]):
            out["state_capital"].append(_fact("state_capital", state[0], "What is the capital of the U.S. state "
                                              f"of {state[0]}?", cap))
    for ind, coll in S.quiz("collectives"):
        out["collective_noun"].append(_fact("collective_noun", ind[0], f"What is a group of {ind[0]} called?",
                                            [f"a {c}" for c in coll] + coll, "|".join(ind)))
    young: dict[str, list[str]] = defaultdict(list)
    for babies, animals in S.quiz("babies"):
        for animal in animals:
            young[animal] += babies
    for animal, babies in young.items():
        out["young_animal"].append(_fact("young_animal", animal, f"What is a young {animal} called?", babies))
    for male, female in S.quiz("sexes"):
        if len(male[0]) > 1:
            out["female_form"].append(_fact("female_form", male[0], f"What is the female counterpart of a "
                                            f"{male[0]}?", female))
    for line, after, play, _who in S.quiz("bard"):
        plays = list(dict.fromkeys(re.sub(r"\s+[IVX]+-[ivx]+$", "", p) for p in play))
        out["shakespeare_play"].append(_fact("shakespeare_play", line[0], "Which Shakespeare play are these lines "
                                             f"from?\n\"{' '.join([line[0], *after[:1]])}\"", plays))
    for line, _next, _poem, author in S.quiz("poetry"):
        out["poem_author"].append(_fact("poem_author", line[0], f"Who wrote the poem that begins \"{line[0]}\"?",
                                        author))
    for pres, _term, _vice, succ in S.quiz("pres"):
        if succ:
            out["president_successor"].append(_fact("president_successor", pres[0], f"Who succeeded {pres[0]} as "
                                                    "President of the United States?", succ))
    for subset in ("element_name", "state_capital"):  # first to trivia, the rest to multiple choice
        rows = _sample(_rng(seed, f"facts/{subset}"), out[subset], len(out[subset]))
        out[f"{subset}_trivia"], out[subset] = rows[: TRIVIA_SUBSETS[subset]], rows[TRIVIA_SUBSETS[subset]:]
    return out


def _facts(countries: list[dict], seed: int) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """``(multiple-choice pools, trivia pools)`` by subset: no fact in both."""
    countries = _country_facts(countries, seed)
    quiz = _quiz_facts(seed)
    trivia = {"world_capital": countries["capital_trivia"], "state_capital": quiz.pop("state_capital_trivia"),
              "element_name": quiz.pop("element_name_trivia")}
    mc = {"world_capital": countries["capital_mc"], "continent": countries["continent"],
          "population": countries["population"], **quiz}
    return {k: mc[k] for k in MC_SUBSETS}, trivia


def _knowledge_mc(pools: dict[str, list[dict]], seed: int) -> list[dict]:
    """Four choices per fact: the answer and three answers to other facts of the subset (same group,
    e.g. region, first), none of them an accepted spelling of this fact's answer."""
    out = []
    for subset, k in MC_SUBSETS.items():
        rng = _rng(seed, f"mc/{subset}")
        pool = pools[subset]
        for f in _sample(rng, pool, k):
            accepted = {normalise(a) for a in f["answers"]}
            if "distractors" in f:
                wrong = f["distractors"]
            else:
                others = [g for g in pool
                          if g["key"] != f["key"] and not {normalise(a) for a in g["answers"]} & accepted]
                others = list({g["answers"][0]: g for g in others}.values())
                near = [g for g in others if f["group"] and g["group"] == f["group"]]
                picks = _sample(rng, near, 3) if len(near) >= 3 else _sample(rng, others, 3)
                wrong = [g["answers"][0] for g in picks]
            if len(wrong) < 3:
                continue
            choices = [f["answers"][0], *wrong]
            rng.shuffle(choices)
            out.append({"id": f"{subset}/{f['key']}", "source": _source(subset), "subset": subset,
                        "query": f"Question: {f['question']}\nAnswer:", "choices": choices,
                        "gold": choices.index(f["answers"][0])})
    _rng(seed, "mc").shuffle(out)  # so that a suite's `limit` takes a mix of subsets
    return _dedupe(out, "query")


_FROM_COUNTRYINFO = {"world_capital", "continent", "population", "country", "capital"}  # subsets and drift pools


def _source(name: str) -> str:
    """The source of a subset's facts or of a drift template's entities; the rest are bsdgames quizzes."""
    return "countryinfo" if name in _FROM_COUNTRYINFO else "bsdgames"


def _trivia_gen(pools: dict[str, list[dict]], seed: int) -> list[dict]:
    out = []
    for subset, k in TRIVIA_SUBSETS.items():
        for f in pools[subset][:k]:
            out.append({"id": f"{subset}/{f['key']}", "source": _source(subset), "subset": subset,
                        "prompt": _user(f["question"]), "answers": f["answers"]})
    _rng(seed, "trivia").shuffle(out)
    return _dedupe(out, "prompt")


def _drift_entities(countries: list[dict]) -> dict[str, list[str]]:
    countries = [c for c in countries if _printable(c["name"]) and c["population"] >= 1_000_000]
    quiz = {n: S.quiz(n) for n in ("flowers", "collectives", "elements", "pres", "poetry", "state", "babies")}
    return {
        "country": [c["name"] for c in countries],
        "capital": [c["capital"] for c in countries],
        "flower": [r[0][0].lower() for r in quiz["flowers"] if "," not in r[0][0]],
        "animals": [r[0][0] for r in quiz["collectives"]],
        "element": [r[3][0].lower() for r in quiz["elements"] if not r[2][0].startswith("(")],
        "president": [r[0][0] for r in quiz["pres"]],
        "poem_line": [r[1][0] for r in quiz["poetry"] if r[1]],
        "state": [r[0][0] for r in quiz["state"]],
        "young": [r[0][0] for r in quiz["babies"]],
    }


def _drift_prompts(countries: list[dict], seed: int) -> list[dict]:
    entities = _drift_entities(countries)
    out = []
    for subset, template, pool in DRIFT_TEMPLATES:
        names = sorted(set(entities[pool]))
        for x in _sample(_rng(seed, f"drift/{subset}"), names, DRIFT_PER_TEMPLATE):
            out.append({"id": f"{subset}/{x}", "source": _source(pool), "subset": subset,
                        "prompt": _user(template.format(x=x))})
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


def build_pack(name: str = "general-v2", out_dir: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """Build the probe pack ``name`` into ``out_dir`` (default ``tether_home()/data/name``), atomically."""
    if name not in PACKS:
        raise ValueError(f"unknown pack {name!r}; known: {', '.join(PACKS)}")
    out = Path(out_dir) if out_dir else tether_home() / "data" / name
    with status(f"building probe pack {name} (seed {seed})"):
        countries = S.countryinfo_countries()
        mc_pools, trivia_pools = _facts(countries, seed)
        probes = {"knowledge_mc": _knowledge_mc(mc_pools, seed), "mmlu_mc": _mmlu_mc(seed),
                  "trivia_gen": _trivia_gen(trivia_pools, seed), "code_loss": _code_loss(seed),
                  "drift_prompts": _drift_prompts(countries, seed)}
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
                "sources": {s: {**S.SOURCES[s], **S.READ.get(s, {})}
                            for s in sorted({s for f in manifest_files.values() for s in f["sources"]})},
                "decontamination": {
                    "replay_records_dropped": dropped,
                    "rule": "no probe text (>= 3 words) inside a replay record; word 3-gram Jaccard < 0.5"},
            }
            manifest["sources"]["python-docs"]["origin"] = docs_origin  # the .deb, or the fallback used
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


def ensure_pack(name: str = "general-v2") -> Path:
    """``tether_home()/data/name``, built on first use (and rebuilt when the builder changed)."""
    return build_once(tether_home() / "data" / name, lambda path: build_pack(name, path))


def build_once(path: Path, build: Callable[[Path], Path]) -> Path:
    """``path`` if its build is current, else ``build(path)``, one builder at a time: two runs started
    together on a fresh machine wait for one build instead of both fetching and unpacking the
    probe sources."""
    if _fresh(path):
        return path
    with file_lock(path.parent / f".{path.name}.build.lock"):
        return path if _fresh(path) else build(path)


def pack_summary(path: str | os.PathLike) -> list[dict]:
    """One row per file of a built pack: file, kind, ability, items, sources."""
    manifest = json.loads((Path(path) / "manifest.json").read_text(encoding="utf-8"))
    return [{"file": f, "kind": m["kind"], "ability": m["ability"], "items": m["items"],
             "sources": m["sources"]} for f, m in manifest["files"].items()]
