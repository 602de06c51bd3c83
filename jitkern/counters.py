"""Per-process counters: what jitkern did, for tests, `jitkern doctor` and benchmarks."""
from __future__ import annotations

from collections import Counter

#: compiles, disk_hits, memory_hits, corrupt_discarded, ... (see ``snapshot()``)
COUNTERS: Counter = Counter()


def bump(name: str, n: int = 1) -> None:
    COUNTERS[name] += n


def snapshot() -> dict[str, int]:
    """A copy of the counters: ``compiles`` (kernels compiled by this process), ``disk_hits``
    (entries loaded from the on-disk cache), ``memory_hits`` (kernels reused in-process),
    ``corrupt_discarded`` (entries that failed verification and were removed)."""
    base = dict.fromkeys(("compiles", "disk_hits", "memory_hits", "corrupt_discarded"), 0)
    base.update(COUNTERS)
    return base


def reset() -> None:
    COUNTERS.clear()
