"""A compiler's ``--version`` text (part of a C++ variant's key), remembered across processes.

Keys of C++ variants (``jitkern.builders.cpp``, ``jitkern.builders.hip``) hold the toolchain's
``--version`` output, so a process that plans a CUDA kernel needs it even when the kernel is in the
cache. Running ``nvcc --version`` costs tens of milliseconds (10-90 ms on a 2-core machine), once per
process. The answer is therefore kept in the user's writable cache layer::

    <layer>/v<N>/toolchains/<id[:2]>/<id>.json   {"path", "mtime_ns", "size", "ino", "dev", "runs", "version"}

``id`` is the SHA-256 of the tool's real path, ``st_mtime_ns`` and ``st_size``; the record holds
``st_ino`` and ``st_dev`` too, and in the writable layer all five must match: a rebuilt, replaced or
touched binary is asked again. A small ``#!``
wrapper script (``/usr/local/bin/nvcc`` holding ``exec /usr/local/cuda-13.0/bin/nvcc "$@"``) adds the
same figures of every existing file it names by absolute path (``runs``), so an upgrade behind an
unchanged wrapper is seen too; a wrapper that finds its compiler some other way (``$PATH``, a
variable) is only re-asked when the wrapper itself changes. The record is
held to the rules of the layer's ``entries/`` and ``index/`` (``toolchains/`` is one of
``jitkern.cache``'s private subdirectories: ``Layer.check_secure``), written with
``cache.write_private`` (0600, atomic rename) and read with ``cache.read_private`` (refused if the
file or its directory is a link, or could be written by another user). A record that is refused,
unreadable, corrupt or about another file is ignored and the tool is run. Read-only layers (a
prebuilt layer shipped in an image: ``prebuild`` records the versions it asked for in the layer it
builds) are read after the writable one and never written; their records were made on another
machine or in another container, where the same binary has other inode and device numbers, so
there the path, mtime and size (and those of a wrapper's targets) must match, which is what an
image copy keeps. So a process over a read-only prebuilt layer alone starts no compiler either.
No cache is created
for a record (``Store.existing_write_layer``): a version asked for before the layer exists is
recorded by a later call of the same process once it does (a build creates it), or at its exit. Counters: a real run is
``toolchain_queries``, a record used is ``toolchain_cache_hits`` (``jitkern.stats()``).
"""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import re
import stat
import subprocess

from . import counters, state
from .cache import default_store, read_private, write_private
from .logs import log

SUBDIR = "toolchains"

#: (realpath, mtime_ns, size, ino, dev, runs) -> version text, for this process
_memo: dict[tuple, str] = {}
#: identities run in this process but not recorded yet (the cache layer did not exist then)
_pending: set[tuple] = set()


@state.on_reset
def _forget() -> None:
    _memo.clear()
    _pending.clear()


def tool_version(path: str | None) -> str | None:
    """``path --version`` (stdout and stderr, stripped), or None if there is no such file; from
    this process's memory, else the cache layer's record, else by running the tool."""
    if not path:
        return None
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
    except OSError:
        return None
    ident = (real, st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev, _script_targets(real, st))
    text = _memo.get(ident)
    if text is None:
        text = _recorded(ident)
        if text is None:
            text = _run(real)
            _pending.add(ident)
        _memo[ident] = text
    if ident in _pending and _record(ident, text):
        _pending.discard(ident)
    if _pending and not _flush_registered:
        _register_flush()
    return text


_flush_registered = False


def _register_flush() -> None:
    """Record at exit what is still pending (a process that plans, then builds: the build made the layer)."""
    global _flush_registered
    _flush_registered = True
    atexit.register(flush)


def flush() -> None:
    """Record every version asked for in this process and not recorded yet, where the layer now exists."""
    for ident in list(_pending):
        if _record(ident, _memo.get(ident, "unrunnable: ")):
            _pending.discard(ident)


def _run(path: str) -> str:
    counters.bump("toolchain_queries")
    try:
        r = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
        return (r.stdout + r.stderr).strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"unrunnable: {e}"


#: Largest wrapper script whose targets are looked for (a compiler binary is far larger and not a script).
_SCRIPT_MAX = 64 * 1024
_ABS_PATH = re.compile(r"""(?<![\w.$])(/[^\s"'`;|&<>()$]+)""")


def _script_targets(real: str, st: os.stat_result) -> tuple:
    """For a small ``#!`` wrapper (``exec /usr/local/cuda-13.0/bin/nvcc "$@"``): the identity of
    every existing file it names by absolute path, so that upgrading what the wrapper runs is seen
    although the wrapper itself is unchanged. Empty for a binary."""
    if st.st_size > _SCRIPT_MAX:
        return ()
    try:
        with open(real, "rb") as f:
            head = f.read(_SCRIPT_MAX)
    except OSError:
        return ()
    if not head.startswith(b"#!"):
        return ()
    out = []
    for p in sorted(set(_ABS_PATH.findall(head.decode("utf-8", "replace"))))[:32]:
        try:
            t = os.stat(p)
        except (OSError, ValueError):
            continue
        if stat.S_ISREG(t.st_mode):
            out.append((os.path.realpath(p), t.st_mtime_ns, t.st_size, t.st_ino, t.st_dev))
    return tuple(out)


def _fields(ident: tuple) -> dict:
    """The record's identity fields, as JSON gives them back (tuples as lists)."""
    return json.loads(json.dumps(dict(zip(("path", "mtime_ns", "size", "ino", "dev", "runs"), ident))))


def _portable(ident: tuple) -> tuple:
    """The part of ``ident`` an image copy keeps: path, mtime_ns and size (a wrapper's targets too),
    not the inode and device numbers."""
    real, mtime_ns, size, _ino, _dev, targets = ident
    return real, mtime_ns, size, tuple(t[:3] for t in targets)


def record_path(layer, ident: tuple):
    """Where ``layer`` keeps the record of the tool ``ident`` (realpath, mtime_ns, size, ino, dev, runs)."""
    h = hashlib.sha256(json.dumps(list(_portable(ident))).encode()).hexdigest()
    return layer.root / SUBDIR / h[:2] / f"{h}.json"


def _layer():
    """The user's writable layer (the one new entries go to) if it exists; None (and nothing
    created) before the first entry or plan-index record makes it, so ``jitkern doctor`` creates no
    cache. A version asked for before then is recorded by the next call once the layer exists."""
    try:
        return default_store().existing_write_layer()
    except Exception as e:  # a bad JITKERN_CACHE_DIR etc.: the version is never worth failing a plan for
        log.debug("jitkern: no cache layer for toolchain versions: %s", e)
        return None


def _read_only_layers(writable) -> list:
    """The configured layers other than the writable one that exist (nothing is created)."""
    try:
        layers = default_store().layers
    except Exception as e:  # a bad JITKERN_CACHE_DIR: never worth failing a plan for
        log.debug("jitkern: no cache layers for toolchain versions: %s", e)
        return []
    return [layer for layer in layers if layer is not writable and layer.root.is_dir()]


def _recorded(ident: tuple) -> str | None:
    """The version text recorded for ``ident``: the writable layer's record if all of the identity
    matches, else the first read-only layer's whose portable part does (see the module doc)."""
    writable = _layer()
    want = _fields(ident)
    real, mtime_ns, size, targets = _portable(ident)
    portable = json.loads(json.dumps({"path": real, "mtime_ns": mtime_ns, "size": size, "runs": targets}))
    for layer in ([writable] if writable is not None else []) + _read_only_layers(writable):
        path = record_path(layer, ident)
        try:
            layer.ensure_secure()
            rec = json.loads(read_private(path))
            if not isinstance(rec, dict):
                raise ValueError("not a record")
            if layer is writable:
                same = {k: rec.get(k) for k in want} == want
            else:
                runs = rec.get("runs")
                got = {**{k: rec.get(k) for k in ("path", "mtime_ns", "size")},
                       "runs": [r[:3] for r in runs] if isinstance(runs, list) and
                       all(isinstance(r, list) for r in runs) else runs}
                same = got == portable
            if not same:
                raise ValueError("the record is about another file")
            text = rec["version"]
            if not isinstance(text, str):
                raise ValueError("no version text")
        except (OSError, ValueError, KeyError, TypeError) as e:  # CorruptEntryError/InsecureCacheError too
            if not isinstance(e, FileNotFoundError):
                log.debug("jitkern: toolchain record %s not used (%s)", path, e)
            continue
        counters.bump("toolchain_cache_hits")
        return text
    return None


def _record(ident: tuple, text: str) -> bool:
    """Remember ``text`` in the writable layer; False: not now (no layer yet), try on the next call.
    Best effort: a failure only costs the next process a run."""
    if text.startswith("unrunnable: "):
        return True  # maybe a transient failure: never recorded, asked again by the next process
    layer = _layer()
    if layer is None:
        return False
    path = record_path(layer, ident)
    try:
        layer.check_secure()
        write_private(path, json.dumps({**_fields(ident), "version": text}).encode())
    except (OSError, ValueError) as e:  # InsecureCacheError: never write into a layer others can change
        log.debug("jitkern: could not record toolchain version in %s: %s", path, e)
    return True
