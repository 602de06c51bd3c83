"""Builders turn a planned job (rendered source + config + arch) into the files of a cache entry.

Each builder module offers ``fingerprint(arch) -> dict`` (what identifies its toolchain; part of
every key it builds) and ``build(job) -> (files, meta)``.
"""
from __future__ import annotations

import importlib

from ..errors import SpecError

KINDS = {
    "triton": "jitkern.builders.triton",
    "cuda": "jitkern.builders.cuda",  # C++ kinds: see jitkern.builders.cpp
    "hip": "jitkern.builders.hip",
    "cpp": "jitkern.builders.host",
}


def get(kind: str):
    try:
        return importlib.import_module(KINDS[kind])
    except KeyError:
        raise SpecError(f"unknown variant kind {kind!r}; known kinds: {', '.join(KINDS)}") from None
