"""jitkern: JIT kernel compilation with an on-disk cache, for GPU kernel libraries.

``import jitkern`` is cheap: it imports neither torch nor triton and touches no disk. Submodules
load on first use::

    import jitkern
    y = jitkern.ops.rms_norm(x, w)        # compile or load on first call, then launch
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

from .errors import (  # noqa: E402  (errors has no dependencies)
    ArchError, ArgumentError, BufferError, BuildError, CacheError, ConfigError, CorruptEntryError, DeviceError,
    CacheMissError, DTypeError, InputError, InsecureCacheError, JitkernError, LaunchError, LayoutError, NoDeviceError,
    NoVariantError, OverBudgetError, RecordedBuildFailure, RedzoneError, RemoteCacheError, ShapeError, SpecError,
    TableError, TemplateError, UnavailableError, UnknownArchError, UnknownOpError, UntrustedEntryError,
)

from . import state  # noqa: E402  (imports nothing)

_LAZY = {
    # name: (module, attribute or None for the module itself)
    "ops": ("jitkern.ops", None),
    "arch": ("jitkern.arch", None),
    "checks": ("jitkern.checks", None),
    "dispatch": ("jitkern.dispatch", None),
    "runtime": ("jitkern.runtime", None),
    "Arg": ("jitkern.spec", "Arg"),
    "Config": ("jitkern.spec", "Config"),
    "OpSpec": ("jitkern.spec", "OpSpec"),
    "Variant": ("jitkern.spec", "Variant"),
    "Candidate": ("jitkern.spec", "Candidate"),
    "Launch": ("jitkern.spec", "Launch"),
    "In": ("jitkern.spec", "In"),
    "Scalar": ("jitkern.spec", "Scalar"),
    "Scratch": ("jitkern.spec", "Scratch"),
    "Zeroed": ("jitkern.spec", "Zeroed"),
    "Rule": ("jitkern.constraints", "Rule"),
    "add_rules": ("jitkern.constraints", "add_rules"),
    "register": ("jitkern.registry", "register"),
    "get_op": ("jitkern.registry", "get"),
    "dispatcher": ("jitkern.dispatch", "dispatcher"),
    "kernel": ("jitkern.runtime", "kernel"),
    "select_arch": ("jitkern.runtime", "select_arch"),
    "stats": ("jitkern.counters", "snapshot"),
    "settings": ("jitkern.settings", None),
}


def reset() -> None:
    """Forget all process state: loaded kernels, per-signature decisions, log-once keys, counters,
    memoised lookups (for tests, and for long-lived servers that switch caches or settings)."""
    state.reset()



def __getattr__(name):
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'jitkern' has no attribute {name!r}") from None
    mod = importlib.import_module(module)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["__version__", "reset", *_LAZY, "JitkernError", "ArchError", "ArgumentError", "BufferError",
           "BuildError", "CacheError", "CacheMissError", "ConfigError", "CorruptEntryError", "DeviceError", "DTypeError", "InputError",
           "InsecureCacheError", "LaunchError", "LayoutError", "NoDeviceError", "NoVariantError", "OverBudgetError",
           "RecordedBuildFailure", "RedzoneError", "RemoteCacheError", "ShapeError", "SpecError", "TemplateError",
           "UnavailableError", "UnknownArchError", "UnknownOpError", "UntrustedEntryError"]
