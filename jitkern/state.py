"""Process state, reset in one call.

Every module that keeps something for the rest of the process (loaded kernels, per-signature
decisions, log-once keys, counters, memoised lookups) registers how to forget it here;
``jitkern.reset()`` runs them all: for tests, and for long-lived servers that switch caches or
settings. Kernels already handed out stay valid; later calls decide and load afresh.
"""
from __future__ import annotations

from typing import Callable

_resets: list[Callable[[], None]] = []


def on_reset(fn: Callable[[], None]) -> Callable[[], None]:
    """Register ``fn`` to run on ``reset()`` (modules call this once, at import)."""
    _resets.append(fn)
    return fn


def reset() -> None:
    """Forget all process state of every imported jitkern module."""
    for fn in list(_resets):
        fn()
