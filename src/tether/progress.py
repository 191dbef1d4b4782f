"""Progress display shared by every long step (rich), quiet when not on a terminal."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

QUIET = False  # `tether --quiet`: no progress lines or bars


def console():
    from rich.console import Console

    return Console(stderr=True)


@contextlib.contextmanager
def status(message: str) -> Iterator[None]:
    c = console()
    if QUIET:
        yield
    elif c.is_terminal:
        with c.status(message):
            yield
    else:
        print(f"[tether] {message}", file=sys.stderr, flush=True)
        yield


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar on a terminal, plain start/end lines otherwise."""
    from rich.progress import track as rich_track

    c = console()
    if c.is_terminal and not QUIET:
        yield from rich_track(items, description=description, total=total, console=c, transient=True)
    else:
        yield from items
