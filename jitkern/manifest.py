"""Manifests: the call signatures a workload made, recorded as JSON lines, so exactly those can be
prebuilt for any arch (``jitkern prebuild --manifest``) and checked (``jitkern cache check``).

With ``JITKERN_RECORD=FILE`` (or ``jitkern record -o FILE -- CMD ...``), the dispatcher calls
``seen(dispatcher, args)`` the first time this process meets a call signature, and one line is
appended to FILE per signature not yet written by this process::

    {"op": "rms_norm", "args": {"x": {"dtype": "bfloat16", "shape": [16, 4096], "stride": [4096, 1]},
     "weight": {...}, "residual": null, "out": {...}}}

A line holds what the dispatcher keys a signature on, minus the device: every tensor argument's
dtype, shape and strides (``null`` when an optional tensor is None) and the value of every other
argument except the op's per-call ``scalars`` (``eps``...), which the signature does not include.
So a manifest is arch-independent: it says what was called, not which tile was picked; prebuild
runs each op's own plan on the named arch to decide that (``jitkern.coverage``).

Several processes may append to one file: each line is one ``write`` on a file opened with
``O_APPEND``, under an exclusive ``flock`` of the file itself (no lock file; where ``flock`` is not
available the single appending write is still whole on local filesystems). Readers skip duplicate
lines, blank lines and ``#`` comments.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from . import settings, state
from .errors import ConfigError
from .logs import log, warn_once

ENV = "JITKERN_RECORD"
FORMAT = 1

_written: set = set()  # (path, line) written by this process
_lock = threading.Lock()


def record_path() -> str | None:
    """Where this process records signatures (``JITKERN_RECORD``), or None."""
    return settings.get("record") or None


# ---- encoding a call ---------------------------------------------------------------------------
def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _encode_value(op: str, name: str, v: Any):
    """A non-tensor argument as JSON (tuples as ``{"tuple": [...]}``, dtypes as ``{"dtype": ...}``)."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (tuple, list)):
        items = [_encode_value(op, name, x) for x in v]
        return {"tuple": items} if isinstance(v, tuple) else items
    if type(v).__name__ == "dtype" and type(v).__module__ == "torch":
        return {"dtype": _dtype_name(v)}
    raise TypeError(f"{op}: argument {name!r} is a {type(v).__name__}, which a manifest cannot record")


def encode(spec, names, tensors, args) -> dict[str, Any]:
    """The manifest record of one call: ``{"op", "args": {name: ...}}`` (see the module docstring).
    ``names``: the op function's parameters; ``tensors``: positions of its tensor parameters."""
    out: dict[str, Any] = {}
    for i, name in enumerate(names):
        if name in spec.scalars:
            continue
        v = args[i]
        if i in tensors:
            out[name] = None if v is None else {"dtype": _dtype_name(v.dtype), "shape": list(v.shape),
                                                "stride": list(v.stride())}
        else:
            out[name] = _encode_value(spec.name, name, v)
    return {"op": spec.name, "args": out}


def line(record: Mapping[str, Any]) -> str:
    """The canonical JSON line of a record (sorted keys, no spaces): equal signatures, equal lines."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


# ---- the dispatcher's hook -----------------------------------------------------------------------
def seen(dispatcher, args: tuple) -> None:
    """Called by the dispatcher on a new call signature: append it to ``JITKERN_RECORD`` (if set),
    once per signature and process. Never raises: recording must not break the call it records."""
    path = record_path()
    if path is None:
        return
    try:
        text = line(encode(dispatcher.spec, dispatcher.names, dispatcher.tensors, args))
    except (TypeError, AttributeError, ValueError) as e:
        warn_once(("record-encode", dispatcher.spec.name, str(e)), "jitkern: %s=%s: not recording a call: %s",
                  ENV, path, e)
        return
    with _lock:
        if (path, text) in _written:
            return
        try:
            append(path, [text])
        except OSError as e:
            warn_once(("record-write", path), "jitkern: %s: cannot append to %s (%s); signatures are not recorded",
                      ENV, path, e)
            return
        _written.add((path, text))


def append(path: str | os.PathLike, lines: list[str]) -> None:
    """Append ``lines`` to ``path`` in one ``write`` (O_APPEND, under an exclusive ``flock`` of the file)."""
    data = "".join(ln + "\n" for ln in lines).encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
        except (ImportError, OSError):
            pass
        n = os.write(fd, data)
        if n != len(data):  # a short write to a regular file: disk full
            raise OSError(f"short write to {path} ({n} of {len(data)} bytes)")
    finally:
        os.close(fd)  # closing releases the flock


@state.on_reset
def forget() -> None:
    """Forget which signatures this process has written."""
    with _lock:
        _written.clear()


# ---- reading -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Manifest:
    """A manifest file's distinct signatures, in the order first recorded."""

    path: str
    records: tuple[dict[str, Any], ...]
    lines: tuple[str, ...]

    @property
    def digest(self) -> str:
        """SHA-256 over the sorted distinct canonical lines: the same signatures give the same digest,
        whatever the order or the number of processes that recorded them."""
        return hashlib.sha256("".join(ln + "\n" for ln in sorted(self.lines)).encode()).hexdigest()

    def ops(self) -> list[str]:
        return sorted({r["op"] for r in self.records})

    def __len__(self):
        return len(self.records)


def read(path: str | os.PathLike) -> Manifest:
    """Read a manifest (``ConfigError`` for an unreadable file or a malformed line, naming the line)."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read manifest {path}: {e.strerror or e}") from None
    records, lines, seen_lines = [], [], set()
    for n, raw in enumerate(text.splitlines(), 1):
        raw = raw.strip()
        if not raw or raw.startswith("#"):
            continue
        try:
            rec = json.loads(raw)
            if not isinstance(rec, dict) or not isinstance(rec.get("op"), str) or not isinstance(rec.get("args"), dict):
                raise ValueError("expected an object with 'op' (a string) and 'args' (an object)")
        except ValueError as e:
            raise ConfigError(f"{path}:{n}: not a manifest line ({e}); lines are written by JITKERN_RECORD or "
                              f"'jitkern record'") from None
        canon = line(rec)
        if canon in seen_lines:
            continue
        seen_lines.add(canon)
        records.append(rec)
        lines.append(canon)
    log.debug("jitkern: manifest %s: %d signatures", path, len(records))
    return Manifest(str(path), tuple(records), tuple(lines))


def describe(record: Mapping[str, Any]) -> str:
    """A short human form of a signature: ``rms_norm(x=bfloat16[16,4096], residual=None, ...)``; strides
    are shown where they are not the contiguous ones: ``b=float16[64,32]@(1,64)``."""
    parts = []
    for name, v in record["args"].items():
        if isinstance(v, dict) and "shape" in v:
            shape = ",".join(map(str, v["shape"]))
            contiguous = v["stride"] == _contiguous(v["shape"])
            stride = "" if contiguous else "@(" + ",".join(map(str, v["stride"])) + ")"
            parts.append(f"{name}={v['dtype']}[{shape}]{stride}")
        else:
            parts.append(f"{name}={_decode_value(v)!r}")
    return f"{record['op']}(" + ", ".join(parts) + ")"


def _contiguous(shape) -> list[int]:
    out, acc = [], 1
    for s in reversed(shape):
        out.append(acc)
        acc *= max(1, s)
    return out[::-1]


# ---- rebuilding a call ---------------------------------------------------------------------------
def _decode_value(v):
    if isinstance(v, dict):
        if set(v) == {"tuple"}:
            return tuple(_decode_value(x) for x in v["tuple"])
        if set(v) == {"dtype"}:
            import torch

            return getattr(torch, v["dtype"])
    if isinstance(v, list):
        return [_decode_value(x) for x in v]
    return v


def _scalar_value(sc, default):
    """A value for a per-call scalar: its default if that is a number in range, else one in its range."""
    lo = -float("inf") if sc.min is None else sc.min
    hi = float("inf") if sc.max is None else sc.max
    for v in (default, 1, sc.min, sc.max, 0):
        try:
            c = sc.type(v)
        except (TypeError, ValueError):
            continue
        if lo <= c <= hi:
            return c
    return sc.type(lo)


def meta_args(spec, names, tensors, record: Mapping[str, Any], device: str = "meta") -> tuple:
    """The recorded call as arguments in parameter order: tensors on ``device`` (default ``meta``: no
    memory, no GPU) with the recorded dtype, shape and strides; per-call scalars take their default
    (or a value within their declared range). ``ConfigError`` if the record does not fit the op."""
    import inspect

    import torch

    params = inspect.signature(spec.fn).parameters
    given = record.get("args", {})
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ConfigError(f"manifest signature {describe(record)} names {unknown}, which {spec.name} does not take "
                          f"(was the manifest recorded with another version of the op?)")
    out = []
    for i, name in enumerate(names):
        if name in spec.scalars:  # not in the signature: any value the op accepts plans the same
            out.append(_scalar_value(spec.scalars[name], params[name].default))
            continue
        if name not in given:
            raise ConfigError(f"manifest signature {describe(record)} lacks argument {name!r} of {spec.name}")
        v = given[name]
        if i in tensors:
            if v is None:
                out.append(None)
                continue
            try:
                dtype = getattr(torch, v["dtype"])
                if not isinstance(dtype, torch.dtype):
                    raise TypeError(v["dtype"])
                out.append(torch.empty_strided(tuple(v["shape"]), tuple(v["stride"]), dtype=dtype, device=device))
            except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
                raise ConfigError(f"manifest signature of {spec.name}: argument {name!r} = {v!r} is not a tensor "
                                  f"description ({type(e).__name__}: {e})") from None
        else:
            out.append(_decode_value(v))
    return tuple(out)


__all__ = ["ENV", "Manifest", "seen", "append", "read", "describe", "meta_args", "encode", "line"]
