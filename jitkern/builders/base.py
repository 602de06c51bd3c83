"""What every builder offers, and what every loaded kernel is.

A builder (one per variant kind: ``jitkern.builders.get(kind)``) has

- ``fingerprint(arch) -> dict``: what identifies its toolchain (part of every key it builds);
- ``build(job) -> (files, meta)``: the files of the job's cache entry and what to record about them;
- ``load(entry, job) -> Kernel``: a launchable kernel from a verified entry;
- optionally ``probe(arch) -> str | None``: why it cannot build for ``arch`` here (None: it can try).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol


class Builder(Protocol):
    def fingerprint(self, arch) -> dict[str, Any]: ...

    def build(self, job) -> tuple[dict[str, bytes], dict[str, Any]]: ...

    def load(self, entry, job) -> "Kernel": ...


@dataclass(frozen=True)
class DirectLaunch:
    """A kernel as ``jitkern.fastcall``'s C hot path launches it (see ``fastcall.c``).

    ``how``: ``"triton"``, through Triton's generated C ``launch`` (``extra`` = ``(c_launch,
    fixed)``: ``c_launch(gx, gy, gz, stream(device), function, *fixed, *kernel_args)``), or
    ``"driver"``, through the driver's ``cuLaunchKernel``/``hipModuleLaunchKernel`` itself (``extra``
    = ``(address of that function, block, shared_bytes, types, failed, trailing, scratch)``: ``types``
    one pack code per kernel argument and trailing constant, ``P`` for pointers; ``failed(code)``
    raises the launch error; ``trailing``: constants after the call's arguments; ``scratch``: None or
    ``(bytes per program, alloc)``, a buffer made per launch for the first trailing slot)."""

    how: str
    function: int
    stream: Callable[[int], int]
    device: int
    extra: tuple


def addresses(args, pointer_positions) -> list:
    """``args`` with the tensors at ``pointer_positions`` replaced by their device addresses (integers
    pass as they are)."""
    a = list(args)
    for i in pointer_positions:
        if type(a[i]) is not int:
            a[i] = a[i].data_ptr()
    return a


class Kernel:
    """A loaded kernel.

    ``kernel[grid](*args)`` launches it; ``kernel.run(gx, gy, gz, *args)`` is the same launch without
    building a grid tuple and a closure per call (the dispatcher's hot path). A grid with a zero
    dimension is a no-op, never a launch. ``takes_addresses``: pointer arguments may be passed as
    integer device addresses (``t.data_ptr()``), which skips the driver's per-pointer query.
    """

    takes_addresses = False
    #: ``DirectLaunch``: how ``jitkern.fastcall`` launches this kernel from C, without Python frames;
    #: None: the dispatcher launches through ``run``.
    direct: "DirectLaunch | None" = None

    def __init__(self, entry, job):
        self.entry = entry
        self.job = job
        self.key = entry.key
        self.name = job.describe()

    def run(self, gx: int, gy: int, gz: int, *args):
        if gx > 0 and gy > 0 and gz > 0:
            self.launch((gx, gy, gz), *args)

    def __getitem__(self, grid):
        g = tuple(int(x) for x in grid) + (1,) * (3 - len(grid))
        if g[0] <= 0 or g[1] <= 0 or g[2] <= 0:
            return _no_launch
        return lambda *args: self.launch(g, *args)

    def launch(self, grid3, *args):  # pragma: no cover - overridden
        raise NotImplementedError


def _no_launch(*args):
    return None
