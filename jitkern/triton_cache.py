"""Triton's own cache directory, which ``triton.compile`` and Triton's launcher stub write to.

jitkern keeps its artifacts in its own cache, but Triton still writes ``~/.triton/cache`` (or
``TRITON_CACHE_DIR``) while compiling and when it builds the small C launcher of a kernel. On a
read-only or full home directory that would fail a build or a load that jitkern could otherwise
serve, so before the first build or GPU load of a process, ``ensure_writable()`` checks the
directory and, if it cannot be written, points ``TRITON_CACHE_DIR`` at a private temporary
directory for this process (one warning). ``TRITON_CACHE_DIR`` is not part of any key: it says where
Triton keeps files, not what it generates.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading

from .cache import write_probe
from .logs import warn_once

_done = False
_lock = threading.Lock()


def default_dir() -> str:
    """Where Triton 3.x puts its cache: ``TRITON_CACHE_DIR``, else ``$TRITON_HOME/.triton/cache``."""
    explicit = os.environ.get("TRITON_CACHE_DIR", "").strip()
    if explicit:
        return explicit
    home = os.environ.get("TRITON_HOME", "").strip() or os.path.expanduser("~")
    return os.path.join(home, ".triton", "cache")


def _can_write(d: str) -> bool:
    """Real bytes, synced: an empty probe file is created on a full disk too (``cache.write_probe``)."""
    return write_probe(d) is None


def ensure_writable() -> str:
    """Return the directory Triton will use, redirected to a private temp dir if the usual one is
    unwritable. Checked once per process (and again if ``TRITON_CACHE_DIR`` is changed)."""
    global _done
    with _lock:
        d = default_dir()
        if _done == d:
            return d
        if not _can_write(d):
            try:
                new = tempfile.mkdtemp(prefix="jitkern-triton-cache-")
            except OSError as e:
                warn_once(("triton-cache", d), "jitkern: Triton's cache directory %s cannot be written and no "
                          "temporary directory could be made (%s); Triton compiles may fail. Set TRITON_CACHE_DIR "
                          "to a writable directory", d, e)
                _done = d
                return d
            atexit.register(shutil.rmtree, new, True)
            os.environ["TRITON_CACHE_DIR"] = new
            warn_once(("triton-cache", d), "jitkern: Triton's cache directory %s cannot be written; using %s for "
                      "this process (set TRITON_CACHE_DIR to a writable directory to keep Triton's files)", d, new)
            d = new
        _done = d
        return d
