"""The writable layer's size cap: least-recently-used eviction that never removes an entry in use.

``JITKERN_CACHE_MAX_SIZE`` (``20GB`` = 20 * 10**9 bytes, ``20GiB`` = 20 * 2**30) bounds the first
writable layer. Read-only layers (baked into an image, installed as wheels) are never touched.

**Accounting, not walking.** ``<layer>/v<N>/usage.json`` holds a running estimate of the layer's
bytes. Every publish adds its entry's size to it under a ``flock`` on the file (one small read and
write in place; no directory walk). When the estimate passes the cap, the publishing process takes ``evict.lock``
without waiting (if another process is evicting, it goes on), walks the layer once, and removes the
least recently used entries until the layer holds at most ``LOW_WATER`` (90 %) of the cap, so the
next walk comes only after another tenth of the cap has been published. The walk also resets the
estimate to what is on disk; every ``RESYNC_PUBLISHES`` publishes it is re-measured anyway, which
corrects for processes that publish without the cap set.

**Last use** is the entry directory's mtime, which jitkern sets (``os.utime``) on every lookup in the
writable layer; atime is not used (``noatime``/``relatime`` mounts, NFS).

**In use** means locked: a process holds a shared ``flock`` on an entry directory from its lookup (or
publish) for as long as it keeps the ``Entry`` (``jitkern.locks.EntryHold``; a loaded kernel keeps its
entry). Eviction takes the exclusive lock without waiting and skips an entry it cannot get. Under
that lock it renames the entry into ``tmp/`` (atomic: a reader sees all of it or nothing), then
deletes it, its build lock file (unless someone holds it) and its plan-index records, and finally
the shard directories left empty. ``jitkern cache prune`` runs the same ``shrink``.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from . import counters, settings
from .locks import entry_lock
from .logs import log

ENV_MAX_SIZE = "JITKERN_CACHE_MAX_SIZE"
USAGE_FILE = "usage.json"
EVICT_LOCK = "evict.lock"
#: Eviction removes entries until the layer holds at most this fraction of the cap.
LOW_WATER = 0.9
#: Re-measure the layer (one walk) after this many publishes even when under the cap.
RESYNC_PUBLISHES = 1000
_HEX = set("0123456789abcdef")


# ---- settings ----------------------------------------------------------------------------------
def max_size() -> int | None:
    """``JITKERN_CACHE_MAX_SIZE`` in bytes (``jitkern.settings``), or None (no cap)."""
    return settings.get("cache_max_size")


# ---- walking a layer ---------------------------------------------------------------------------
def is_key(name: str) -> bool:
    return len(name) == 64 and set(name) <= _HEX


def iter_entries(root: Path) -> Iterator[tuple[str, Path]]:
    """(key, entry directory) for every published entry under a layer's ``v<N>`` directory (unverified)."""
    try:
        shards = sorted(os.scandir(Path(root) / "entries"), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return
    for shard in shards:
        if not shard.is_dir(follow_symlinks=False):
            continue
        try:
            names = sorted(os.scandir(shard.path), key=lambda e: e.name)
        except FileNotFoundError:  # removed (emptied) meanwhile
            continue
        for e in names:
            if is_key(e.name) and e.is_dir(follow_symlinks=False):
                yield e.name, Path(e.path)


def dir_size(path: Path) -> int:
    total = 0
    try:
        for e in os.scandir(path):
            try:
                total += e.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                pass
    except FileNotFoundError:
        pass
    return total


# ---- the usage estimate ------------------------------------------------------------------------
@contextlib.contextmanager
def _flocked(path: Path, blocking: bool = True):
    """An exclusive ``flock`` on a small lock file; yields False if ``blocking=False`` and it is taken."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        except (ImportError, OSError):  # no flock here: counts may race, the next walk corrects them
            pass
        yield True
    finally:
        os.close(fd)


def _parse_usage(raw: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return data if isinstance(data, dict) and isinstance(data.get("bytes"), int) else None


def read_usage(root: Path) -> dict[str, Any] | None:
    """The layer's usage record (None if there is none yet or it is unreadable)."""
    try:
        return _parse_usage((Path(root) / USAGE_FILE).read_bytes())
    except OSError:
        return None


def _update(root: Path, fn) -> dict[str, Any]:
    """Read-modify-write the usage record in place under an exclusive ``flock`` on the file itself (one
    open, no temporary file: this runs after every publish). A torn write (a crash mid-write) reads as
    no record, which the next publish answers with a walk that measures the layer again."""
    fd = os.open(Path(root) / USAGE_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
        except (ImportError, OSError):  # no flock here: counts may race, the next walk corrects them
            pass
        raw = b""
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            raw += chunk
        u = fn(_parse_usage(raw) if raw else None)
        data = json.dumps(u).encode()
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)
    return u


def after_publish(root: Path, nbytes: int, cap: int) -> dict[str, Any] | None:
    """Count a publish of ``nbytes`` into the layer at ``root``; evict if that puts it over ``cap``.
    Returns ``shrink``'s report when it evicted, else None. Never raises ``OSError`` (a cache that
    cannot keep its books is still a cache: the next walk corrects the estimate)."""
    try:
        def add(u):
            if u is None:
                return {"bytes": nbytes, "entries": 1, "unmeasured": True, "publishes": 1}
            u["bytes"] += nbytes
            u["entries"] = u.get("entries", 0) + 1
            u["publishes"] = u.get("publishes", 0) + 1
            return u

        u = _update(root, add)
        due = (u.get("unmeasured") or u["publishes"] >= RESYNC_PUBLISHES
               or (u["bytes"] > cap and u["bytes"] >= u.get("recheck_at", 0)))
        if not due:
            return None
        return shrink(root, int(cap * LOW_WATER), cap=cap, only_above=cap, wait=False)
    except OSError as e:
        log.debug("jitkern: size cap bookkeeping in %s failed: %s", root, e)
        return None


# ---- eviction ----------------------------------------------------------------------------------
def shrink(root: Path, target: int, *, cap: int | None = None, only_above: int | None = None,
           wait: bool = True) -> dict[str, Any] | None:
    """Remove least recently used entries of the layer at ``root`` (its ``v<N>`` directory) until it
    holds at most ``target`` bytes, skipping entries another process holds; with ``only_above``, only
    if it holds more than that (a walk that just re-measures). ``wait=False``: return None at once if
    another process is evicting. Also removes the plan-index records and build lock
    files of what it removes, index records of entries that no longer exist, and empty shard
    directories. Returns a report (bytes before/after, removed, kept in use)."""
    root = Path(root)
    (root / "tmp").mkdir(mode=0o700, parents=True, exist_ok=True)
    with _flocked(root / EVICT_LOCK, blocking=wait) as got:
        if not got:
            return None
        known = read_usage(root)
        before_estimate = known["bytes"] if known and not known.get("unmeasured") else None
        items = []
        for key, path in iter_entries(root):
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            items.append((st.st_mtime_ns, key, path, dir_size(path)))
        total = before = sum(i[3] for i in items)
        removed: list[str] = []
        freed = in_use = 0
        for mtime_ns, key, path, size in sorted(items) if only_above is None or total > only_above else ():
            if total <= target:
                break
            if _evict_one(root, key, path, mtime_ns):
                removed.append(key)
                total -= size
                freed += size
            else:
                in_use += 1
        gone = set(removed)
        if gone or only_above is None:  # prune also drops records of entries that are gone for other reasons
            _remove_index_records(root, gone, orphans=only_above is None)
        for shard in {k[:2] for k in gone}:
            with contextlib.suppress(OSError):
                os.rmdir(root / "entries" / shard)  # only if empty (atomic; a publisher re-creates it)
        remaining = len(items) - len(removed)

        def settle(u):
            u = dict(u or {})
            # bytes published while we walked (some of them the walk saw: an over-estimate, corrected next time)
            during = u.get("bytes", 0) - before_estimate if u and before_estimate is not None else 0
            u.update(bytes=total + max(0, during), entries=remaining, publishes=0, measured=time.time())
            u.pop("unmeasured", None)
            u["evicted_entries"] = u.get("evicted_entries", 0) + len(removed)
            u["evicted_bytes"] = u.get("evicted_bytes", 0) + freed
            u["walks"] = u.get("walks", 0) + 1
            if removed:
                u["last_eviction"] = time.time()
            # Held entries kept us over the cap: do not walk again until a twentieth of it more is published.
            u["recheck_at"] = total + cap // 20 if cap is not None and total > cap else 0
            return u

        _update(root, settle)
    if removed:
        counters.bump("evictions", len(removed))
        log.info("jitkern: evicted %d least recently used entr%s (%d bytes) from %s to fit %s",
                 len(removed), "y" if len(removed) == 1 else "ies", freed, root, target)
    return {"bytes_before": before, "bytes_after": total, "removed": len(removed), "removed_keys": removed,
            "freed": freed, "kept_in_use": in_use, "fits": total <= target}


def _evict_one(root: Path, key: str, path: Path, mtime_ns: int) -> bool:
    """Remove one entry if no process holds it and nobody used it since the walk saw it."""
    try:
        with entry_lock(path, exclusive=True, blocking=False) as held:
            if not held or os.lstat(path).st_mtime_ns != mtime_ns:  # in use, or used since we looked
                return False
            grave = root / "tmp" / f"prune-{key}-{uuid.uuid4().hex[:8]}"
            os.rename(path, grave)
    except FileNotFoundError:  # removed by someone else meanwhile
        return False
    shutil.rmtree(grave, ignore_errors=True)
    remove_build_lock(root, key)
    return True


def remove_build_lock(root: Path, key: str) -> None:
    """Remove a key's build lock file (and owner record) unless a process holds the lock now."""
    path = Path(root) / "locks" / f"{key}.lock"
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # being built right now: leave it
        os.close(fd)
        return
    except (ImportError, OSError):
        pass
    try:
        for p in (path.with_suffix(".owner"), path):
            with contextlib.suppress(OSError):
                os.unlink(p)
    finally:
        os.close(fd)


def _remove_index_records(root: Path, keys: set[str], orphans: bool = True) -> int:
    """Remove plan-index records (``index/<xx>/<ih>.json``, ``{"key": ...}``) that name one of ``keys``
    or, with ``orphans``, an entry that does not exist; then the index shards left empty."""
    index = Path(root) / "index"
    n = 0
    try:
        shards = list(os.scandir(index))
    except OSError:
        return 0
    for shard in shards:
        if not shard.is_dir(follow_symlinks=False):
            continue
        try:
            files = list(os.scandir(shard.path))
        except OSError:
            continue
        for f in files:
            if not f.name.endswith(".json"):
                continue
            try:
                key = json.loads(Path(f.path).read_text()).get("key")
            except (OSError, ValueError, AttributeError):
                key = None
            if not isinstance(key, str) or key in keys or (
                    orphans and is_key(key) and not os.path.isdir(Path(root) / "entries" / key[:2] / key)):
                with contextlib.suppress(OSError):
                    os.unlink(f.path)
                    n += 1
        with contextlib.suppress(OSError):
            os.rmdir(shard.path)
    with contextlib.suppress(OSError):
        os.rmdir(index)
    return n


def tidy(root: Path) -> None:
    """After removing entries by hand (``jitkern cache clear``): drop index records of entries that
    are gone, build lock files no one holds, empty shard directories, and re-measure the layer."""
    root = Path(root)
    _remove_index_records(root, set())
    try:
        locks = list(os.scandir(root / "locks"))
    except OSError:
        locks = []
    for f in locks:
        if f.name.endswith(".lock") and is_key(f.name[:-5]):
            remove_build_lock(root, f.name[:-5])
    for d in (root / "locks",):
        with contextlib.suppress(OSError):
            os.rmdir(d)
    try:
        shards = list(os.scandir(root / "entries"))
    except OSError:
        shards = []
    for s in shards:
        with contextlib.suppress(OSError):
            os.rmdir(s.path)
    with contextlib.suppress(OSError):
        if (root / USAGE_FILE).exists():
            _update(root, lambda u: {**(u or {}), "bytes": sum(dir_size(p) for _, p in iter_entries(root)),
                                     "entries": sum(1 for _ in iter_entries(root)), "publishes": 0})
