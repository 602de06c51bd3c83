"""Stage 2 of the pipeline: ``get_entry(job)`` — the cache entry of a planned job: lookup, then
under the key's lock: lookup again, the remote cache, build, budget check, publish.

What a process does when things go wrong (each case has a test in tests/test_reliability.py):

- an entry that fails verification, or whose ``entry.json``/binary is for another op or arch than
  the job (``check_entry``), is discarded with one warning and rebuilt; it is never loaded;
- another process holds the key's build lock: wait, logging who holds it every so often; past
  ``JITKERN_LOCK_TIMEOUT`` build privately (``jitkern.locks``). A dead holder's lock is released
  by the kernel at once;
- the cache cannot be written (read-only, full disk, no writable layer): build into a private
  temporary directory for this process, with one warning; nothing half-written stays in the cache;
- Triton's own cache dir cannot be written: redirect it for this process (``jitkern.triton_cache``).
"""
from __future__ import annotations

import json
import os
import time

from . import binaries, budget, builders, counters, remote, strict, triton_cache
from .cache import Entry, Store, default_store
from .errors import BuildError, CacheError, CorruptEntryError, OverBudgetError, is_transient
from .failures import record_failure, recorded_failure
from .logs import log, warn_once
from .plan import Job, job_meta
from .status import BUILT, CACHED, FAILED, FETCHED, REJECTED


def _build_files(job: Job, store: Store):
    """The one place a job is compiled (after the cache and the remote were asked)."""
    strict.check(job, store)  # JITKERN_STRICT: a run-time compile raises or warns, explaining the miss
    builder = builders.get(job.variant.kind)
    log.info("jitkern: building %s", job.describe())
    t0 = time.perf_counter()
    try:
        files, meta = builder.build(job)
    except (OSError, MemoryError, TimeoutError) as e:  # the machine, not the variant (a full temp dir, ...)
        if not is_transient(e):
            raise
        raise BuildError(f"could not build {job.describe()}: {type(e).__name__}: {e} (not recorded: the next "
                         "attempt builds it again)", transient=True) from e
    meta = {**meta, **budget.assess_build(job, files, meta)}  # status ok|rejected_over_budget + figures
    dt = time.perf_counter() - t0
    counters.bump("compiles")
    log.info("jitkern: built %s in %.2f s (key %s)", job.describe(), dt, job.key[:16])
    meta = {**job_meta(job), "signature": job.signature, "build_seconds": round(dt, 3), **meta}
    return files, meta


def _cached(entry: Entry) -> tuple[Entry, str]:
    if entry.meta.get("status") == FAILED:  # a recorded build failure (jitkern.failures)
        raise recorded_failure(entry)
    counters.bump("disk_hits")
    return entry, CACHED


def get_entry(job: Job, store: Store | None = None, *, record_failures: bool = False) -> tuple[Entry, str]:
    """Return ``(entry, status)`` with status ``"cached"`` or ``"built"``; see ``_lookup_or_build``.

    Every entry, built now or loaded, passes the resource check (``jitkern.budget``): one over the
    arch's budget raises ``OverBudgetError`` and is never returned for a launch; its rejection is
    stored in the entry, so no later process compiles it again.
    """
    entry, how = _lookup_or_build(job, store, record_failures=record_failures)
    budget.enforce(job, entry)
    return entry, how


def _lookup_or_build(job: Job, store: Store | None = None, *, record_failures: bool = False
                     ) -> tuple[Entry, str]:
    """Return ``(entry, status)`` with status ``"cached"``, ``"fetched"`` (remote cache) or ``"built"``.

    On a miss the key's lock is taken, the store is checked again (another process may have built it
    meanwhile), and only then is the job built and published. A key whose failure was recorded raises
    ``RecordedBuildFailure``; with ``record_failures`` a ``BuildError`` is recorded under the key's
    lock before it propagates, so no process retries it (see ``jitkern.fallback``).
    """
    store = store or default_store()
    check = checker(job)
    entry = store.lookup(job.key, check)
    if entry is not None:
        return _cached(entry)
    if job.arch.backend is not None and job.variant.kind == "triton":
        # Triton writes its cache while compiling (loads through Triton's driver check it in
        # jitkern.launcher.GPUKernel; a cached entry loaded by the CUDA driver alone never needs it)
        triton_cache.ensure_writable()
    try:
        lock = store.build_lock(job.key, job.describe())
    except CacheError:
        return _build_in_memory(job, store), BUILT
    with lock as held:
        if not held and not lock.unlockable:  # JITKERN_LOCK_TIMEOUT passed, or our parent holds it
            entry = store.lookup(job.key, check)
            if entry is not None:
                return _cached(entry)
            return _build_in_memory(job, store), BUILT
        # held, or no locks on this filesystem: build and publish (atomic; a concurrent twin's entry wins)
        with remote.FleetBuild(job.key, store) as fleet:
            return _locked_lookup_or_build(job, store, fleet, check, record_failures)


def _locked_lookup_or_build(job: Job, store: Store, fleet, check, record_failures: bool) -> tuple[Entry, str]:
    """The part of ``_lookup_or_build`` that runs holding the key's build lock."""
    entry = store.lookup(job.key, check)
    if entry is not None:
        return _cached(entry)
    entry = fleet.fetch_or_lease()  # JITKERN_REMOTE_CACHE: fetched, or None holding the fleet's build lease
    if entry is not None:
        try:
            check(entry)
        except CorruptEntryError as e:
            store._damaged(store.write_layer, job.key, e)
        else:
            return entry, FETCHED
    try:
        files, meta = _build_files(job, store)
    except BuildError as e:
        if not record_failures:
            raise
        raise record_failure(store, job, e) from e
    try:
        return fleet.publish(store.publish(job.key, files, meta)), BUILT
    except OSError as e:
        warn_once(("publish-failed", str(store)), "jitkern: could not write cache entry (%s); "
                  "keeping kernels in memory for this process", e)
        return _memory_entry(job, files, meta), BUILT


def _build_in_memory(job: Job, store: Store) -> Entry:
    files, meta = _build_files(job, store)
    return _memory_entry(job, files, meta)


def _memory_entry(job: Job, files, meta) -> Entry:
    """An entry in a private temporary directory, for when the cache cannot be written (no writable
    layer, full disk, a wedged lock holder). Removed when the process exits."""
    import atexit
    import shutil
    import tempfile
    from pathlib import Path

    d = None
    try:
        d = Path(tempfile.mkdtemp(prefix=f"jitkern-{job.key[:12]}-"))
        for name, data in files.items():
            fd = os.open(d / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with open(fd, "wb") as f:
                f.write(data)
    except OSError as e:
        if d is not None:
            shutil.rmtree(d, ignore_errors=True)
        raise CacheError(f"built {job.describe()} but could not write it anywhere: the cache and the temporary "
                         f"directory ({tempfile.gettempdir()}) both failed ({e}). Free some disk space, or set "
                         f"TMPDIR / JITKERN_CACHE_DIR to a filesystem with room") from e
    atexit.register(shutil.rmtree, d, True)
    return Entry(job.key, d, {**meta, "key": job.key}, dict(files))


def checker(job: Job):
    """``check(entry)`` for ``Store.lookup``: ``check_entry`` against ``job``."""
    return lambda entry: check_entry(job, entry)


def check_entry(job: Job, entry: Entry) -> None:
    """Raise ``CorruptEntryError`` if a verified entry is not what ``job`` planned. Checksums cannot
    catch these (a copied or rewritten entry carries a consistent manifest), so everything the loader
    trusts is compared with the job: ``entry.json``'s op, variant, arch, kernel name and parameters;
    the stored source, byte for byte (the job's key is a hash of its source with the other key
    parts, so this is the key recomputed from the entry's own source); and for Triton GPU binaries
    the ELF header's target and the metadata's target and kernel name. All from the verified bytes."""
    check_job_fields(job, entry)
    check_artifact(entry, job.arch, job.variant.kind, job.variant.kernel)


def check_artifact(entry: Entry, arch, kind: str, kernel: str | None = None) -> None:
    """Raise ``CorruptEntryError`` if ``entry``'s Triton binary or metadata is not for ``arch`` (or,
    given ``kernel``, names another kernel). ``jitkern cache verify`` runs this with the arch and
    kernel the entry records."""
    if entry.meta.get("status") == FAILED or kind != "triton" or arch.backend is None:
        return
    name = binaries.binary_name(arch)
    try:
        data = entry.read_bytes(name)[:64]  # the ELF header is all that is compared
        md = json.loads(entry.read_bytes(binaries.METADATA_FILE))
    except (OSError, ValueError) as e:
        raise CorruptEntryError(f"entry {entry.path} lacks a readable {name} or {binaries.METADATA_FILE}: {e}") from None
    if not binaries.matches(arch, data):
        raise CorruptEntryError(f"{entry.file(name)} is {binaries.describe(data)}, not a binary for {arch.name}")
    target = md.get("target") if isinstance(md, dict) else None
    if not isinstance(target, dict) or str(target.get("arch")) != str(arch.triton_arch) \
            or target.get("backend") != arch.backend:
        raise CorruptEntryError(f"{entry.file(binaries.METADATA_FILE)} names target {target!r}, not {arch.name}")
    if kernel is not None and md.get("name") != kernel:
        raise CorruptEntryError(f"{entry.file(binaries.METADATA_FILE)} is for kernel {md.get('name')!r}, not "
                                f"{kernel!r}")


#: Where each kind of entry keeps the source it was built from (failure records: ``source.txt``).
FAILURE_SOURCE = "source.txt"


def source_file(job: Job, meta) -> str:
    if meta.get("status") == FAILED:
        return FAILURE_SOURCE
    builder = builders.get(job.variant.kind)
    return getattr(builder, "source_name", None) or getattr(builder, "SOURCE_FILE", binaries.SOURCE_FILE)


def check_job_fields(job: Job, entry: Entry) -> None:
    """The job-level half of ``check_entry``: metadata fields and the stored source."""
    meta = entry.meta
    want = {"op": job.spec.name, "variant": job.variant.name, "arch": job.arch.name, "kernel": job.variant.kernel,
            "params": json.loads(json.dumps(job.config.p, default=str))}
    for field_name, value in want.items():
        if meta.get(field_name) != value:
            raise CorruptEntryError(f"entry {entry.path} records {field_name}={meta.get(field_name)!r} but was "
                                    f"looked up for {field_name}={value!r}")
    name = source_file(job, meta)
    try:
        stored = entry.read_bytes(name)
    except OSError:
        raise CorruptEntryError(f"entry {entry.path} holds no {name}: the source it was built from") from None
    if stored != job.source.encode():
        raise CorruptEntryError(f"entry {entry.path}: {name} is not the source {job.describe()} renders to (its key "
                                "recomputed from that source differs)")


def report(job: Job, store: Store | None = None) -> dict:
    """Build or load ``job`` and report it, for prebuild and tools.

    Returns ``{"status": "built"|"cached"|"fetched"|"rejected_over_budget", "shared_bytes",
    "budget_bytes", "regs", "regs_limit", "spills", "reason"}``. Build failures raise as usual.
    """
    try:
        entry, how = get_entry(job, store)
    except OverBudgetError as e:
        f = e.figures
        return {"status": REJECTED, "reason": str(e), **{k: f.get(k) for k in budget.FIGURE_KEYS}}
    res = entry.meta.get("resources") or {}
    figs = {k: res.get(k) for k in budget.FIGURE_KEYS}
    if figs["shared_bytes"] is None:
        figs["shared_bytes"] = entry.meta.get("shared_bytes")
    if figs["budget_bytes"] is None and job.arch.backend is not None:
        figs["budget_bytes"] = job.arch.shared_mem_per_block
    return {"status": how, "reason": "", **figs}


__all__ = ["get_entry", "check_entry", "check_artifact", "checker", "report"]
