"""Atomic file writes and tether's home directory.

Every output goes through a temp file + ``os.replace`` so a crash never leaves a half-written
report or checkpoint that a later step would trust.
"""

from __future__ import annotations

import functools
import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def tether_home() -> Path:
    """``$TETHER_HOME``, else ``$XDG_CACHE_HOME/tether``, else ``~/.cache/tether``."""
    if os.environ.get("TETHER_HOME"):
        return Path(os.environ["TETHER_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tether"


@contextmanager
def file_lock(lock: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file ``lock`` (created if missing), across processes and threads."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock; the atomic renames still hold, concurrent work is repeated
        yield
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class OutputError(ValueError):
    """An output path that cannot be written, found before any work starts."""


def check_writable(path: str | os.PathLike, *, directory: bool = False) -> Path:
    """Fail now, in one line, if ``path`` (a file, or with ``directory`` a folder) could not be written
    later: a long scoring run must not end with its results unwritable. Creates nothing that stays."""
    path = Path(path)
    if not directory and path.is_dir():
        raise OutputError(f"{path}: is a directory; give a file name for the output")
    if directory and path.exists() and not path.is_dir():
        raise OutputError(f"{path}: exists and is not a directory")
    probe = path if directory else path.parent
    while not probe.exists():  # the nearest existing ancestor must let us create what is missing
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"{path}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: no permission to write in {probe}")
    try:  # a real write where the output's folder is, or will be created (root ignores os.access)
        fd, tmp = tempfile.mkstemp(prefix=".tether-write-check.", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise OutputError(f"{path}: cannot write there ({e.strerror or e})") from None
    return path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; move it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_default) + "\n")


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> Path:
    return write_text(path, "".join(json.dumps(r, default=_default) + "\n" for r in rows))


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """Append one line; a line is written whole with one write call and flushed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, default=_default) + "\n")
        f.flush()


def _default(o: Any) -> Any:
    if hasattr(o, "model_dump"):
        return o.model_dump()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def load_yaml(text: str) -> Any:
    """YAML with 1.2 booleans (only true/false), for recipes, sequences and suites alike: YAML 1.1
    also reads on/off/yes/no as booleans, which silently turns ``lwf: {on: task+general}`` into
    ``{True: "task+general"}``."""
    import yaml

    return yaml.load(text, Loader=_yaml12_loader())  # noqa: S506 (a SafeLoader subclass)


@functools.cache
def _yaml12_loader() -> type:
    """A SafeLoader whose only booleans are true/false, built once (yaml is imported lazily)."""
    import yaml

    class Yaml12Loader(yaml.SafeLoader):
        pass

    Yaml12Loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool",
                                       re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
    return Yaml12Loader
