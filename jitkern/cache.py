"""The content-addressed on-disk cache.

Layout of one layer (a directory)::

    <layer>/v<FORMAT_VERSION>/
        entries/<key[:2]>/<key>/      one immutable entry per key
            entry.json                what was built: op, variant, arch, params, key parts, figures
            kernel.py                 the rendered source (tracebacks and ``inspect`` point here)
            kernel.cubin|.hsaco       the binary (GPU arches)
            metadata.json             Triton's kernel metadata
            manifest.json             size and SHA-256 of every other file, written last
        index/<ih[:2]>/<ih>.json      plan-index records: the source a (spec, config, arch) renders to
        toolchains/<id[:2]>/<id>.json a compiler's --version text, per binary (``jitkern.toolversions``)
        locks/<key>.lock              per-key build locks (filelock)
        tmp/                          entries being written; renamed into entries/ when complete

``JITKERN_CACHE_DIR`` holds one or more layers separated by ``os.pathsep``; the default is the
platform's user cache dir (``platformdirs``). Lookups read every layer in order; new entries go to the
first writable layer. An entry is published by renaming a complete temporary directory, so a reader
sees all of it or nothing, and is verified against its manifest before every load: a damaged entry
is discarded (writable layers) or skipped (read-only layers) with one warning, and rebuilt.

Safety (a loaded binary runs with the user's rights):

- directories jitkern creates are private (0700) and its files 0600, whatever the umask;
- a layer whose directories someone else can write (world-writable, writable by a group other than
  the user's own, or owned by another user than the user or root) is refused with
  ``InsecureCacheError``, which says how to fix it: the layer, ``v<N>/`` and ``entries/``,
  ``index/``, ``toolchains/``, ``locks/``, ``tmp/`` alike (``check_secure``);
- what a loader trusts is the entry's manifest-covered bytes, compared with the job
  (``build.check_entry``: op, variant, arch, kernel name, params, the stored source); an entry holding
  a file its manifest does not cover is damaged; CPU kernels run from the verified bytes, never
  imported by path; a plan-index record's source is used only for a key a layer holds an entry for;
- nothing is followed out of a layer: ``v<N>/``, ``entries/`` and ``entries/<xx>/`` must be real
  directories (a symlink there is refused), and an entry that is a symlink, or holds one, or whose
  manifest names a path, is treated as damaged;
- temporary directories left by processes that died while publishing are removed by the next
  process that writes to the layer (``clean_stale``).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import sys
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from . import counters, dists, evict, settings, signing, state
from .errors import CacheError, ConfigError, CorruptEntryError, InsecureCacheError, SignatureError
from .key import FORMAT_VERSION, differing
from .locks import EntryHold
from .logs import log, warn_once
from .locks import BuildLock

MANIFEST = "manifest.json"
ENTRY_META = "entry.json"
_KEY_CHARS = set("0123456789abcdef")


def default_root() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("jitkern", appauthor=False))


def configured_layers(cache_dir: str | os.PathLike | None = None) -> list[Path]:
    """Layers from the argument, else ``JITKERN_CACHE_DIR`` (``jitkern.settings``), else the platform
    default. An empty argument or variable is a ``ConfigError``, never the default cache (it is most
    likely an unset shell variable, and acting on the default cache could destroy data)."""
    if cache_dir is None:
        parts = settings.get("cache_dir")
    else:
        raw = os.fspath(cache_dir)
        if not raw.strip():
            raise ConfigError(f"the cache directory given is empty ({raw!r}: an unset shell variable?); "
                              f"name a directory, or leave the option out to use JITKERN_CACHE_DIR or the default")
        parts = settings.setting("cache_dir").parse(raw, "cache dir")
    layers = [Path(p).expanduser().absolute() for p in parts or ()]
    return layers or [default_root()]


def make_private_dirs(path: Path) -> None:
    """``mkdir -p`` with mode 0700 for every directory created (``Path.mkdir(parents=True)`` would
    give the parents it creates the umask's mode, which may be group- or world-writable)."""
    path = Path(path)
    missing = []
    while not path.is_dir():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            if not d.is_dir():
                raise
            continue
        os.chmod(d, 0o700)  # mkdir's mode is masked by the umask; 0700 is what we want regardless


def others_can_write(st: os.stat_result) -> str | None:
    """Why a file or directory with this ``stat`` could be changed by another user (None if not)."""
    mode = st.st_mode
    if stat.S_ISDIR(mode) and mode & stat.S_ISVTX and mode & stat.S_IWOTH and st.st_uid in (os.getuid(), 0):
        mode &= ~stat.S_IWOTH  # sticky: others may add names but not replace ours (checked one level down)
    if mode & stat.S_IWOTH:
        return f"it is world-writable (mode {stat.S_IMODE(st.st_mode):04o})"
    if mode & stat.S_IWGRP and st.st_gid != os.getgid():
        return f"it is writable by group {st.st_gid} (mode {stat.S_IMODE(st.st_mode):04o})"
    if st.st_uid not in (os.getuid(), 0):
        return f"it is owned by user {st.st_uid}"
    return None


PROBE_BYTES = 64 * 1024


def write_probe(directory: str | os.PathLike, nbytes: int = PROBE_BYTES) -> str | None:
    """Why ``directory`` cannot take a file of ``nbytes`` real bytes right now (None: it can).

    Writes, syncs and closes a private temporary file, then removes it: creating an empty file
    succeeds on a full disk, so only real bytes (and the sync, where the filesystem allocates late)
    show ENOSPC or a quota."""
    path = None
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        path = os.path.join(directory, f".jitkern-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            view = memoryview(b"\0" * nbytes)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        return None
    except OSError as e:
        return f"{e.strerror or e} ({type(e).__name__}, errno {e.errno})"
    finally:
        if path is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def _check_key(key: str) -> str:
    if not isinstance(key, str) or len(key) != 64 or not set(key) <= _KEY_CHARS:
        raise CacheError(f"malformed cache key {key!r}: expected 64 lowercase hex digits")
    return key


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class Entry:
    """A verified, published cache entry."""

    key: str
    path: Path
    meta: Mapping[str, Any]
    #: The files' contents as checked against the manifest when the entry was looked up, so a loader
    #: uses exactly the bytes that were verified, without reading them again.
    verified: Mapping[str, bytes] = field(default_factory=dict, repr=False, compare=False)
    #: The shared lock that marks the entry in use while this object lives (writable layer only; see
    #: ``jitkern.evict``): eviction by any process skips it.
    hold: Any = field(default=None, repr=False, compare=False)
    #: The manifest's bytes as verified (what an entry signature covers).
    manifest: bytes = field(default=b"", repr=False, compare=False)

    def file(self, name: str) -> Path:
        return self.path / name

    def read_bytes(self, name: str) -> bytes:
        data = self.verified.get(name)
        return (self.path / name).read_bytes() if data is None else data


#: Directories of a layer held to the ownership and mode rules of ``entries/`` (``Layer.check_secure``).
_PRIVATE_SUBDIRS = ("entries", "index", "toolchains", "locks", "tmp")


def private_path(path: Path) -> str | None:
    """Why ``path`` (a directory or file inside a layer) could have been changed by another user or
    leads out of the layer (None: it could not): a symbolic link, or others could write it."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return "it is a symbolic link"
    return others_can_write(st)


def write_private(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically with a new 0600 file (its directories created 0700), whatever the
    umask; never written through an existing name or link. For small records next to entries (the
    plan index), which must be as private as the entries."""
    path = Path(path)
    make_private_dirs(path.parent)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with open(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_private(path: Path) -> bytes:
    """The bytes of a record inside a layer (e.g. a plan-index record), or ``CorruptEntryError`` if it
    or its directory could have been changed by another user, or is a link (``OSError`` if absent).
    ``Layer.check_secure`` covers the directories above it."""
    parent = os.path.dirname(os.fspath(path))
    why = private_path(parent)
    if why:
        raise CorruptEntryError(f"{parent} could be changed by another user or leads out of the cache "
                                f"({why})")
    return _read(path)


#: Temporary directories of ``publish``: ``<key>.<pid>.<host>.<random>``.
_PUBLISH_TMP = re.compile(r"^[0-9a-f]{64}\.(\d+)\.([A-Za-z0-9-]+)\.[0-9a-f]+$")
#: Directories being deleted (entries renamed out of ``entries/``): removable at any time.
_GRAVE_PREFIXES = ("discard-", "prune-")
#: Other temporary names with a pid: removed once the pid is dead and the directory is this old.
_OTHER_TMP = re.compile(r"^(?:import|layer)-(\d+)-[0-9a-f]+(?:\.json)?$")
STALE_SECONDS = 3600.0
_cleaned: set = set()
_checks_generation = 0  # bumped by forget_checks: every Layer.ensure_secure checks in full again


def _identity(st: os.stat_result) -> tuple:
    return st.st_dev, st.st_ino, st.st_mode, st.st_uid, st.st_gid


def forget_checks() -> None:
    """Make every layer's next lookup run the full ownership and mode check again (``ensure_secure``)."""
    global _checks_generation
    _checks_generation += 1


class Layer:
    """One cache directory. ``installed_from``: the distribution that installed it (a cache wheel,
    ``jitkern.cache_layers`` entry point); such a layer is only ever read."""

    def __init__(self, root: Path, installed_from: str | None = None):
        self.base = Path(root)
        self.root = self.base / f"v{FORMAT_VERSION}"
        self.installed_from = installed_from
        # the same as strings, for the lookups every first call makes (no pathlib objects there)
        self._root_s = os.fspath(self.root)
        self._entries_s = os.path.join(self._root_s, "entries")
        self._secure_dirs = (os.fspath(self.base), self._root_s,
                             *(os.path.join(self._root_s, sub) for sub in _PRIVATE_SUBDIRS))
        self._secure_seen = None  # (generation, identity of the layer directory) once ensure_secure passed
        self._shards_seen: tuple = (-1, set())  # (generation, entries/<xx> names found real and private)

    def __repr__(self):
        return f"Layer({str(self.base)!r})"

    def entry_dir(self, key: str) -> Path:
        key = _check_key(key)
        return self.root / "entries" / key[:2] / key

    def writable(self) -> bool:
        """True if entries can be created here (creates the layer, private to the user, if it is missing)."""
        if self.installed_from is not None:
            return False
        try:
            for sub in ("entries", "locks", "tmp"):
                make_private_dirs(self.root / sub)
        except OSError:
            return False
        ok = os.access(self.root / "tmp", os.W_OK | os.X_OK) and os.access(self.root / "entries", os.W_OK | os.X_OK)
        if ok:
            self.clean_stale()
        return ok

    # ---- safety ----------------------------------------------------------------------------------
    def check_secure(self) -> None:
        """Raise ``InsecureCacheError`` if another user could change what this layer loads.

        Checks the layer directory, ``v<N>/`` and the directories under it that jitkern reads or
        writes through: ``entries/``, ``index/`` (plan-index records hand source to the planner),
        ``toolchains/`` (compiler versions that go into keys),
        ``locks/`` (a planted link there would be opened and truncated) and ``tmp/`` (entries are
        written there before the rename): the same ownership and mode rule for all, one ``lstat``
        each. Lookups ask ``ensure_secure``, which runs this once per process and layer."""
        self._check_secure()

    def ensure_secure(self) -> None:
        """``check_secure``, once for this layer object while the layer directory stays the same
        directory with the same owner and mode (one ``stat`` per call after the first). Sound against
        other users: once the layer, ``v<N>/`` and its subdirectories are owned by the user (or root)
        and writable by no one else, only the user or root can change that (a missing subdirectory can
        only be made by someone who can write ``v<N>/``). Checked in full again after
        ``jitkern.reset()`` or ``jitkern.runtime.clear_memory()`` (``forget_checks``), which tests
        that change modes in between rely on. Lookups happen once per kernel and process, twice
        with the plan index: on a warm start this was 14 ``lstat`` calls a kernel."""
        seen = self._secure_seen
        if seen is not None and seen[0] == _checks_generation:
            try:
                st = os.stat(self._secure_dirs[0])
            except OSError:
                st = None
            if st is not None and _identity(st) == seen[1]:
                return
        st = self._check_secure()
        self._secure_seen = None if st is None else (_checks_generation, _identity(st))
        self._shards_seen = (_checks_generation, set())

    def _check_secure(self):
        """``check_secure``; returns the layer directory's ``stat`` if the layer and ``v<N>/`` exist
        (None: nothing can be loaded from it yet, so nothing is remembered)."""
        base = None
        for i, d in enumerate(self._secure_dirs):
            try:
                st = os.lstat(d) if i else os.stat(d)
            except (FileNotFoundError, NotADirectoryError):
                if i < 2:  # the layer or v<N>/
                    return None  # nothing below a missing directory (or a file) can be loaded
                continue
            except OSError as e:
                raise InsecureCacheError(f"cannot inspect jitkern cache directory {d}: {e}") from None
            if stat.S_ISLNK(st.st_mode):
                raise InsecureCacheError(
                    f"jitkern cache directory {d} is a symbolic link; jitkern does not follow links inside a cache "
                    f"layer. Replace it with a real directory, or point JITKERN_CACHE_DIR at the link's target")
            why = others_can_write(st)
            if why:
                raise InsecureCacheError(
                    f"refusing to load kernels from the jitkern cache at {self.base}: {d} could be changed by another "
                    f"user ({why}), and a loaded kernel runs with your rights. Fix: 'chmod -R go-w {self.base}' "
                    f"(and chown it to yourself), or set JITKERN_CACHE_DIR to a directory only you can write")
            if i == 0:
                base = st
        return base

    def _check_parents(self, key: str) -> None:
        """``entries/<xx>/`` must be a real, private directory (``check_secure`` covers those above).
        Once found so, remembered with ``ensure_secure``'s check (only the user can change it then)."""
        shard = key[:2]
        seen = self._shards_seen
        if seen[0] == _checks_generation and shard in seen[1]:
            return
        d = os.path.join(self._entries_s, shard)
        try:
            st = os.lstat(d)
        except (FileNotFoundError, NotADirectoryError):
            return
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            raise InsecureCacheError(f"jitkern cache directory {d} is not a real directory (a link or a file); "
                                     f"remove it (rm {d}) and jitkern will rebuild what it held")
        why = others_can_write(st)
        if why:
            raise InsecureCacheError(f"refusing to load from {d}: another user could change it ({why}). "
                                     f"Fix: chmod go-w {d}")
        if seen[0] == _checks_generation and self._secure_seen is not None:  # the layer above was found sound
            seen[1].add(shard)

    def clean_stale(self, force: bool = False) -> list[str]:
        """Remove temporary directories of dead processes from ``tmp/`` (once per process and layer
        unless ``force``); return the names removed. Only this host's dead pids are trusted, since a
        layer on a shared filesystem is written by other hosts too."""
        if not force and self.root in _cleaned:
            return []
        _cleaned.add(self.root)
        removed = []
        here = _host_tag()
        try:
            names = os.listdir(self.root / "tmp")
        except OSError:
            return removed
        now = time.time()
        for name in names:
            path = self.root / "tmp" / name
            stale = name.startswith(_GRAVE_PREFIXES)
            m = _PUBLISH_TMP.match(name)
            if m:
                stale = m.group(2) == here and not _pid_alive(int(m.group(1)))
            m = _OTHER_TMP.match(name)
            if m and not _pid_alive(int(m.group(1))):
                try:
                    stale = now - os.lstat(path).st_mtime > STALE_SECONDS
                except OSError:
                    stale = False
            if stale:
                _remove(path)
                removed.append(name)
        if removed:
            log.info("jitkern: removed %d temporary director%s left in %s by processes that died",
                     len(removed), "y" if len(removed) == 1 else "ies", self.root / "tmp")
        return removed

    # ---- read ----------------------------------------------------------------------------------
    def verify(self, key: str) -> Entry:
        """Check an entry against its manifest; raise ``CorruptEntryError`` (or FileNotFoundError)."""
        _check_key(key)
        self.ensure_secure()
        self._check_parents(key)
        return self._verify(key)

    def _verify(self, key: str) -> Entry:
        """``verify`` once ``check_secure`` and ``_check_parents`` have passed (``open`` runs them)."""
        path = os.path.join(self._entries_s, key[:2], key)  # a string: error texts read the same as a Path's
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise
        except NotADirectoryError:
            raise CorruptEntryError(f"entry {path} sits under a file, not a directory") from None
        if stat.S_ISLNK(st.st_mode):
            raise CorruptEntryError(f"entry {path} is a symbolic link; entries are never followed out of the cache")
        if not stat.S_ISDIR(st.st_mode):
            raise CorruptEntryError(f"entry {path} is not a directory")
        why = others_can_write(st)
        if why:
            raise CorruptEntryError(f"entry {path} could be changed by another user ({why})")
        try:
            raw_manifest = _read(os.path.join(path, MANIFEST))
            manifest = json.loads(raw_manifest)
            files = manifest["files"]
            if manifest.get("key") != key:
                raise CorruptEntryError(f"manifest of {path} names key {manifest.get('key')!r}")
            verified = {}
            for name, want in files.items():
                if not _safe_name(name):
                    raise CorruptEntryError(f"manifest of {path} names an unsafe file {name!r}")
                data = _read(os.path.join(path, name))
                if len(data) != want["size"] or hashlib.sha256(data).hexdigest() != want["sha256"]:
                    raise CorruptEntryError(f"{os.path.join(path, name)} does not match its checksum")
                verified[name] = data
            meta = json.loads(verified.get(ENTRY_META, b"{}"))
            if not isinstance(meta, dict):
                raise TypeError(f"{ENTRY_META} holds a {type(meta).__name__}, not an object")
            # Nothing outside the manifest belongs in an entry. __pycache__ is let be: pip byte-compiles the
            # kernel.py files of a cache installed as a wheel, and jitkern never reads one (CPU kernels run
            # from the verified bytes, jitkern.builders.triton.module_from_source), so a planted .pyc is inert.
            # The signature (jitkern.signing) covers the manifest, so it is checked on its own terms.
            extra = sorted(set(os.listdir(path)) - set(files) - {MANIFEST, signing.ENTRY_SIGNATURE, "__pycache__"})
            if extra:
                raise CorruptEntryError(f"entry {path} holds {', '.join(extra)}, which its manifest does not cover")
        except FileNotFoundError as e:
            if not os.path.lexists(path):
                raise
            raise CorruptEntryError(f"entry {path} is missing {Path(e.filename or '?').name}") from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSON damage, missing fields
            raise CorruptEntryError(f"entry {path} has an unreadable manifest or metadata: {e}") from None
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENOTDIR, errno.ENXIO):
                raise CorruptEntryError(f"entry {path} holds a link or a non-file where a file belongs ({e})") from None
            raise
        if meta.get("key", key) != key:
            raise CorruptEntryError(f"entry {path} holds metadata for key {meta.get('key')!r}")
        return Entry(key, Path(path), meta, verified, manifest=raw_manifest)

    def check_signed(self, entry: Entry, public_keys) -> str:
        """The key id that signed ``entry`` (its ``signature.json`` over key + manifest); raises
        ``SignatureError`` if it is unsigned or not signed by one of ``public_keys``."""
        try:
            record = _read(entry.path / signing.ENTRY_SIGNATURE)
        except FileNotFoundError:
            record = None
        except OSError as e:
            raise SignatureError(f"cache entry {entry.path}: cannot read its signature ({e})") from None
        return signing.check_entry(public_keys, entry.key, entry.manifest, record, str(entry.path))

    def discard(self, key: str) -> None:
        """Remove an entry atomically: rename it out of ``entries/`` then delete it."""
        path = self.entry_dir(key)
        grave = self.root / "tmp" / f"discard-{key}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, grave)
        except FileNotFoundError:
            return
        _remove(grave)

    # ---- write ---------------------------------------------------------------------------------
    def publish(self, key: str, files: Mapping[str, bytes], meta: Mapping[str, Any]) -> Entry:
        """Write an entry atomically. If another process published the key first, keep theirs."""
        final = self.entry_dir(key)
        self.check_secure()
        for name in files:
            if not _safe_name(name) or name in (MANIFEST, ENTRY_META):
                raise CacheError(f"cannot publish a file named {name!r}: entry files are plain names, not paths, "
                                 f"and {MANIFEST}/{ENTRY_META} are jitkern's own")
        make_private_dirs(self.root / "tmp")
        tmp = self.root / "tmp" / f"{key}.{os.getpid()}.{_host_tag()}.{uuid.uuid4().hex[:8]}"
        tmp.mkdir(mode=0o700)
        try:
            all_files = dict(files)
            all_files[ENTRY_META] = json.dumps({**meta, "key": key}, indent=1, sort_keys=True, default=str).encode()
            manifest = {"key": key, "format": FORMAT_VERSION, "files": {}}
            for name, data in all_files.items():
                _write(tmp / name, data)
                manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            raw_manifest = json.dumps(manifest, indent=1, sort_keys=True).encode()
            _write(tmp / MANIFEST, raw_manifest)
            sign_key = signing.sign_key()  # JITKERN_CACHE_SIGN_KEY: entries made here can be shipped signed
            if sign_key is not None:
                _write(tmp / signing.ENTRY_SIGNATURE, signing.sign_entry(sign_key, key, raw_manifest))
            ours = False
            for attempt in range(3):
                make_private_dirs(final.parent)
                self._check_parents(key)
                try:
                    os.rename(tmp, final)
                    ours = True
                    break
                except FileNotFoundError:  # an evictor removed the emptied shard directory just now
                    if attempt == 2:
                        raise
                except OSError as e:
                    if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
                    log.debug("entry %s was published by another process; keeping theirs", key[:16])
                    break
        finally:
            if os.path.lexists(tmp):
                _remove(tmp)
        entry = self.open(key, stamp=False)
        if ours:
            cap = evict.max_size()
            if cap is not None:  # after taking our own hold: eviction never removes what we just made
                nbytes = sum(len(d) for d in all_files.values()) + os.lstat(final / MANIFEST).st_size
                evict.after_publish(self.root, nbytes, cap)
        return entry

    def open(self, key: str, stamp: bool = True) -> Entry:
        """The verified entry, holding its shared lock (``Entry.hold``) so that no process evicts it
        while the returned object lives; ``stamp``: record this use (the entry directory's mtime, the
        last-use stamp of LRU eviction). Raises like ``verify``."""
        path = os.path.join(self._entries_s, _check_key(key)[:2], key)
        self.ensure_secure()
        self._check_parents(key)
        if os.path.islink(path):
            raise CorruptEntryError(f"entry {path} is a symbolic link")
        for attempt in range(3):
            try:
                hold = EntryHold.take(path)
                break
            except FileNotFoundError:  # absent, or evicted while we waited (then perhaps published anew)
                if attempt == 2 or not os.path.lexists(path):
                    raise
        try:
            if stamp:
                with contextlib.suppress(OSError):
                    os.utime(path, follow_symlinks=False)
            entry = self._verify(key)  # the layer and entries/<xx>/ were checked above
        except BaseException:
            hold.release()
            raise
        return replace(entry, hold=hold)

    def lock(self, key: str, timeout: float = -1):
        import filelock

        return filelock.FileLock(str(self.root / "locks" / f"{_check_key(key)}.lock"), timeout=timeout)

    def build_lock(self, key: str, what: str = "", timeout: float | None = None):
        """The key's build lock with an owner file and a bounded, reported wait (``jitkern.locks``)."""
        return BuildLock(self.root / "locks" / f"{_check_key(key)}.lock", what, timeout)


def _write(path: Path, data: bytes) -> None:
    """Write a new private file (never through an existing name or link) and sync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with open(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)


def _read(path) -> bytes:
    """Read a regular file without following a symbolic link (ELOOP if ``path`` is one). With
    ``os.read`` on the descriptor, as many bytes as ``fstat`` reported in one call (a file object's
    ``read()`` reads once more to see the end: every lookup reads each file of an entry), to the
    end if the file turns out longer."""
    fd = os.open(path, _READ_FLAGS)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.ENXIO, "not a regular file", str(path))
        why = others_can_write(st)
        if why:
            raise CorruptEntryError(f"{path} could be changed by another user ({why})")
        size, got, chunks = st.st_size, 0, []
        while True:
            data = os.read(fd, size + 1 - got if got <= size else 65536)  # one byte more: a file that grew
            if not data:
                break
            chunks.append(data)
            got += len(data)
            if got == size:  # what fstat reported, and a short read: the end (an entry's files never change)
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    finally:
        os.close(fd)


def _safe_name(name) -> bool:
    return (isinstance(name, str) and bool(name) and name not in (".", "..") and not name.startswith(".")
            and "/" not in name and "\\" not in name and "\0" not in name)


def _remove(path: Path) -> None:
    """Remove a file, link or directory tree (a link is removed, never followed)."""
    try:
        if os.path.islink(path) or not os.path.isdir(path):
            os.unlink(path)
        else:
            shutil.rmtree(path, ignore_errors=True)
    except OSError:
        pass


def is_key(name: str) -> bool:
    return isinstance(name, str) and len(name) == 64 and set(name) <= _KEY_CHARS


def iter_entries(layer: Layer, links: bool = False):
    """(key, entry directory) for every published entry of ``layer`` (unverified), in key order.
    ``links``: also names under ``entries/<xx>/`` that are symbolic links or not directories (for
    ``verify``, which reports them; everything else skips them)."""
    if not links:
        yield from evict.iter_entries(layer.root)
        return
    try:
        shards = sorted(os.scandir(layer.root / "entries"), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return
    for shard in shards:
        if shard.is_dir(follow_symlinks=False):
            for e in sorted(os.scandir(shard.path), key=lambda e: e.name):
                if is_key(e.name):
                    yield e.name, Path(e.path)


def check_dirs(layers) -> list[Path]:
    """``layers`` unchanged, or ``ConfigError`` if one exists but is not a directory (a file given as
    ``--cache-dir``): the commands that take a cache directory say so instead of reading nothing."""
    for p in layers:
        if os.path.lexists(p) and not os.path.isdir(p):
            raise ConfigError(f"cache directory {p} is not a directory; name a directory (or one that does not "
                              "exist yet)")
    return list(layers)


def read_meta(path: Path) -> dict[str, Any]:
    """An entry's ``entry.json`` as recorded, unverified ({} if unreadable): for reports, never for loading."""
    try:
        meta = json.loads((Path(path) / ENTRY_META).read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


# ---- the layer record: what a prebuild put into a layer -----------------------------------------
LAYER_RECORD = "layer.json"
_MAX_PREBUILDS = 32


def layer_record(layer: Layer) -> dict[str, Any]:
    """``<layer>/v<N>/layer.json``: ``{"prebuilds": [...]}``, one record per prebuild into this layer
    (manifest digest, arches, counts, ``complete``), newest last; ``{}`` if there is none or it is unreadable."""
    try:
        rec = json.loads(_read(layer.root / LAYER_RECORD))
    except (OSError, ValueError, CorruptEntryError):
        return {}
    return rec if isinstance(rec, dict) and isinstance(rec.get("prebuilds"), list) else {}


def add_prebuild_record(layer: Layer, record: Mapping[str, Any]) -> dict[str, Any]:
    """Add a prebuild's record to ``layer``'s record (atomically: temp file + rename), replacing an
    earlier one for the same manifest digest and arches. Returns the new layer record."""
    def what(r):
        return (r.get("manifest") or {}).get("digest"), sorted(r.get("arches") or ()), str(r.get("ops"))

    old = [r for r in layer_record(layer).get("prebuilds", []) if what(r) != what(record)]
    new = {"format": FORMAT_VERSION, "prebuilds": (old + [dict(record)])[-_MAX_PREBUILDS:]}
    make_private_dirs(layer.root / "tmp")
    tmp = layer.root / "tmp" / f"layer-{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
    _write(tmp, json.dumps(new, indent=1, sort_keys=True, default=str).encode())
    os.replace(tmp, layer.root / LAYER_RECORD)
    return new


@dataclass(frozen=True)
class Nearest:
    """The recorded entry closest to a job that missed (``nearest``): where it is and what it records."""

    layer: Layer
    key: str
    meta: Mapping[str, Any]
    differing: tuple[str, ...]  # names of the key parts that differ from the job's

    @property
    def path(self) -> Path:
        return self.layer.entry_dir(self.key)


def catalog(store: "Store") -> list[tuple[Layer, str, dict[str, Any]]]:
    """(layer, key, recorded ``entry.json``) of every entry in every layer of ``store``: read once by a
    caller explaining many misses (``jitkern cache explain``)."""
    return [(layer, key, read_meta(path)) for layer in store.layers for key, path in iter_entries(layer)]


def nearest(store: "Store", op: str, variant: str, arch: str, parts, entries=None) -> Nearest | None:
    """The entry in any layer of ``store`` for the same op, variant and arch whose recorded key parts
    differ from ``parts`` (a job's ordered ``(name, value)`` key parts) in the fewest parts, preferring
    one with the same parameters, then built artifacts over recorded failures, then the newest; None if
    no layer holds an entry for that op, variant and arch. ``entries``: a ``catalog(store)`` to reuse.

    Reads each entry's ``entry.json`` without verifying it: the answer explains a miss, it is never loaded.
    """
    best, best_rank = None, None
    for layer, key, meta in (catalog(store) if entries is None else entries):
        if meta.get("op") != op or meta.get("variant") != variant or meta.get("arch") != arch:
            continue
        diff = tuple(differing(meta, parts))
        rank = ("params" in diff, len(diff), meta.get("status") == "failed", -float(meta.get("created") or 0))
        if best_rank is None or rank < best_rank:
            best, best_rank = Nearest(layer, key, meta, diff), rank
    return best


def sound_entries(store: "Store", skipped: list | None = None, sign_key=None):
    """Yield ``(key, {file name: bytes})`` for every sound entry of every layer (first layer wins per key): the
    manifest's files, the manifest, and the entry's signature (a fresh one by ``sign_key`` if given,
    else the one it has, if any). Damaged entries are appended to ``skipped``."""
    seen: set[str] = set()
    for layer in store.layers:
        for key, path in iter_entries(layer):
            if key in seen:
                continue
            try:
                entry = layer.verify(key)
            except (CorruptEntryError, FileNotFoundError) as e:
                if skipped is not None:
                    skipped.append({"key": key, "layer": str(layer.base), "error": str(e)})
                continue
            files = dict(entry.verified)
            files[MANIFEST] = entry.manifest
            if sign_key is not None:
                files[signing.ENTRY_SIGNATURE] = signing.sign_entry(sign_key, key, entry.manifest)
            else:
                try:
                    files[signing.ENTRY_SIGNATURE] = (entry.path / signing.ENTRY_SIGNATURE).read_bytes()
                except OSError:
                    pass
            seen.add(key)
            yield key, files


ENTRY_POINT_GROUP = "jitkern.cache_layers"
_installed: dict = {}


def installed_layers() -> list[tuple[Path, str]]:
    """``(layer directory, distribution)`` of every installed cache wheel: each advertises a function
    returning its layer directory through the ``jitkern.cache_layers`` entry-point group (``jitkern
    cache export --wheel``). Looked up once per process (and ``sys.path``); a broken one is skipped
    with a warning."""
    memo = tuple(sys.path)
    if memo not in _installed:
        from importlib.metadata import entry_points

        found = []
        eps = entry_points(group=ENTRY_POINT_GROUP) if _may_have_cache_wheels() else ()
        for ep in sorted(eps, key=lambda e: e.name):
            dist = getattr(getattr(ep, "dist", None), "name", None) or ep.name
            try:
                target = ep.load()
                path = Path(target() if callable(target) else target).absolute()
            except Exception as e:  # a broken third-party package must not break jitkern
                warn_once(("installed-layer", ep.value), "jitkern: ignoring the cache layer of %s (entry point "
                          "%s = %s): %s: %s", dist, ep.name, ep.value, type(e).__name__, e)
                continue
            found.append((path, dist))
        _installed.clear()
        _installed[memo] = found
    return _installed[memo]


def _may_have_cache_wheels() -> bool:
    """Whether any distribution on ``sys.path`` declares the ``jitkern.cache_layers`` group: a text
    search of each ``*.dist-info/entry_points.txt`` (``jitkern.dists``, about 3x cheaper than
    ``importlib.metadata``'s parse of every distribution, which then runs only where there is
    something to find). A ``sys.path`` entry that is not a directory (a zip) always defers to
    ``importlib.metadata``."""
    sections = dists.declared(ENTRY_POINT_GROUP)
    return sections is None or bool(sections)


class Store:
    """All configured layers (then the installed ones): read from each in order, write to the first
    writable one."""

    def __init__(self, layers: list[Path] | None = None, installed: bool = True):
        self.layers = [Layer(p) for p in (layers or configured_layers())]
        if installed:  # cache wheels: read after the user's layers, never written
            mine = {layer.base for layer in self.layers}
            self.layers += [Layer(p, installed_from=dist) for p, dist in installed_layers() if p not in mine]
        self._writable: Layer | None | bool = False  # False: not determined yet

    def __repr__(self):
        return f"Store({[str(layer.base) for layer in self.layers]})"

    def _find_write_layer(self) -> Layer | None:
        """The first writable layer, determined once; the first time there is none, one warning (also
        when the first kernel a process looks up is found in a read-only layer)."""
        if self._writable is False:
            self._writable = next((layer for layer in self.layers if layer.writable()), None)
            if self._writable is None:
                warn_once(("no-writable-layer", tuple(map(str, self.layers))),
                          "no writable jitkern cache layer among %s; kernels will be built in memory "
                          "for this process only (set JITKERN_CACHE_DIR to a writable directory)",
                          [str(layer.base) for layer in self.layers])
        return self._writable

    @property
    def write_layer(self) -> Layer | None:
        return self._find_write_layer()

    def existing_write_layer(self) -> Layer | None:
        """``write_layer`` once every configured layer exists, else None, and no directory created
        (for small side records, e.g. ``jitkern.toolversions``, that must not make reporting
        commands such as ``jitkern doctor`` create a cache)."""
        if self._writable is not False:
            return self._writable
        if not all(layer.root.is_dir() for layer in self.layers if layer.installed_from is None):
            return None
        return self._find_write_layer()

    def lookup(self, key: str, check=None) -> Entry | None:
        """A verified entry for ``key`` from the first layer that has a sound one, else None.

        ``check(entry)``, if given, may raise ``CorruptEntryError`` for an entry whose files are intact
        but are not what the caller planned (another arch's binary, another op's metadata): it is
        then treated like a damaged one. A layer another user could write raises
        ``InsecureCacheError`` (see ``Layer.check_secure``)."""
        for layer in self.layers:
            try:
                if layer is not self._find_write_layer():  # read-only layers: read as they are
                    entry = layer.verify(key)
                    trusted = signing.verify_keys()  # JITKERN_CACHE_VERIFY_KEY: only signed entries load
                    if trusted:
                        try:
                            layer.check_signed(entry, trusted)
                        except SignatureError as e:
                            counters.bump("signature_refused")
                            warn_once(("unsigned", key, str(layer.base)), "jitkern: not loading %s: %s "
                                      "(JITKERN_CACHE_VERIFY_KEY is set)", key[:16], e)
                            continue
                else:
                    # Write layer: a last-use stamp (the entry's mtime) and a shared lock held while the
                    # entry object lives, so that eviction (``jitkern.evict``) never removes it in use.
                    entry = layer.open(key)
                if check is not None:
                    check(entry)
                return entry
            except FileNotFoundError:
                continue
            except NotADirectoryError:
                e = CorruptEntryError(f"entry {layer.entry_dir(key)} is not a directory")
                self._damaged(layer, key, e)
            except CorruptEntryError as e:
                self._damaged(layer, key, e)
        return None

    def has_entry(self, key: str) -> bool:
        """Whether some layer holds a directory (not a link) for ``key``: one ``lstat`` per layer, no
        verification (``lookup`` verifies). The plan index trusts a record's source only for a key a
        layer holds, so a record can never make jitkern build source no entry was built from."""
        for layer in self.layers:
            try:
                if stat.S_ISDIR(os.lstat(os.path.join(layer._entries_s, _check_key(key)[:2], key)).st_mode):
                    return True
            except (OSError, CacheError):
                continue
        return False

    def _damaged(self, layer: Layer, key: str, e: CorruptEntryError) -> None:
        counters.bump("corrupt_discarded")
        writable = layer is self.write_layer
        warn_once(("corrupt", key, str(layer.base), str(e)), "jitkern cache entry %s is damaged (%s); %s", key[:16], e,
                  "discarding it and rebuilding" if writable else "skipping it (read-only layer)")
        if writable:
            layer.discard(key)

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

    def build_lock(self, key: str, what: str = "", timeout: float | None = None):
        layer = self.write_layer
        if layer is None:
            raise CacheError(f"no writable cache layer in {self}")
        return layer.build_lock(key, what, timeout)


_default: Store | None = None
_default_env: tuple | None = None


@state.on_reset
def _forget_default() -> None:
    global _default, _default_env
    _default, _default_env = None, None
    _cleaned.clear()
    forget_checks()


def default_store() -> Store:
    """The process-wide store for the current ``JITKERN_CACHE_DIR`` (re-read if it changes)."""
    global _default, _default_env
    env = settings.get("cache_dir")
    if _default is None or env != _default_env:
        _default, _default_env = Store(), env
    return _default
