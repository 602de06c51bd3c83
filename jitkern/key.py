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
import os
from typing import Any, Sequence

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
    env = os.environ  # keys first: only the few that match have their values read
    names = sorted(k for k in env if k.startswith(CODEGEN_ENV_PREFIXES) and k not in NON_CODEGEN_ENV)
    return {k: env[k] for k in names}


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


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
