"""Per-process counters: what jitkern did, for tests, `jitkern doctor` and benchmarks."""
from __future__ import annotations

from collections import Counter

from . import state

#: compiles, disk_hits, memory_hits, corrupt_discarded, ... (see ``snapshot()``)
COUNTERS: Counter = Counter()


def bump(name: str, n: int = 1) -> None:
    COUNTERS[name] += n


def snapshot() -> dict[str, int]:
    """A copy of the counters: ``compiles`` (kernels compiled by this process), ``disk_hits``
    (entries loaded from the on-disk cache), ``memory_hits`` (kernels reused in-process),
    ``corrupt_discarded`` (entries that failed verification and were removed); remote cache
    (``jitkern.remote``): ``remote_hits`` (entries fetched instead of compiled), ``remote_misses``,
    ``remote_puts`` (entries published), ``remote_errors`` (failed requests; the remote switches itself
    off), ``remote_rejected`` (entries failing their checksum or signature), ``remote_waits`` (builds
    waited for because another node held the key's build lease); ``evictions`` (entries this process
    removed to keep the writable layer under ``JITKERN_CACHE_MAX_SIZE``, or by ``cache prune``),
    ``signature_refused`` (read-only layer entries not loaded: unsigned or not signed by a
    ``JITKERN_CACHE_VERIFY_KEY``); fallback table (``jitkern.fallback``):
    ``compiler_runs`` (C++ compiler processes started to build a variant), ``toolchain_queries``
    (``--version`` runs for keys), ``toolchain_cache_hits`` (versions read from the cache layer instead,
    ``jitkern.toolversions``), ``failures_recorded`` / ``failures_cached`` (build failures written to /
    found in the cache), ``fallbacks`` (variants skipped after a failure), ``runtime_fallbacks``
    (variants that raised at run time, inputs restored), ``inplace_backups``, ``guard_refusals``; dispatch: ``signatures`` (call signatures planned),
    ``renders`` (templates rendered: 0 in a process over a warm cache or a prebuilt layer); serve while
    compiling (``jitkern.background``): ``background_builds`` (builds handed to the worker process),
    ``background_switches`` (routes that moved to a candidate built in the background); debug
    (``jitkern.table_checks``): ``table_checks`` (calls whose tables were checked before the launch)."""
    base = dict.fromkeys(("compiles", "disk_hits", "memory_hits", "corrupt_discarded", "remote_hits",
                          "remote_misses", "remote_puts", "remote_errors", "remote_rejected", "remote_waits", "evictions", "signature_refused",
                          "compiler_runs", "toolchain_queries", "toolchain_cache_hits", "failures_recorded", "failures_cached",
                          "fallbacks", "runtime_fallbacks", "inplace_backups", "guard_refusals", "signatures",
                          "renders", "background_builds", "background_switches", "table_checks"), 0)
    base.update(COUNTERS)
    return base


@state.on_reset
def reset() -> None:
    COUNTERS.clear()
