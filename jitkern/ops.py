"""``jitkern.ops.<name>(...)``: every registered op, resolved on first attribute access.

Looking an op up imports its spec; nothing is rendered, compiled or loaded until it is called.
"""
from __future__ import annotations

from . import registry
from .errors import UnknownOpError


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    try:
        fn = registry.get(name).fn
    except UnknownOpError as e:
        raise AttributeError(str(e)) from None
    globals()[name] = fn
    return fn


def __dir__():
    return registry.names()
