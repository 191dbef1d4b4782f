"""``task://NAME/FILE`` and ``pack://NAME/FILE``: the one place these references are parsed.

A shipped recipe, sequence or suite names its data by reference (``task://fortune-topics/train.jsonl``,
``pack://general-v2/replay.jsonl``) so that it runs anywhere: `resolve` turns the reference into the
file's path, building the task or pack from packaged sources on first use. Every caller that accepts
such a reference resolves it before reading; `tether.data.readers` only reads files.
"""

from __future__ import annotations

import re
from pathlib import Path

PACK_SCHEME = "pack://"
TASK_SCHEME = "task://"
SCHEMES = (PACK_SCHEME, TASK_SCHEME)


def resolve(ref: str | Path) -> Path:
    """``pack://NAME/FILE`` (the probe pack) or ``task://NAME/FILE`` (a built-in task) -> the file's path,
    built on first use; anything else is returned as a `Path`, unchanged.

    A malformed reference, an unknown task or a file the data does not have is a one-line
    `DataError` naming the reference; a source that cannot be had stays a `SourceMissing`.
    """
    if not isinstance(ref, str) or not ref.startswith(SCHEMES):
        return Path(ref)
    from ..readers import DataError  # lazily: readers imports the schemes from here

    try:
        return _resolve_pack(ref) if ref.startswith(PACK_SCHEME) else _resolve_task(ref)
    except (ValueError, FileNotFoundError) as e:
        raise DataError(ref, None, None, str(e)) from None


def _resolve_pack(uri: str) -> Path:
    from . import pack  # lazily: only a reference needs its builder

    m = re.fullmatch(r"pack://([^/]+)/(.+)", uri)
    if not m:
        raise ValueError(f"not a pack URI: {uri!r} (expected pack://NAME/FILE)")
    path = pack.ensure_pack(m.group(1)) / m.group(2)
    if not path.exists():
        raise FileNotFoundError(f"{uri}: no such file in pack {m.group(1)} ({path.parent})")
    return path


def _resolve_task(uri: str) -> Path:
    from . import tasks

    m = re.fullmatch(r"task://([^/]+)/(.+)", uri)
    if not m:
        raise ValueError(f"not a data URI: {uri!r} (expected task://NAME/FILE or pack://NAME/FILE)")
    if m.group(1) not in tasks.BUILDERS:
        raise ValueError(f"unknown task {m.group(1)!r} in {uri}; known: {', '.join(tasks.TASKS)}")
    path = tasks.ensure_task(m.group(1)) / m.group(2)
    if not path.exists():
        raise FileNotFoundError(f"no file {m.group(2)!r} in task {m.group(1)} (has train.jsonl, eval.jsonl)")
    return path
