"""Redzone debug mode (``JITKERN_DEBUG=redzone``): catch a kernel writing outside its buffers.

With the mode on, every buffer an op's contract declares (see ``jitkern.contracts``) is placed
between guard bands of ``GUARD_BYTES`` filled with the byte ``SENTINEL``; a buffer whose kernel
addresses rows through a stride argument (``row_guard``) also gets a guard after every row. A
caller's own ``out=``/workspace tensor is shadowed: copied into a guarded buffer before the launch
and copied back after the check. After the launch jitkern synchronizes the device and compares
every band with the sentinel; a changed byte raises ``RedzoneError`` naming the op, the variant,
the buffer and the offset of the first damaged byte (past the end of the buffer, before its start,
or past the end of a row).

A store that writes exactly the sentinel byte pattern is not seen; any other value is. An overflow
longer than the band runs past it into memory nobody owns (the band still reports it, if the process
survives): ``JITKERN_REDZONE_BYTES`` widens the bands to hunt a large overflow (seed 004 wrote 16x
its buffer).
Off (the default) none of this runs: ``enabled()`` is one environment lookup per op call.
The mode synchronizes after every launch, so it is for debugging runs, not for CUDA-graph capture.
JITKERN_DEBUG is a comma-separated list of debug switches; ``redzone`` is the one read here.
"""
from __future__ import annotations

import math

from . import settings
from .errors import RedzoneError
from .logs import log

#: Guard before and after every buffer (>= the 512 B overshoot of seed 001; keeps 256 B alignment).
GUARD_BYTES = 1024
#: Guard after every row of a row-guarded buffer (at least, rounded so rows stay 16 B aligned).
ROW_GUARD_BYTES = 64
SENTINEL = 0xA5


def enabled() -> bool:
    """Whether JITKERN_DEBUG lists ``redzone`` (read on every call, so changes apply at once; the
    registry's read is sub-microsecond)."""
    return "redzone" in settings.get("debug")


def guard_bytes() -> int:
    """Band size: ``JITKERN_REDZONE_BYTES`` (rounded up to 256) or ``GUARD_BYTES``."""
    n = settings.get("redzone_bytes")
    return -(-n // 256) * 256


def session(op: str) -> "Session":
    return Session(op)


class _Guarded:
    __slots__ = ("name", "base", "body", "nbytes", "rows", "row_bytes", "pitch")

    def __init__(self, name, base, body, nbytes, rows=0, row_bytes=0, pitch=0):
        self.name, self.base, self.body, self.nbytes = name, base, body, nbytes
        self.rows, self.row_bytes, self.pitch = rows, row_bytes, pitch


class Session:
    """The guarded buffers of one op call."""

    def __init__(self, op: str):
        self.op = op
        self.band = guard_bytes()
        self.guarded: list[_Guarded] = []
        self.shadows: list[tuple[str, object, object]] = []  # (name, caller's tensor, guarded copy)

    def allocate(self, b, shape, dtype, device):
        import torch

        el = torch.empty((), dtype=dtype).element_size()
        if b.row_guard and len(shape) >= 2 and math.prod(shape):
            cols = shape[-1]
            rows = math.prod(shape[:-1])
            pad = -(-ROW_GUARD_BYTES // el)
            while (cols + pad) % 16:  # row stride a multiple of 16 elements: kernels stay specialised
                pad += 1
            pitch = (cols + pad) * el
            nbytes = rows * pitch
            base = torch.full((self.band * 2 + nbytes,), SENTINEL, dtype=torch.uint8, device=device)
            grid = base[self.band:self.band + nbytes].view(dtype).view(rows, cols + pad)
            body = grid[:, :cols]
            if b.init == "zero":
                body.zero_()
            body = body.view(*shape[:-1], cols) if len(shape) > 2 else body
            g = _Guarded(b.name, base, body, nbytes, rows, cols * el, pitch)
        else:
            nbytes = math.prod(shape) * el
            base = torch.full((self.band * 2 + nbytes,), SENTINEL, dtype=torch.uint8, device=device)
            body = base[self.band:self.band + nbytes].view(dtype).view(shape)
            if b.init == "zero":
                body.zero_()
            g = _Guarded(b.name, base, body, nbytes)
        self.guarded.append(g)
        return body

    def shadow(self, b, t):
        body = self.allocate(b, tuple(t.shape), t.dtype, t.device)
        body.copy_(t)
        self.shadows.append((b.name, t, body))
        return body

    def _hits(self, g: _Guarded):
        """(offset, row) of the first damaged byte of ``g``, or None."""
        u8 = g.base
        head = (u8[:self.band] != SENTINEL).nonzero()
        tail = (u8[self.band + g.nbytes:] != SENTINEL).nonzero()
        if g.rows:
            pads = u8[self.band:self.band + g.nbytes].view(g.rows, g.pitch)[:, g.row_bytes:]
            bad = (pads != SENTINEL).nonzero()
            if bad.numel():
                r, c = (int(x) for x in bad[0])
                return c, r
        if head.numel():
            return int(head[0]) - self.band, None
        if tail.numel():
            return int(tail[0]), None
        return None

    def finish(self, variant, user) -> None:
        if not self.guarded:
            return
        import torch

        dev = self.guarded[0].base.device
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        hits = []
        for g in self.guarded:
            h = self._hits(g)
            if h is not None:
                hits.append((g, *h))
        if hits:
            g, off, row = hits[0]
            where = (f"+{off} past the end of row {row} (rows are {g.row_bytes} bytes)" if row is not None
                     else f"+{off} past the end of the buffer ({g.nbytes} bytes)" if off >= 0
                     else f"{off}, before the start of the buffer")
            others = "".join(f"; buffer {h[0].name!r} was hit too" for h in hits[1:])
            msg = (f"redzone: {self.op} ({variant or 'unknown variant'}) wrote outside buffer {g.name!r}: first "
                   f"damaged byte at offset {where}{others}. A store in the kernel lacks a bounds mask or the "
                   f"buffer contract is smaller than what the kernel writes.")
            log.error("jitkern: %s", msg)
            raise RedzoneError(msg, op=self.op, variant=variant, buffer=g.name, offset=off, row=row)
        for _, t, body in self.shadows:
            t.copy_(body)
