"""``import triton`` without its entry-point scan, where that scan could only find Triton's own backends.

Importing Triton discovers its backends through ``importlib.metadata`` entry points (group
``triton.backends``), which reads the metadata of every installed distribution: 15 ms a process on
the 2-core CI machine, 25 ms on the H200 host (``tools/results/model_load_h200_2026-12-01_warm_profile.txt``).
Triton 3.6 skips that scan when ``TRITON_BACKENDS_IN_TREE=1`` and imports the backends in its own
``triton/backends/`` directory instead (older releases ignore the variable). That gives the same
backends exactly when the only distributions declaring ``triton.backends`` entry points declare
Triton's in-tree backends, which a text search of each ``*.dist-info/entry_points.txt`` on
``sys.path`` tells in about 1.5 ms (``jitkern.dists``: the same pass answers ``jitkern.cache``'s
question about cache wheels).

``ensure_imported()`` imports Triton that way where that holds, nobody imported Triton yet and the
variable is not set; the variable is set for the import only (Triton reads it there, once) and the
environment is restored after. Anything else (an out-of-tree backend such as a plugin package, a
zipped ``sys.path`` entry, an unreadable directory) imports Triton the usual way.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import threading

from . import dists
from .logs import log

VARIABLE = "TRITON_BACKENDS_IN_TREE"
GROUP = "triton.backends"
_lock = threading.Lock()


_done = False


def ensure_imported():
    """``triton``, imported (see the module docstring); cheap once it is. Safe from several threads
    (build workers): ``sys.modules`` holds Triton from the start of its import, so a caller only
    returns once an ``import triton`` of its own has completed (Python's module lock waits for the
    thread that is importing it)."""
    global _done
    if _done:
        return sys.modules["triton"]
    with _lock:
        if "triton" in sys.modules or VARIABLE in os.environ:
            import triton
        else:
            fast = in_tree_backends_suffice()
            if fast:
                os.environ[VARIABLE] = "1"
            try:
                import triton
            finally:
                if fast:
                    os.environ.pop("TRITON_BACKENDS_IN_TREE", None)  # VARIABLE (Triton's, not a jitkern setting)
        _done = True
        return triton


def in_tree_backends_suffice() -> bool:
    """Whether entry-point discovery would find exactly Triton's in-tree backends."""
    try:
        spec = importlib.util.find_spec("triton")
    except (ImportError, ValueError):
        return False
    locations = list(getattr(spec, "submodule_search_locations", None) or ()) if spec else []
    if len(locations) != 1:
        return False
    root = os.path.join(locations[0], "backends")
    try:
        in_tree = {n for n in os.listdir(root) if not n.startswith("__") and os.path.isdir(os.path.join(root, n))}
    except OSError:
        return False
    declared = declared_backends()
    if declared is None:
        return False
    want = {n: f"triton.backends.{n}" for n in in_tree}
    ok = bool(in_tree) and declared == want
    if not ok:
        log.debug("jitkern: triton.backends entry points %s differ from Triton's in-tree backends %s; "
                  "Triton discovers them itself", declared, sorted(in_tree))
    return ok


def declared_backends() -> dict[str, str] | None:
    """``{name: module}`` of every ``triton.backends`` entry point declared on ``sys.path``
    (``jitkern.dists``), or None where that cannot be told without importlib.metadata (a ``sys.path``
    entry that is not a directory, two declarations of one name that differ)."""
    sections = dists.declared(GROUP)
    if sections is None:
        return None
    found: dict[str, str] = {}
    for section in sections:
        for key, value in section.items():
            if found.setdefault(key, value) != value:
                return None
    return found


__all__ = ["ensure_imported", "in_tree_backends_suffice", "declared_backends"]
