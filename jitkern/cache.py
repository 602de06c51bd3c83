"""The content-addressed on-disk cache.

Layout of one layer (a directory)::

    <layer>/v<FORMAT_VERSION>/
        entries/<key[:2]>/<key>/      one immutable entry per key
            entry.json                what was built: op, variant, arch, params, key parts, figures
            kernel.py                 the rendered source (tracebacks and ``inspect`` point here)
            kernel.cubin|.hsaco       the binary (GPU arches)
            metadata.json             Triton's kernel metadata
            manifest.json             size and SHA-256 of every other file, written last
        locks/<key>.lock              per-key build locks (filelock)
        tmp/                          entries being written; renamed into entries/ when complete

``JITKERN_CACHE_DIR`` holds one or more layers separated by ``os.pathsep``; the default is the
platform's user cache dir (``platformdirs``). Lookups read every layer in order; new entries go to the
first writable layer. An entry is published by renaming a complete temporary directory, so a reader
sees all of it or nothing, and is verified against its manifest before every load: a damaged entry
is discarded (writable layers) or skipped (read-only layers) with one warning, and rebuilt.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from . import counters
from .errors import CacheError, CorruptEntryError
from .key import FORMAT_VERSION
from .logs import log, warn_once

MANIFEST = "manifest.json"
ENTRY_META = "entry.json"
_KEY_CHARS = set("0123456789abcdef")


def default_root() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("jitkern", appauthor=False))


def configured_layers(cache_dir: str | os.PathLike | None = None) -> list[Path]:
    """Layers from the argument, else ``JITKERN_CACHE_DIR``, else the platform default."""
    raw = os.fspath(cache_dir) if cache_dir is not None else os.environ.get("JITKERN_CACHE_DIR", "")
    layers = [Path(p).expanduser() for p in raw.split(os.pathsep) if p.strip()]
    return layers or [default_root()]


def _check_key(key: str) -> str:
    if len(key) != 64 or not set(key) <= _KEY_CHARS:
        raise CacheError(f"malformed cache key {key!r}: expected 64 lowercase hex digits")
    return key


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextlib.contextmanager
def entry_lock(path: Path, exclusive: bool = False, blocking: bool = True):
    """Hold an advisory lock on an entry directory itself (no lock file): shared while a process loads
    the entry, exclusive while ``jitkern cache prune`` removes it. Yields True if the lock is held,
    False if ``blocking=False`` and another process holds it, and True without locking where the
    platform or filesystem has no ``flock``. Raises FileNotFoundError if the entry is absent."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
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


@dataclass(frozen=True)
class Entry:
    """A verified, published cache entry."""

    key: str
    path: Path
    meta: Mapping[str, Any]

    def file(self, name: str) -> Path:
        return self.path / name


class Layer:
    """One cache directory."""

    def __init__(self, root: Path):
        self.base = Path(root)
        self.root = self.base / f"v{FORMAT_VERSION}"

    def __repr__(self):
        return f"Layer({str(self.base)!r})"

    def entry_dir(self, key: str) -> Path:
        return self.root / "entries" / key[:2] / _check_key(key)

    def writable(self) -> bool:
        """True if entries can be created here (creates the layer if it is missing)."""
        try:
            for sub in ("entries", "locks", "tmp"):
                (self.root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError:
            return False
        return os.access(self.root / "tmp", os.W_OK | os.X_OK) and os.access(self.root / "entries", os.W_OK | os.X_OK)

    # ---- read ----------------------------------------------------------------------------------
    def verify(self, key: str) -> Entry:
        """Check an entry against its manifest; raise ``CorruptEntryError`` (or FileNotFoundError)."""
        path = self.entry_dir(key)
        if not path.is_dir():
            raise FileNotFoundError(path)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            files = manifest["files"]
            if manifest.get("key") != key:
                raise CorruptEntryError(f"manifest of {path} names key {manifest.get('key')!r}")
            for name, want in files.items():
                if "/" in name or name.startswith("."):
                    raise CorruptEntryError(f"manifest of {path} names an unsafe file {name!r}")
                f = path / name
                if f.is_symlink():
                    raise CorruptEntryError(f"{f} is a symbolic link")
                data = f.read_bytes()
                if len(data) != want["size"] or hashlib.sha256(data).hexdigest() != want["sha256"]:
                    raise CorruptEntryError(f"{f} does not match its checksum")
            meta = json.loads((path / ENTRY_META).read_text()) if ENTRY_META in files else {}
        except FileNotFoundError as e:
            if not (path / MANIFEST).exists() and not path.exists():
                raise
            raise CorruptEntryError(f"entry {path} is missing {Path(e.filename).name}") from None
        except (ValueError, KeyError, TypeError) as e:  # JSON damage, missing fields
            raise CorruptEntryError(f"entry {path} has an unreadable manifest or metadata: {e}") from None
        if meta.get("key", key) != key:
            raise CorruptEntryError(f"entry {path} holds metadata for key {meta.get('key')!r}")
        return Entry(key, path, meta)

    def discard(self, key: str) -> None:
        """Remove an entry atomically: rename it out of ``entries/`` then delete it."""
        path = self.entry_dir(key)
        grave = self.root / "tmp" / f"discard-{key}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, grave)
        except FileNotFoundError:
            return
        shutil.rmtree(grave, ignore_errors=True)

    # ---- write ---------------------------------------------------------------------------------
    def publish(self, key: str, files: Mapping[str, bytes], meta: Mapping[str, Any]) -> Entry:
        """Write an entry atomically. If another process published the key first, keep theirs."""
        final = self.entry_dir(key)
        tmp = self.root / "tmp" / f"{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True, mode=0o700)
        try:
            all_files = dict(files)
            all_files[ENTRY_META] = json.dumps({**meta, "key": key}, indent=1, sort_keys=True, default=str).encode()
            manifest = {"key": key, "format": FORMAT_VERSION, "files": {}}
            for name, data in all_files.items():
                _write(tmp / name, data)
                manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            _write(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
            final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            try:
                os.rename(tmp, final)
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                log.debug("entry %s was published by another process; keeping theirs", key[:16])
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return self.verify(key)

    def lock(self, key: str, timeout: float = -1):
        import filelock

        return filelock.FileLock(str(self.root / "locks" / f"{_check_key(key)}.lock"), timeout=timeout)


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class Store:
    """All configured layers: read from each in order, write to the first writable one."""

    def __init__(self, layers: list[Path] | None = None):
        self.layers = [Layer(p) for p in (layers or configured_layers())]
        self._writable: Layer | None | bool = False  # False: not determined yet

    def __repr__(self):
        return f"Store({[str(layer.base) for layer in self.layers]})"

    def _find_write_layer(self) -> Layer | None:
        if self._writable is False:
            self._writable = next((layer for layer in self.layers if layer.writable()), None)
        return self._writable

    @property
    def write_layer(self) -> Layer | None:
        if self._writable is False:
            if self._find_write_layer() is None:
                warn_once(("no-writable-layer", tuple(map(str, self.layers))),
                          "no writable jitkern cache layer among %s; kernels will be built in memory "
                          "for this process only (set JITKERN_CACHE_DIR to a writable directory)",
                          [str(layer.base) for layer in self.layers])
        return self._writable

    def lookup(self, key: str) -> Entry | None:
        """A verified entry for ``key`` from the first layer that has a sound one, else None."""
        for layer in self.layers:
            try:
                if layer is not self._find_write_layer():  # read-only layers: read as they are
                    return layer.verify(key)
                # Write layer: a shared lock while verifying and a last-use stamp (the entry's mtime),
                # so that ``jitkern cache prune`` (LRU) never removes an entry being loaded.
                path = layer.entry_dir(key)
                with entry_lock(path):
                    with contextlib.suppress(OSError):
                        os.utime(path)
                    return layer.verify(key)
            except FileNotFoundError:
                continue
            except CorruptEntryError as e:
                counters.bump("corrupt_discarded")
                writable = layer is self.write_layer
                warn_once(("corrupt", key), "jitkern cache entry %s is damaged (%s); %s", key[:16], e,
                          "discarding it and rebuilding" if writable else "skipping it (read-only layer)")
                if writable:
                    layer.discard(key)
        return None

    def publish(self, key: str, files: Mapping[str, bytes], meta: Mapping[str, Any]) -> Entry:
        layer = self.write_layer
        if layer is None:
            raise CacheError(f"no writable cache layer in {self}")
        return layer.publish(key, files, meta)

    def lock(self, key: str, timeout: float = -1):
        layer = self.write_layer
        if layer is None:
            raise CacheError(f"no writable cache layer in {self}")
        return layer.lock(key, timeout)


_default: Store | None = None
_default_env: str | None = None


def default_store() -> Store:
    """The process-wide store for the current ``JITKERN_CACHE_DIR`` (re-read if it changes)."""
    global _default, _default_env
    env = os.environ.get("JITKERN_CACHE_DIR", "")
    if _default is None or env != _default_env:
        _default, _default_env = Store(), env
    return _default
