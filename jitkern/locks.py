"""Per-key build locks that never wedge and never wait silently; entry locks (in use vs eviction).

A build lock is a ``filelock.FileLock`` (``flock`` on Unix): the kernel releases it the moment its
holder dies, however it dies, so a killed build never blocks the next process. Next to each lock,
its holder writes an owner file (``<key>.owner``: pid, host, since when, what it builds), so a
process that waits longer than ``WAIT_REPORT_SECONDS`` logs who it is waiting for, and again every
``WAIT_REPEAT_SECONDS``. ``JITKERN_LOCK_TIMEOUT`` caps the wait; past it, ``acquire`` returns
``None`` and the caller builds on its own rather than hang.

Filesystems without ``flock`` (some network mounts) are not given a lock-file-exists fallback, since
such a lock outlives a dead holder: there the lock is skipped with one warning and builds rely on
the atomic publish (two processes may build the same key; neither can see a half-written entry).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
import uuid
from pathlib import Path

from . import settings
from .logs import log, warn_once

#: Default for ``JITKERN_LOCK_TIMEOUT``: longer than any sane build (C++ modules take minutes).
DEFAULT_TIMEOUT = settings.setting("lock_timeout").default
WAIT_REPORT_SECONDS = 5.0
WAIT_REPEAT_SECONDS = 60.0
POLL_SECONDS = 0.05
#: How soon a waiter first checks whether the holder is its own parent (see ``BuildLock.acquire``).
PARENT_CHECK_SECONDS = 0.5


def lock_timeout() -> float:
    """``JITKERN_LOCK_TIMEOUT`` in seconds (``inf`` = wait for ever; ``0`` = never wait)."""
    return settings.get("lock_timeout")


def host() -> str:
    return socket.gethostname()


def read_owner(path: Path) -> dict | None:
    """The owner record of a lock (None if absent or unreadable)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def describe_owner(owner: dict | None) -> str:
    if not owner:
        return "an unknown process (no owner file)"
    since = owner.get("since")
    try:
        age = f", for {time.time() - float(since):.0f} s (since {time.strftime('%H:%M:%S', time.localtime(since))})"
    except (TypeError, ValueError):
        age = ""
    what = f", building {owner['what']}" if owner.get("what") else ""
    return f"pid {owner.get('pid')} on host {owner.get('host')}{age}{what}"


class BuildLock:
    """``with BuildLock(path) as held:`` ``held`` is True once the lock is ours; False if the wait
    timed out or the holder is this process's parent (the caller then builds privately), or if the
    filesystem cannot lock (``unlockable``: the caller builds and publishes without a lock)."""

    def __init__(self, path: Path, what: str = "", timeout: float | None = None):
        self.path = Path(path)
        self.owner_path = self.path.with_suffix(".owner")
        self.what = what
        self.timeout = lock_timeout() if timeout is None else timeout
        self._lock = None
        self.waited = 0.0
        #: True when the filesystem cannot lock at all (as opposed to a holder that did not finish in time)
        self.unlockable = False

    def acquire(self) -> bool:
        import filelock

        # 0600 whatever the umask (locks/ is private, jitkern.cache.Layer.check_secure)
        lock = filelock.FileLock(str(self.path), mode=0o600, fallback_to_soft=False, thread_local=False)
        t0 = time.monotonic()
        report_at = WAIT_REPORT_SECONDS
        while True:
            waited = time.monotonic() - t0
            remaining = self.timeout - waited
            step = max(0.0, min(remaining, report_at - waited, PARENT_CHECK_SECONDS if waited < 1 else remaining))
            try:
                lock.acquire(timeout=step, poll_interval=POLL_SECONDS)
                break
            except filelock.Timeout:
                pass
            except OSError as e:  # no flock on this filesystem, or the lock file cannot be opened
                warn_once(("lock-unusable", str(self.path.parent)),
                          "jitkern: cannot take build locks in %s (%s); building without a lock (entries "
                          "are still published atomically, but two processes may build the same kernel)",
                          self.path.parent, e)
                self.waited = time.monotonic() - t0
                self.unlockable = True
                return False
            waited = time.monotonic() - t0
            owner = read_owner(self.owner_path)
            if owner and owner.get("pid") == os.getppid() and owner.get("host") == host():
                # Our parent holds it and is most likely waiting for us (e.g. a script without an
                # ``if __name__ == "__main__":`` guard, re-run by a multiprocessing "spawn" child): waiting
                # would deadlock both.
                warn_once(("lock-held-by-parent", str(self.path)),
                          "jitkern: the build lock of %s is held by this process's parent (pid %d); building "
                          "privately instead of waiting for it (is a script missing an "
                          "'if __name__ == \"__main__\":' guard?)", self.what or self.path.stem, os.getppid())
                self.waited = waited
                return False
            if waited >= self.timeout:
                self.waited = waited
                log.warning("jitkern: gave up waiting after %.0f s (JITKERN_LOCK_TIMEOUT) for the build lock of %s, "
                            "held by %s; building it in a private directory instead",
                            waited, self.what or self.path.stem, describe_owner(read_owner(self.owner_path)))
                return False
            if waited >= report_at - POLL_SECONDS:
                log.warning("jitkern: waiting %.0f s so far for %s to finish building %s (lock %s); "
                            "JITKERN_LOCK_TIMEOUT=%g s", waited, describe_owner(read_owner(self.owner_path)),
                            self.what or self.path.stem, self.path, self.timeout)
                report_at = waited + WAIT_REPEAT_SECONDS
        self._lock = lock
        self.waited = time.monotonic() - t0
        self._write_owner()
        return True

    def _write_owner(self) -> None:
        record = {"pid": os.getpid(), "host": host(), "since": time.time(), "what": self.what}
        tmp = self.owner_path.with_name(f"{self.owner_path.name}.{uuid.uuid4().hex[:8]}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
            with open(fd, "w") as f:
                f.write(json.dumps(record))
            os.replace(tmp, self.owner_path)
        except OSError:  # the owner file is for people reading logs; never fail a build over it
            try:
                tmp.unlink()
            except OSError:
                pass

    def release(self) -> None:
        if self._lock is None:
            return
        try:
            os.unlink(self.owner_path)
        except OSError:
            pass
        self._lock.release()
        self._lock = None

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---- entry locks: "in use" for eviction --------------------------------------------------------
@contextlib.contextmanager
def entry_lock(path: Path, exclusive: bool = False, blocking: bool = True):
    """Hold an advisory lock on an entry directory itself (no lock file): shared while a process uses
    the entry (see ``EntryHold``), exclusive while eviction (``jitkern.evict``) removes it. Yields True
    if the lock is held, False if ``blocking=False`` and another process holds it, and True without
    locking where the platform or filesystem has no ``flock``. Raises FileNotFoundError if the entry
    is absent."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except FileNotFoundError:
        raise
    except OSError:  # directories cannot be opened here (e.g. Windows): last-use stamps still apply
        yield True
        return
    try:
        try:
            import fcntl

            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        except (ImportError, OSError):  # no flock here (e.g. Windows): last-use stamps still apply
            pass
        yield True
    finally:
        os.close(fd)


class EntryHold:
    """A shared ``flock`` on one entry directory, held for as long as this object lives (a loaded
    kernel keeps its ``Entry``, which keeps its hold), so eviction never removes an entry a live
    process uses. Released by ``release()`` or when the object is garbage-collected."""

    __slots__ = ("fd", "__weakref__")

    def __init__(self, fd: int | None):
        self.fd = fd

    @classmethod
    def take(cls, path: Path) -> "EntryHold":
        """Lock ``path`` shared (waiting out an evictor's brief exclusive lock). Raises FileNotFoundError
        if the entry is absent, or was renamed away by an evictor while this process waited. Where
        the directory cannot be opened or locked (no ``flock``, out of file descriptors), returns a
        hold that holds nothing: the lookup goes on, unprotected, with one warning."""
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0))
        except (FileNotFoundError, NotADirectoryError):
            raise
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise NotADirectoryError(e.errno, "entry is a symbolic link", str(path)) from None
            _cannot_hold(path, e)
            return cls(None)
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_SH)
        except (ImportError, OSError) as e:
            os.close(fd)
            _cannot_hold(path, e)
            return cls(None)
        try:
            st, now = os.fstat(fd), os.lstat(path)
        except OSError:
            st = now = None
        if st is None or (st.st_ino, st.st_dev) != (now.st_ino, now.st_dev):  # evicted while we waited
            os.close(fd)
            raise FileNotFoundError(errno.ENOENT, "entry was removed while waiting for its lock", str(path))
        return cls(fd)

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def __del__(self):
        self.release()

    def __reduce__(self):  # a copy (pickled to another process, deep-copied) holds nothing: fds are per process
        return (EntryHold, (None,))


def _cannot_hold(path: Path, e: OSError) -> None:
    warn_once(("entry-hold", e.errno), "jitkern: cannot lock cache entries in %s (%s); entries in use are not "
              "protected from eviction by other processes (only their last-use stamps are)",
              Path(path).parent.parent, e)
