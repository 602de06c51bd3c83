"""Failure records: a variant that could not be built, remembered in the cache.

A failed build is stored where its artifact would have been: an entry whose ``entry.json`` says
``"status": "failed"`` with the reason, plus the full compiler log as ``build.log``, so no later
process runs the compiler again for it. The key holds the compiler fingerprint, so a new toolchain
retries; ``clear_failures()`` (``jitkern cache clear --failures``) forgets all records.

Only permanent failures are recorded (``jitkern.errors.is_transient`` is the one rule): a build
that ran out of time, was interrupted, lost its worker, or hit a full disk or a permission error
says nothing about the variant, so it is retried by the next process.
"""
from __future__ import annotations

import json
import os
from typing import Any

from . import counters
from .cache import ENTRY_META, Entry, Store, default_store
from .errors import BuildError, RecordedBuildFailure, UnavailableError, is_transient
from .logs import log
from .plan import Job, job_meta
from .status import FAILED

LOG_FILE = "build.log"

def is_failure(meta) -> bool:
    return meta.get("status") == FAILED


def failure_record(job: Job, err: BuildError) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Files and metadata of the cache entry that records ``job``'s failed build."""
    log_text = getattr(err, "log_text", None) or f"{type(err).__name__}: {err}\n"
    reason = getattr(err, "reason", None) or str(err)
    files = {LOG_FILE: log_text.encode(), "source.txt": job.source.encode()}
    meta = {
        **job_meta(job),
        "status": FAILED,
        "unavailable": isinstance(err, UnavailableError),
        "error_type": type(err).__name__,
        "reason": reason,
        "error": str(err),
        "log": LOG_FILE,
    }
    return files, meta


def record_failure(store: Store, job: Job, err: BuildError) -> BuildError:
    """Publish the failure record for ``job`` (the caller holds the key's lock); return the error to
    raise. Transient failures (``is_transient``) are not recorded: the next process tries again."""
    if is_transient(err):
        err.transient = True
        return err
    counters.bump("failures_recorded")
    files, meta = failure_record(job, err)
    try:
        entry = store.publish(job.key, files, meta)
    except OSError as e:
        log.info("jitkern: could not record the failed build of %s (%s)", job.describe(), e)
        return RecordedBuildFailure(str(err), None, reason=meta["reason"], log_text=getattr(err, "log_text", None))
    return _failure_error(entry, fresh=True)


def recorded_failure(entry: Entry) -> RecordedBuildFailure:
    """The error for a failure record found in the cache."""
    counters.bump("failures_cached")
    return _failure_error(entry, fresh=False)


def _failure_error(entry: Entry, fresh: bool) -> RecordedBuildFailure:
    m = entry.meta
    log_path = entry.file(m.get("log", LOG_FILE))
    when = "" if fresh else " (recorded earlier; not retried until the toolchain changes or " \
                           "'jitkern cache clear --failures')"
    e = RecordedBuildFailure(f"{m.get('op')}/{m.get('variant')} for {m.get('arch')}: {m.get('reason')}{when}",
                             str(log_path), reason=f"{m.get('reason')}{' (recorded earlier)' if not fresh else ''}")
    e.unavailable = bool(m.get("unavailable"))
    return e


def _entry_dirs(layer):
    entries = layer.root / "entries"
    if not entries.is_dir():
        return
    for shard in sorted(entries.iterdir()):
        if shard.is_dir():
            yield from sorted(p for p in shard.iterdir() if p.is_dir())


def failures(store: Store | None = None) -> list[dict[str, Any]]:
    """Every recorded failure in every layer: op, variant, arch, reason, log path, layer, key."""
    store = store or default_store()
    out = []
    for layer in store.layers:
        for d in _entry_dirs(layer):
            try:
                meta = json.loads((d / ENTRY_META).read_text())
            except (OSError, ValueError):
                continue
            if is_failure(meta):
                out.append({"op": meta.get("op"), "variant": meta.get("variant"), "arch": meta.get("arch"),
                            "reason": meta.get("reason"), "log": str(d / meta.get("log", LOG_FILE)),
                            "layer": str(layer.base), "key": d.name})
    return out


def clear_failures(store: Store | None = None) -> int:
    """Remove every recorded build failure from the writable layers; return how many were removed.

    This is what ``jitkern cache clear --failures`` does: the next use of those variants tries
    to build them again. Read-only layers are left alone.
    """
    store = store or default_store()
    n = 0
    for layer in store.layers:
        if not os.access(layer.root / "entries", os.W_OK | os.X_OK):
            continue
        for d in list(_entry_dirs(layer)):
            try:
                meta = json.loads((d / ENTRY_META).read_text())
            except (OSError, ValueError):
                continue
            if is_failure(meta):
                layer.discard(d.name)
                n += 1
    if n:
        log.info("jitkern: cleared %d recorded build failure(s)", n)
    return n


__all__ = ["LOG_FILE", "is_failure", "failure_record", "record_failure", "recorded_failure",
           "failures", "clear_failures"]
