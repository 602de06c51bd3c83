"""Cache management behind ``jitkern cache stats | verify | prune | clear | export | import`` (the
command line and its output live in ``jitkern.cli``).

Only the first writable layer (where new entries go) is ever changed; read-only layers are read.

**Size.** ``prune`` removes least recently used entries of the writable layer down to a size, with
the same code that enforces ``JITKERN_CACHE_MAX_SIZE`` after each publish (``jitkern.evict``): an
entry that a process holds (it is loading it, or keeps a kernel loaded from it) is kept; nothing
else is, however recently it was used. ``prune`` and ``clear`` also remove the plan-index records
and build lock files of what they remove, and the shard directories they leave empty.

**Failures.** Entries whose metadata says ``status: failed`` are recorded build failures (kept so
that no process retries a build that cannot succeed with this toolchain); ``rejected_over_budget``
entries record artifacts that exceed the arch's shared-memory budget. ``clear --failures`` removes
the former.

**Archives.** ``export`` writes one tar (gzip if the name ends in .gz/.tgz) holding
``jitkern-export.json`` and ``entries/<key>/<file>`` for every sound entry of every layer.
``import`` stages each entry under the writable layer's ``tmp/``, verifies it against its manifest
with the same code that verifies every load, and renames it into place: atomic per entry; a damaged
entry is refused and reported, never installed.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import time
import uuid
from pathlib import Path
from typing import Any

from . import arch as _arch
from . import evict, signing
from .build import check_artifact
from .cache import (Layer, Store, check_dirs, configured_layers, installed_layers, is_key, iter_entries,
                    layer_record, read_meta, sound_entries)
from .errors import CacheError, ConfigError, CorruptEntryError, InsecureCacheError, JitkernError, SignatureError
from .status import FAILED
from .key import FORMAT_VERSION

EXPORT_META = "jitkern-export.json"


# ---- walking a layer ---------------------------------------------------------------------------
dir_size = evict.dir_size


def can_write(path: Path) -> bool:
    """Whether this process could create entries under ``path``, without creating anything."""
    p = Path(path)
    while not p.exists():
        if p.parent == p:
            return False
        p = p.parent
    return os.access(p, os.W_OK | os.X_OK)


def layer_info(cache_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Path, writability, entry count and bytes of each configured layer (creates nothing)."""
    out = []
    mine = configured_layers(cache_dir)
    layers = [Layer(p) for p in mine] + [Layer(p, installed_from=d) for p, d in installed_layers() if p not in mine]
    for layer in layers:
        p = layer.base
        n = size = 0
        for _, path in iter_entries(layer):
            n += 1
            size += dir_size(path)
        prebuilds = layer_record(layer).get("prebuilds") or [None]
        out.append({"path": str(p), "exists": p.exists(), "entries": n, "bytes": size, "prebuild": prebuilds[-1],
                    "writable": layer.installed_from is None and can_write(layer.root),
                    "installed_from": layer.installed_from})
    return out


def policy_rows() -> list[dict[str, Any]]:
    """``jitkern doctor`` rows (``jitkern.cli.row`` shape) for the size cap and the signature settings;
    a bad setting shows its error."""
    def row(key, label, value, text):
        return {"key": key, "label": label, "value": value, "text": text}

    rows = []
    try:
        cap = evict.max_size()
        rows.append(row("max_size", evict.ENV_MAX_SIZE, cap,
                        f"{cap:,} bytes ({cap / 2 ** 30:.2f} GiB): least recently used entries not in use are "
                        "evicted after a publish that passes it" if cap else
                        "(not set: the writable layer grows without bound; see docs/fleet-cache.md)"))
    except ConfigError as e:
        rows.append(row("max_size", evict.ENV_MAX_SIZE, {"error": str(e)}, f"error: {e}"))
    try:
        pub, priv = signing.verify_keys(), signing.sign_key()
        ids = [signing.key_id(k) for k in pub or ()]
        rows.append(row("verify_keys", "JITKERN_CACHE_VERIFY_KEY", ids,
                        f"read-only layers load only entries signed by {', '.join(ids)}" if ids else
                        "(not set: entries of read-only and installed layers are checked against their checksums "
                        "only)"))
        kid = signing.key_id(priv.public_key()) if priv is not None else None
        rows.append(row("sign_key", "JITKERN_CACHE_SIGN_KEY", kid,
                        f"entries published here are signed by {kid}" if kid else "(not set: entries are not signed)"))
    except ConfigError as e:
        rows.append(row("signing", "signing", {"error": str(e)}, f"error: {e}"))
    return rows


def _store(args) -> Store:
    return Store(check_dirs(configured_layers(getattr(args, "cache_dir", None))))


def _write_layer(store: Store) -> Layer:
    layer = store.write_layer
    if layer is None:
        raise CacheError(f"no writable layer in {[str(x.base) for x in store.layers]}; set JITKERN_CACHE_DIR or "
                         "--cache-dir to a directory you can write")
    return layer


# ---- stats -------------------------------------------------------------------------------------
def stats(store: Store) -> dict[str, Any]:
    layers = []
    write = store.write_layer
    cap = evict.max_size()
    for layer in store.layers:
        info: dict[str, Any] = {"path": str(layer.base), "writable": layer is write, "entries": 0, "bytes": 0,
                                "failures": 0, "rejected_over_budget": 0, "per_arch": {}, "per_op": {}}
        if layer.installed_from is not None:
            info["installed_from"] = layer.installed_from
        if layer is write:
            u = evict.read_usage(layer.root) or {}
            info["max_size"] = cap
            info["evictions"] = {"entries": u.get("evicted_entries", 0), "bytes": u.get("evicted_bytes", 0),
                                 "last": u.get("last_eviction")}
        for _, path in iter_entries(layer):
            meta = read_meta(path)
            size = dir_size(path)
            info["entries"] += 1
            info["bytes"] += size
            status = meta.get("status")
            if status == "failed":
                info["failures"] += 1
            elif status == "rejected_over_budget":
                info["rejected_over_budget"] += 1
            for group, name in (("per_arch", meta.get("arch", "?")), ("per_op", meta.get("op", "?"))):
                g = info[group].setdefault(str(name), {"entries": 0, "bytes": 0})
                g["entries"] += 1
                g["bytes"] += size
        info["prebuilds"] = layer_record(layer).get("prebuilds", [])  # what prebuild put here (newest last)
        layers.append(info)
    return {"format": FORMAT_VERSION, "layers": layers,
            "entries": sum(x["entries"] for x in layers), "bytes": sum(x["bytes"] for x in layers)}


def describe_prebuild(rec: dict[str, Any]) -> str:
    """One line for a layer's prebuild record (``jitkern.cache.add_prebuild_record``)."""
    m = rec.get("manifest") or {}
    what = f"manifest {m.get('path')} ({m.get('signatures')} signatures, sha256 {str(m.get('digest'))[:12]})" \
        if m else "every config of every op"
    c = rec.get("counts") or {}
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(rec["created"])) if rec.get("created") else "?"
    return (f"{'complete' if rec.get('complete') else 'INCOMPLETE'}: {what} for {', '.join(rec.get('arches', []))}; "
            f"{c.get('artifacts', '?')} artifacts ({c.get('built', 0)} built, {c.get('failed', 0)} failed); {when}")


# ---- verify ------------------------------------------------------------------------------------
def verify(store: Store, discard: bool = False) -> tuple[int, list[dict[str, str]]]:
    """Check every entry of every layer. Returns (entries checked, damaged entries)."""
    write = store.write_layer if discard else None
    checked, damaged = 0, []
    for layer in store.layers:
        for key, path in iter_entries(layer, links=True):  # a link where an entry belongs is reported
            checked += 1
            try:
                entry = layer.verify(key)
                _check_claims(entry)
            except (CorruptEntryError, InsecureCacheError, FileNotFoundError) as e:
                removed = False
                if discard and layer is write:
                    layer.discard(key)
                    removed = True
                damaged.append({"layer": str(layer.base), "key": key, "path": str(path), "error": str(e),
                                "discarded": removed})
    return checked, damaged


def _check_claims(entry) -> None:
    """An intact entry must also be what its ``entry.json`` says: a binary for the arch it names."""
    meta = entry.meta
    if meta.get("status") == FAILED:
        return
    try:
        a = _arch.get(str(meta.get("arch")))
    except JitkernError:
        raise CorruptEntryError(f"entry {entry.path} names an unknown arch {meta.get('arch')!r}") from None
    check_artifact(entry, a, str(meta.get("kind") or "triton"), meta.get("kernel"))


# ---- prune -------------------------------------------------------------------------------------
def prune(store: Store, max_size: int | None = None) -> dict[str, Any]:
    """Remove least recently used entries of the writable layer until it holds at most ``max_size``
    bytes (default ``JITKERN_CACHE_MAX_SIZE``), with the same code as the automatic cap
    (``jitkern.evict.shrink``): only an entry that some process holds (loading it, or keeping a kernel
    loaded from it) is kept, however recently it was used."""
    layer = _write_layer(store)
    if max_size is None:
        max_size = evict.max_size()
        if max_size is None:
            raise ConfigError(f"no size given: pass --max-size SIZE (e.g. 20GB) or set {evict.ENV_MAX_SIZE}")
    r = evict.shrink(layer.root, max_size)
    return {"layer": str(layer.base), "max_size": max_size, **{k: v for k, v in r.items() if k != "removed_keys"}}


# ---- clear -------------------------------------------------------------------------------------
def clear(store: Store, failures_only: bool = False) -> int:
    """Remove every entry (or only recorded build failures) of the writable layer."""
    layer = _write_layer(store)
    n = 0
    for key, path in list(iter_entries(layer)):
        if failures_only and read_meta(path).get("status") != "failed":
            continue
        layer.discard(key)
        n += 1
    evict.tidy(layer.root)  # index records, unheld lock files, empty shard directories of what went
    return n


def clear_targets(store: Store, failures_only: bool = False) -> tuple[Layer, list[str]]:
    """``(layer, keys)``: the layer ``clear`` would change and the entries it would remove, found
    without creating anything (a missing layer directory stays missing and has no keys)."""
    for layer in store.layers:
        if can_write(layer.root):
            break
    else:
        raise CacheError(f"no writable layer in {[str(x.base) for x in store.layers]}; set JITKERN_CACHE_DIR or "
                         "--cache-dir to a directory you can write")
    keys = [key for key, path in iter_entries(layer)
            if not failures_only or read_meta(path).get("status") == "failed"]
    return layer, keys


def clear_failures(store: Store) -> int:
    return clear(store, failures_only=True)


# ---- export / import ---------------------------------------------------------------------------
def check_output_file(path: str | os.PathLike, what: str = "output file", make_parents: bool = False) -> str:
    """``path`` if a file can be written there (checked before any work, by creating and removing a
    file next to it), else ``ConfigError``: it is a directory, its directory does not exist
    (``make_parents``: cannot be created) or is a file, or it cannot be written."""
    import tempfile

    path = os.fspath(path)
    if not path.strip() or os.path.isdir(path):
        raise ConfigError(f"{what} {path!r} is a directory; name a file")
    parent = os.path.dirname(os.path.abspath(path))
    try:
        ancestor = parent
        while not os.path.isdir(ancestor) and os.path.dirname(ancestor) != ancestor:
            if os.path.lexists(ancestor) or not make_parents:
                raise NotADirectoryError(f"{ancestor} is not a directory" if os.path.lexists(ancestor)
                                         else f"{ancestor} does not exist")
            ancestor = os.path.dirname(ancestor)
        if make_parents:
            os.makedirs(parent, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=parent)
        os.close(fd)
        os.unlink(probe)
        if os.path.exists(path) and not os.access(path, os.W_OK):
            raise PermissionError("the file exists and is read-only")
    except OSError as e:
        raise ConfigError(f"{what} {path!r} cannot be written: {e.strerror or e}") from None
    return path


def _tar_mode(path: str, write: bool) -> str:
    gz = path.endswith((".gz", ".tgz"))
    return ("w:gz" if gz else "w") if write else "r:*"


def _sign_key(path):
    """The private key of ``--sign-key PATH``, else of ``JITKERN_CACHE_SIGN_KEY``, else None."""
    return signing.load_private(path) if path else signing.sign_key()


def _verify_keys(path):
    """The public key of ``--verify-key PATH``, else those of ``JITKERN_CACHE_VERIFY_KEY``, else None."""
    return signing.public_keys([path]) if path else signing.verify_keys()


def export(store: Store, file: str | os.PathLike, sign_key=None) -> dict[str, Any]:
    """Write every sound entry of every layer (first layer wins per key) into one archive, atomically.
    ``sign_key`` (an Ed25519 private key, ``jitkern.signing``): sign the bundle (a signed list of every
    member's SHA-256) and every entry in it."""
    file = os.fspath(file)
    check_output_file(file, "export archive")
    skipped: list = []
    members: dict[str, str] = {}
    now = int(time.time())
    tmp = f"{file}.tmp-{os.getpid()}"

    def add(tar, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, now
        tar.addfile(info, io.BytesIO(data))

    try:
        with tarfile.open(tmp, _tar_mode(file, True)) as tar:
            n = 0
            for key, files in sound_entries(store, skipped, sign_key):
                for name in sorted(files):
                    members[f"entries/{key}/{name}"] = hashlib.sha256(files[name]).hexdigest()
                    add(tar, f"entries/{key}/{name}", files[name])
                n += 1
            record = {"format": FORMAT_VERSION, "entries": n, "created": time.time(), "members": members}
            if sign_key is not None:
                record["signed_by"] = signing.key_id(sign_key.public_key())
            meta = json.dumps(record, sort_keys=True).encode()
            add(tar, EXPORT_META, meta)
            if sign_key is not None:
                add(tar, signing.BUNDLE_SIGNATURE, signing.signature_record(sign_key, signing.DOMAIN_BUNDLE, meta))
        os.replace(tmp, file)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return {"file": file, "entries": n, "skipped_damaged": skipped,
            "signed_by": signing.key_id(sign_key.public_key()) if sign_key is not None else None}


def _export_format(file: str, raw: bytes | None) -> int:
    """The format version an export's ``jitkern-export.json`` names (``ConfigError`` if it is malformed)."""
    try:
        rec = json.loads(raw) if raw is not None else None
        fmt = rec.get("format") if isinstance(rec, dict) else None
        if not isinstance(fmt, int) or isinstance(fmt, bool):
            raise ValueError(f"it holds {rec!r:.80}, not an object with a format number")
    except (ValueError, OSError, tarfile.TarError) as e:
        raise ConfigError(f"{file!r} has a malformed {EXPORT_META} ({e}); expected a file made by "
                          "'jitkern cache export'") from None
    return fmt


def _check_bundle(file: str, meta: bytes | None, sig: bytes | None, hashes: dict[str, str], odd: list[str],
                  verify_keys) -> str:
    """Raise ``SignatureError`` unless the bundle's list of members is signed by a trusted key and
    names exactly the members it holds, each with its SHA-256. Returns the signer's key id."""
    what = f"bundle {file}"
    if meta is None:
        raise SignatureError(f"{what} has no {EXPORT_META}; it is not a jitkern export")
    signer = signing.check_record(verify_keys, signing.DOMAIN_BUNDLE, meta, sig, what)
    listed = json.loads(meta).get("members")
    if not isinstance(listed, dict):
        raise SignatureError(f"{what} lists no members")
    if odd:
        raise SignatureError(f"{what} holds members its signed list does not name: {', '.join(odd[:3])}")
    for name in sorted(set(listed) | set(hashes)):
        if name not in hashes:
            raise SignatureError(f"{what}: member {name} is signed for but missing")
        if name not in listed:
            raise SignatureError(f"{what}: member {name} was added after signing")
        if listed[name] != hashes[name]:
            raise SignatureError(f"{what}: member {name} was changed after signing (SHA-256 differs)")
    return signer


def import_archive(store: Store, file: str | os.PathLike, verify_keys=None) -> dict[str, Any]:
    """Install the entries of an ``export`` archive into the writable layer, each verified and renamed
    into place (atomic per entry). Damaged entries are refused. With ``verify_keys`` (Ed25519 public
    keys), the whole bundle is refused (``SignatureError``, nothing installed) unless it is signed by one
    of them and no member was changed, added or removed since."""
    layer = _write_layer(store)
    file = os.fspath(file)
    try:
        tar = tarfile.open(file, _tar_mode(file, False))
    except (OSError, tarfile.TarError) as e:
        raise ConfigError(f"cannot read archive {file!r}: {e}; expected a file made by 'jitkern cache export'") from None
    stage = Layer(layer.root / "tmp" / f"import-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    installed, present, refused = 0, 0, []
    signer = None
    try:
        with tar:
            staged: set[str] = set()
            hashes: dict[str, str] = {}
            odd: list[str] = []
            meta_raw = sig_raw = None
            fmt = None
            for m in tar:  # stream each file to the staging area: no archive held in memory
                if m.name in (EXPORT_META, signing.BUNDLE_SIGNATURE) and m.isfile():
                    raw = tar.extractfile(m).read()
                    if m.name == EXPORT_META:
                        meta_raw, fmt = raw, _export_format(file, raw)
                    else:
                        sig_raw = raw
                    continue
                parts = m.name.split("/")
                if (not m.isfile() or len(parts) != 3 or parts[0] != "entries" or not is_key(parts[1])
                        or parts[2].startswith(".") or not parts[2]):
                    refused.append({"member": m.name, "error": "not an entry file of a jitkern export"})
                    odd.append(m.name)
                    continue
                d = stage.entry_dir(parts[1])
                d.mkdir(parents=True, exist_ok=True, mode=0o700)
                try:
                    fd = os.open(d / parts[2], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                except FileExistsError:
                    refused.append({"member": m.name, "error": "appears twice in the archive"})
                    odd.append(m.name)
                    continue
                h = hashlib.sha256()
                src = tar.extractfile(m)
                with os.fdopen(fd, "wb") as out:
                    for chunk in iter(lambda: src.read(1 << 20), b""):
                        h.update(chunk)
                        out.write(chunk)
                hashes[m.name] = h.hexdigest()
                staged.add(parts[1])
            if fmt is None:
                raise ConfigError(f"{file!r} is not a jitkern cache export (no {EXPORT_META})")
            if fmt != FORMAT_VERSION:
                raise ConfigError(f"{file!r} holds cache format v{fmt}; this jitkern reads v{FORMAT_VERSION}: "
                                  "export it again with this version, or rebuild with 'jitkern prebuild'")
            if verify_keys:
                signer = _check_bundle(file, meta_raw, sig_raw, hashes, odd, verify_keys)
        for key in sorted(staged):
            d = stage.entry_dir(key)
            try:
                layer.verify(key)
                present += 1
                continue
            except FileNotFoundError:
                pass
            except CorruptEntryError:
                layer.discard(key)  # ours is damaged: replace it with the sound one from the archive
            try:
                stage.verify(key)
            except (CorruptEntryError, FileNotFoundError) as e:
                refused.append({"key": key, "error": str(e)})
                continue
            final = layer.entry_dir(key)
            final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            try:
                os.rename(d, final)
                installed += 1
            except OSError:  # another process installed or built the same key meanwhile
                present += 1
    finally:
        shutil.rmtree(stage.base, ignore_errors=True)
    cap = evict.max_size()
    if cap is not None and installed:
        evict.shrink(layer.root, int(cap * evict.LOW_WATER), cap=cap, only_above=cap)
    return {"file": file, "installed": installed, "already_present": present, "refused": refused,
            "layer": str(layer.base), "signed_by": signer}
