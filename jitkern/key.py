"""Cache keys built from named parts.

A key is the SHA-256 over an ordered list of (name, value) parts. Each part is hashed on its own
and logged at debug level, so a surprising cache miss can be traced to the part that changed.
Nothing that is not in the key may change the artifact.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
from typing import Any, Sequence

from .settings import environ_prefixed

log = logging.getLogger("jitkern")

#: Bump when the on-disk entry layout or anything jitkern adds to an artifact changes.
FORMAT_VERSION = 1

#: Environment variables with these prefixes can change what Triton generates; all of them are
#: part of the key (a needless miss is cheap, a wrong hit is not) except those listed below.
CODEGEN_ENV_PREFIXES = ("TRITON_", "AMDGCN_", "NVPTX_", "LLVM_", "MLIR_", "DISABLE_PTXAS", "PTXAS_")
#: ...that only say where files go or how Triton reports, never what it generates.
NON_CODEGEN_ENV = frozenset({
    "TRITON_CACHE_DIR", "TRITON_HOME", "TRITON_DUMP_DIR", "TRITON_OVERRIDE_DIR", "TRITON_INTERPRET",
    "TRITON_PRINT_AUTOTUNING", "TRITON_CACHE_AUTOTUNING", "TRITON_CACHE_MANAGER",
    "TRITON_REMOTE_CACHE_BACKEND", "TRITON_REDIS_HOST", "TRITON_REDIS_PORT", "TRITON_REDIS_KEY_FORMAT",
    "TRITON_ENABLE_NVTX", "TRITON_PROTON_DISABLE", "TRITON_LIBCUDA_PATH",
})


def codegen_env() -> dict[str, str]:
    env = environ_prefixed(CODEGEN_ENV_PREFIXES)  # read now: a change applies to the next key
    return {k: env[k] for k in sorted(env) if k not in NON_CODEGEN_ENV}


#: ``json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)`` without making a new
#: encoder per call (about half of what hashing a small part costs; every planned job hashes ten).
_ENCODE = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str).encode


def _canonical(value: Any) -> str:
    return _ENCODE(value)


def part_hash(value: Any) -> str:
    data = value if isinstance(value, (bytes, bytearray)) else _canonical(value).encode()
    return hashlib.sha256(data).hexdigest()


def make_key(parts: Sequence[tuple[str, Any]]) -> str:
    """Hash named parts in order; log each part's hash at debug level."""
    h = hashlib.sha256()
    for name, value in parts:
        ph = part_hash(value)
        log.debug("key part %-20s %s", name, ph[:16])
        h.update(name.encode())
        h.update(b"\0")
        h.update(ph.encode())
        h.update(b"\0")
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def _triton_version() -> str:
    from importlib.metadata import version

    return version("triton")


def triton_fingerprint() -> dict[str, Any]:
    """What identifies the Triton toolchain. Cheap: no subprocess, no import of triton."""
    return {
        "triton": _triton_version(),
        "env": codegen_env(),
    }


# ---- explaining a key difference ---------------------------------------------------------------
#: Parts an entry records only by hash (``part_hashes``): the rendered source is a file of its own.
HASH_ONLY_PARTS = ("source",)
_MAX_SHOWN = 60


def recorded(parts: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """What an entry's ``entry.json`` records about its key: ``key_parts`` (each part's value, except
    the rendered source) and ``part_hashes`` (every part's hash), so a later miss can be explained."""
    return {
        "key_parts": {name: value for name, value in parts if name not in HASH_ONLY_PARTS},
        "part_hashes": {name: part_hash(value) for name, value in parts},
    }


def recorded_hashes(meta: dict[str, Any]) -> dict[str, str]:
    """Each key part's hash as an entry's metadata records it (older entries: from ``key_parts``)."""
    hashes = dict(meta.get("part_hashes") or {})
    for name, value in (meta.get("key_parts") or {}).items():
        hashes.setdefault(name, part_hash(value))
    return hashes


def differing(meta: dict[str, Any], parts: Sequence[tuple[str, Any]]) -> list[str]:
    """Names of the key parts in which the entry described by ``meta`` differs from ``parts``, in key
    order (a part the entry does not record at all counts as differing)."""
    old = recorded_hashes(meta)
    names = [name for name, _ in parts]
    out = [name for name, value in parts if old.get(name) != part_hash(value)]
    return out + [name for name in old if name not in names]


def explain(meta: dict[str, Any], parts: Sequence[tuple[str, Any]]) -> list[str]:
    """How ``parts`` (what a job wants) differ from the entry recorded in ``meta``, one line per change,
    old -> new, e.g. ``compiler: triton 3.6.0 -> 3.6.1``, ``env: TRITON_F32_DEFAULT added (=ieee)``,
    ``params: block_n 256 -> 512``, ``source: template changed``."""
    old_values = meta.get("key_parts") or {}
    new_values = dict(parts)
    names = differing(meta, parts)
    lines: list[str] = []
    for name in names:
        if name not in new_values:
            lines.append(f"{name}: recorded by the entry, no longer part of the key")
        elif name not in old_values:
            if name not in recorded_hashes(meta):
                lines.append(f"{name}: not recorded by the entry")
            elif name == "source":  # rendered from the template with the params and arch
                follows = [n for n in ("params", "arch") if n in names]
                lines.append("source: rendered differently (follows from " + " and ".join(follows) + ")"
                             if follows else "source: template changed")
            else:
                lines.append(f"{name}: changed")
        else:
            lines.extend(_diff(name, old_values[name], new_values[name]) or [f"{name}: changed"])
    return lines


def _show(value: Any) -> str:
    text = value if isinstance(value, str) else _canonical(value)
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN - 3] + "..."


_MISSING = object()


def _diff(label: str, old: Any, new: Any, path: str = "") -> list[str]:
    """Lines for the leaves that differ between two JSON-like values, dicts compared key by key
    (the toolchain fingerprint's codegen environment is reported under its own label, ``env``)."""
    if old is not _MISSING:
        old = json.loads(_canonical(old))  # tuples and lists alike
    if new is not _MISSING:
        new = json.loads(_canonical(new))
    if isinstance(old, dict) or isinstance(new, dict):
        old_d = old if isinstance(old, dict) else {}
        new_d = new if isinstance(new, dict) else {}
        if (old is _MISSING or isinstance(old, dict)) and (new is _MISSING or isinstance(new, dict)):
            out = []
            for k in sorted(set(old_d) | set(new_d), key=str):
                if label == "compiler" and not path and k == "env":
                    sub_label, sub_path = "env", ""
                else:
                    sub_label, sub_path = label, f"{path}.{k}" if path else str(k)
                out += _diff(sub_label, old_d.get(k, _MISSING), new_d.get(k, _MISSING), sub_path)
            return out
    if old == new:
        return []
    where = f"{path} " if path else ""
    if old is _MISSING:
        return [f"{label}: {where}added (={_show(new)})"]
    if new is _MISSING:
        return [f"{label}: {where}removed (was {_show(old)})"]
    return [f"{label}: {where}{_show(old)} -> {_show(new)}"]
