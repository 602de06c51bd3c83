"""Entry points declared by the distributions on ``sys.path``, read as text (no ``importlib.metadata``).

``importlib.metadata.entry_points()`` parses the metadata of every installed distribution (3-6 ms a
process on the CI machine; more with more packages installed). jitkern asks two yes/no questions of
entry points on a warm start, before anything else needs them: does any distribution declare a
``jitkern.cache_layers`` layer (``jitkern.cache``), and which ``triton.backends`` are declared
(``jitkern.triton_import``). One pass over each ``sys.path`` directory's ``*.dist-info`` and
``*.egg-info`` ``entry_points.txt`` answers both (about 1.5 ms), memoised per ``sys.path``.
"""
from __future__ import annotations

import os
import sys
import threading

_memo: dict = {}
_lock = threading.Lock()


def declared(group: str) -> list[dict[str, str]] | None:
    """``[{name: value}, ...]``: the ``[group]`` section of each distribution declaring it, in
    ``sys.path`` order; None where text cannot tell (a ``sys.path`` entry that is not a directory,
    such as a zip, whose distributions only ``importlib.metadata`` reads)."""
    texts = _texts()
    if texts is None:
        return None
    marker = f"[{group}]"
    return [_section(t, group) for t in texts if marker in t]


def _texts() -> list[str] | None:
    key = tuple(sys.path)
    with _lock:
        if key not in _memo:
            _memo.clear()
            _memo[key] = _read_all()
        return _memo[key]


def _read_all() -> list[str] | None:
    out = []
    for d in sys.path:
        try:
            names = os.listdir(d or ".")
        except NotADirectoryError:
            return None
        except OSError:
            continue
        for name in names:
            if name.endswith((".dist-info", ".egg-info")):
                try:
                    with open(os.path.join(d or ".", name, "entry_points.txt"), encoding="utf-8",
                              errors="replace") as f:
                        out.append(f.read())
                except OSError:
                    continue
    return out


def _section(text: str, group: str) -> dict[str, str]:
    """``name = value`` lines of ``[group]`` in an entry_points.txt (INI: comments, blank lines)."""
    out: dict[str, str] = {}
    inside = False
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            inside = line[1:-1].strip() == group
            continue
        if inside and "=" in line:
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def forget() -> None:
    """Read again on the next question (tests; after installing packages into a running process)."""
    with _lock:
        _memo.clear()


__all__ = ["declared", "forget"]
