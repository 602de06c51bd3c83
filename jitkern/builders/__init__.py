"""Builders turn a planned job (rendered source + config + arch) into the files of a cache entry,
and load what they built. The interface every builder offers is ``jitkern.builders.base.Builder``.
"""
from __future__ import annotations

import importlib

from ..errors import SpecError

#: kind -> (module, attribute): the Triton builder is a module; the C++ kinds are ``Toolchain``
#: objects (jitkern.builders.cpp: nvcc, the host C++ compiler; jitkern.builders.hip: clang/hipcc for
#: AMD), which also load what they build.
KINDS = {
    "triton": ("jitkern.builders.triton", None),
    "cuda": ("jitkern.builders.cpp", "CUDA"),
    "hip": ("jitkern.builders.hip", "HIP"),
    "cpp": ("jitkern.builders.cpp", "HOST"),
}


def get(kind: str):
    try:
        module, attr = KINDS[kind]
    except KeyError:
        raise SpecError(f"unknown variant kind {kind!r}; known kinds: {', '.join(KINDS)}") from None
    mod = importlib.import_module(module)
    return mod if attr is None else getattr(mod, attr)


def probe(kind: str, arch) -> str | None:
    """Why a ``kind`` variant cannot be built for ``arch`` on this machine (None: it can try)."""
    fn = getattr(get(kind), "probe", None)
    return fn(arch) if fn is not None else None
