"""Builders turn a planned job (rendered source + config + arch) into the files of a cache entry.

Each builder module offers ``fingerprint(arch) -> dict`` (what identifies its toolchain; part of
every key it builds) and ``build(job) -> (files, meta)``.
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
