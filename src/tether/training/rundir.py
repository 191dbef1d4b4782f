"""Run directories that a run cannot damage: claimed whole, locked while written, marked as they end.

A run is trusted with hours of compute; its directory must never mix two runs or lose one. So a run
writes only after every input was checked; it refuses a directory that holds another run unless the
user asked to replace it (``--overwrite``, which clears it first: no old plots mixed into new
results); a lock beside the directory turns a second run into the same place away; and
``status.json`` says ``running``, ``finished`` or ``failed`` (with the error), which `tether report`
reads before it renders anything.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..io import write_json

STATUS = "status.json"


class RunDirError(ValueError):
    """A run directory that cannot be used for this run; the message says why and what to do."""


def default_run_dir(task: str | None, kind: str = "train") -> str:
    """``runs/<task file stem>-<UTC time>``: unique per run, readable, sorted by time (as HF Trainer's)."""
    stem = Path(str(task)).stem if task else kind
    stem = re.sub(r"[^\w.-]+", "-", stem).strip("-") or kind
    base = f"runs/{stem}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    path, n = base, 1
    while Path(path).exists():  # two runs started in the same second
        n += 1
        path = f"{base}-{n}"
    return path


def is_main_process() -> bool:
    """Under torchrun / accelerate launch only rank 0 writes the run directory."""
    return int(os.environ.get("RANK", "0")) == 0


def read_status(path: str | os.PathLike) -> dict | None:
    import json

    try:
        return json.loads((Path(path) / STATUS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _wait_for_main(path: Path, timeout: float = 600.0) -> None:
    """Block until rank 0 has claimed ``path`` for this launch (same torchrun run id, else started after
    this process was waiting), so no rank writes into a directory rank 0 may still clear or refuse."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    t0 = time.time()
    while time.time() - t0 < timeout:
        st = read_status(path) or {}
        this_launch = st.get("run_id") == run_id if run_id else st.get("started", 0) >= t0 - 60
        if this_launch and st.get("state") == "running":
            return
        if this_launch and st.get("state") == "failed":
            raise RunDirError(f"{path}: the main process failed ({st.get('error')})")
        time.sleep(0.2)
    raise RunDirError(f"{path}: the main process did not take the run directory within {timeout:.0f} s "
                      "(it refused it or failed first: see its message)")


@contextmanager
def claim(path: str | os.PathLike, *, overwrite: bool = False, kind: str = "train",
          resume: bool = False) -> Iterator[Path]:
    """Hold ``path`` for one run: refuse it when it holds another run (unless ``overwrite``) or another
    process is writing it, then mark it ``running``, and ``finished`` or ``failed`` as the block ends.
    ``resume``: take back an interrupted or failed run's directory as it is (a finished one is refused)."""
    path = Path(path)
    if not is_main_process():  # rank 0 holds the directory; the others write nothing there before it does
        _wait_for_main(path)
        yield path
        return
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{path}: exists and is not a directory; give another --output-dir")
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = open(path.parent / f".{path.name}.lock", "a+")  # noqa: SIM115 - held for the whole run
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirError(f"{path}: another run is writing into this directory now; wait for it or give "
                              "another --output-dir") from None
        if resume:
            state = (read_status(path) or {}).get("state")
            if state not in ("running", "failed"):  # running and unlocked: the process was killed
                what = "a finished run: nothing to resume" if state == "finished" else "no run to resume"
                raise RunDirError(f"{path}: holds {what}")
        elif path.exists() and any(path.iterdir()):
            if not overwrite:
                state = (read_status(path) or {}).get("state")
                what = {"finished": "a finished run", "failed": "a failed run", "running": "an interrupted run"}.get(
                    state, "files")
                raise RunDirError(f"{path}: holds {what}; give another --output-dir, or --overwrite to replace it")
            for p in path.iterdir():
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        path.mkdir(parents=True, exist_ok=True)
        started = time.time()
        write_json(path / STATUS, {"state": "running", "kind": kind, "pid": os.getpid(), "started": started,
                                   "run_id": os.environ.get("TORCHELASTIC_RUN_ID")})
        try:
            yield path
        except BaseException as e:
            first = (str(e).strip().splitlines() or [""])[0]
            error = f"{type(e).__name__}: {first}" if first else type(e).__name__
            write_json(path / STATUS, {"state": "failed", "kind": kind, "error": error, "started": started,
                                       "ended": time.time(), "run_id": os.environ.get("TORCHELASTIC_RUN_ID")})
            raise
        write_json(path / STATUS, {"state": "finished", "kind": kind, "started": started, "ended": time.time()})
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
