"""The dispatcher's hot path in C: the call signature, the memo lookup and the decided launches.

``jitkern.dispatch`` decides a call signature once in Python; what a later call with that signature
does -- compute the signature, find its decision, read the tensors' addresses, check their
alignment and the per-call scalars, and call Triton's generated C ``launch`` -- runs in the small
CPython extension ``fastcall.c`` beside this file, without a Python frame per step. The decisions
stay in the dispatcher's one memo (the C key is the Python key, tuple for tuple), and every error
is still raised by the Python code that raises it on the slow path: the C side calls back for it.

The extension is compiled on first use by Triton's own helper for its launcher stubs
(``triton.runtime.build.compile_module_from_src``: the C compiler Triton already needs on a GPU
machine, kept in Triton's cache by a hash of the source and the platform), so it exists only where
GPU kernels launch directly (``jitkern.launcher``). ``JITKERN_FAST_CALL=0`` keeps the whole hot path
in Python; a machine where the extension cannot be built does the same, with one warning.
"""
from __future__ import annotations

import threading
from pathlib import Path

from . import settings
from .logs import warn_once

SOURCE = Path(__file__).with_name("fastcall.c")
_lock = threading.Lock()
_module = None
_tried = False


def enabled() -> bool:
    """Whether the C hot path is wanted (``JITKERN_FAST_CALL``, default on)."""
    return settings.get("fast_call")


def module():
    """The compiled extension (``Dispatch`` and ``Fire``), or None where it is off or cannot be
    built (warned once; the Python hot path is used)."""
    global _module, _tried
    if _tried or not enabled():
        return _module if enabled() else None
    with _lock:
        if not _tried:
            try:
                from triton.runtime.build import compile_module_from_src

                _module = compile_module_from_src(SOURCE.read_text(), "jitkern_fastcall")
            except Exception as e:  # no C compiler or Python headers, a Triton without the helper
                warn_once(("fastcall",), "jitkern: the C dispatch path could not be built (%s: %s); "
                          "launching through the Python path (a few microseconds more per call)",
                          type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            _tried = True
    return _module


__all__ = ["enabled", "module"]
