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
    ArchError, BuildError, CacheError, CacheMissError, ConfigError, CorruptEntryError, DeviceError, DTypeError, InputError,
    InsecureCacheError, ArgumentError,
    JitkernError, LaunchError, LayoutError, NoDeviceError, ShapeError, SpecError, TemplateError,
    UnknownArchError, UnknownOpError,
)

_LAZY = {
    # name: (module, attribute or None for the module itself)
    "ops": ("jitkern.ops", None),
    "arch": ("jitkern.arch", None),
    "Arg": ("jitkern.spec", "Arg"),
    "Config": ("jitkern.spec", "Config"),
    "OpSpec": ("jitkern.spec", "OpSpec"),
    "Variant": ("jitkern.spec", "Variant"),
    "register": ("jitkern.registry", "register"),
    "get_op": ("jitkern.registry", "get"),
    "kernel": ("jitkern.runtime", "kernel"),
    "stats": ("jitkern.counters", "snapshot"),
    "settings": ("jitkern.settings", None),
}


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


__all__ = ["__version__", *_LAZY, "JitkernError", "CacheMissError"]
