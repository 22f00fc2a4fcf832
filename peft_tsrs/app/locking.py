"""One lock between processes that share files (grid shards, a cached backbone): an exclusive POSIX ``flock``."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator


class LockBusy(Exception):
    """Raised by ``exclusive(path, wait=False)`` when another process holds the lock."""


@contextlib.contextmanager
def exclusive(path: str | os.PathLike, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the file ``path`` (created if missing) for the block. Another process (or
    thread) asking for it waits (``wait=False``: gets :class:`LockBusy` at once instead); the lock is released when
    the block ends or the process dies. No-op where ``fcntl`` is missing (Windows)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockBusy(str(path)) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
