"""One lock between processes that share files (grid shards, a cached backbone): an exclusive POSIX ``flock``."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator


@contextlib.contextmanager
def exclusive(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the file ``path`` (created if missing) for the block. Another process (or
    thread) asking for it waits; the lock is released when the block ends or the process dies. No-op where ``fcntl``
    is missing (Windows)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
