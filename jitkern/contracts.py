"""Buffer contracts: what a kernel writes, declared once beside its template.

A kernel's contract lists every buffer it writes (outputs, workspaces, scratch) with its shape and
dtype as functions of the launch's *dims*: plain numbers the op function derives from its real
inputs and capacities (tokens, sorted-token count, KV-cache capacity ...), never from a model's
theoretical maximum. jitkern allocates each buffer from the contract, or checks a caller's tensor
against it before the launch (too small, wrong dtype, wrong device or layout -> ``BufferError``
naming the buffer, the expected and the given size). Serving engines that pre-allocate (CUDA
graphs) ask the same contract for the sizes: ``contract.layout(**dims)`` / ``contract.nbytes(**dims)``.

Under ``JITKERN_DEBUG=redzone`` every buffer is placed inside a guard band (see ``jitkern.redzone``)
and checked after the launch. Off, preparing buffers costs a loop over the contract and nothing else.

An op uses a contract like this::

    bufs = CONTRACT.prepare(x.device, dict(tokens=t, n=n, dtype=x.dtype), out=out)
    if t == 0:
        return bufs.result("out")        # empty work: nothing launched
    k[grid](x, bufs["out"], ...)
    bufs.finish(k)                       # redzone: synchronize, check the guard bands
    return bufs.result("out")

A call whose caller passes every output (the serving hot path, e.g. inside a CUDA graph) need not
go through ``prepare`` at all: an output's shape, strides, dtype and device are part of the call
signature, so the op's plan checks given outputs once per signature (``contract.check_outputs``)
and the op calls its dispatcher directly while redzone mode is off::

    if out is not None and not redzone.enabled():
        _dispatch(x, n, out)             # the plan checked out against the contract
        return out

Imports torch (only op modules use it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Mapping

import torch

from . import redzone
from .errors import BufferError, SpecError

ROLES = ("output", "workspace", "scratch")
INITS = ("empty", "zero")


def _dt(d) -> str:
    return str(d).replace("torch.", "")


@dataclass(frozen=True)
class Buffer:
    """One buffer a kernel writes.

    shape:     ``shape(dims) -> tuple[int, ...]``; ``dims`` is a namespace of the launch's numbers
    dtype:     a torch dtype, or ``dtype(dims) -> torch dtype``
    role:      "output" (returned to the caller; a given ``out=`` must match the shape exactly),
               "workspace" or "scratch" (internal; a given tensor may be larger, it is used from its
               start, and must be contiguous)
    init:      "empty" or "zero" (the kernel accumulates into it)
    row_guard: the kernel addresses rows of this buffer through a row-stride argument, so redzone
               mode may pad every row with its own guard (catches a store past a row end that
               lands in the next row, as in seed 001)
    """

    name: str
    shape: Callable[[Any], tuple]
    dtype: Any
    role: str = "output"
    init: str = "empty"
    row_guard: bool = False
    doc: str = ""

    def __post_init__(self):
        if self.role not in ROLES:
            raise SpecError(f"buffer {self.name!r}: role {self.role!r} is not one of {ROLES}")
        if self.init not in INITS:
            raise SpecError(f"buffer {self.name!r}: init {self.init!r} is not one of {INITS}")

    def resolve(self, dims) -> tuple[tuple[int, ...], torch.dtype]:
        shape = tuple(map(int, self.shape(dims)))
        if shape and min(shape) < 0:
            raise SpecError(f"buffer {self.name!r}: contract gives a negative size {shape}")
        dtype = self.dtype if isinstance(self.dtype, torch.dtype) else self.dtype(dims)
        return shape, dtype


@dataclass(frozen=True)
class Contract:
    """The buffers one kernel (or one op's chain of kernels) writes."""

    op: str
    buffers: tuple[Buffer, ...]

    def __post_init__(self):
        names = [b.name for b in self.buffers]
        if len(set(names)) != len(names):
            raise SpecError(f"contract of {self.op!r} has duplicate buffer names: {names}")
        object.__setattr__(self, "_names", frozenset(names))
        # the launch path, precomputed: (buffer, name, is an output, allocator)
        object.__setattr__(self, "_fast", tuple(
            (b, b.name, b.role == "output", torch.zeros if b.init == "zero" else torch.empty) for b in self.buffers))
        # off redzone mode, per process: dims -> {buffer: (shape, dtype)}, and the caller outputs that passed
        # check() keyed by everything check() looks at (an op's hot path meets the same few again and again)
        object.__setattr__(self, "_layouts", {})
        object.__setattr__(self, "_passed", set())

    def layout(self, **dims) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """``{buffer: (shape, dtype)}`` for these dims."""
        d = SimpleNamespace(**dims)
        return {b.name: b.resolve(d) for b in self.buffers}

    def nbytes(self, **dims) -> dict[str, int]:
        """``{buffer: size in bytes}`` for these dims (what a caller pre-allocates)."""
        return {n: math.prod(s) * torch.empty((), dtype=t).element_size() for n, (s, t) in self.layout(**dims).items()}

    def prepare(self, device, dims: Mapping[str, Any], **given) -> "Buffers":
        """Allocate every buffer, or check the caller's (``given[name]``, ``None`` = allocate).

        This is on every launch: off redzone mode it is a loop of ``torch.empty`` calls and dict lookups."""
        if given and not self._names.issuperset(given):
            unknown = sorted(set(given) - self._names)
            raise SpecError(f"{self.op}: contract has no buffer {unknown[0]!r}; buffers: "
                            f"{', '.join(b.name for b in self.buffers)}")
        if not redzone.enabled():
            return self._prepare_plain(device, dims, given)
        d = SimpleNamespace(**dims)
        zone = redzone.session(self.op)
        tensors: dict[str, torch.Tensor] = {}
        user: dict[str, torch.Tensor] = {}
        for b, *_ in self._fast:
            t = given.get(b.name)
            shape, dtype = b.resolve(d)
            if t is not None:
                t = check(self.op, b, t, shape, dtype, device)
                user[b.name] = t
                t = zone.shadow(b, t)
            else:
                t = zone.allocate(b, shape, dtype, device)
            tensors[b.name] = t
        return Buffers(tensors, user, zone)

    def check_outputs(self, device, dims: Mapping[str, Any], **given) -> None:
        """Check the caller's output tensors (``given[name]``; None: not given) against the contract,
        as ``prepare`` does, allocating nothing: for an op's plan, once per call signature."""
        d = SimpleNamespace(**dims)
        for b in self.buffers:
            t = given.get(b.name)
            if t is None:
                continue
            if b.role != "output":
                raise SpecError(f"{self.op}: check_outputs checks outputs; {b.name!r} is a {b.role} buffer, "
                                f"which prepare views and initialises on every call")
            shape, dtype = b.resolve(d)
            check(self.op, b, t, shape, dtype, device)

    def _prepare_plain(self, device, dims: Mapping[str, Any], given: Mapping[str, Any]) -> "Buffers":
        """``prepare`` off redzone mode: the layout of these dims and the verdict on a caller's output
        tensor are remembered (both are pure functions of what their keys hold), so a hot-path call
        with ``out=`` given costs a few dict lookups; workspaces and scratch given are checked (and
        viewed, zeroed) on every call."""
        try:
            dkey = tuple(dims.items())
            layout = self._layouts.get(dkey)
        except TypeError:  # an unhashable dim: nothing remembered
            dkey, layout = None, None
        if layout is None:
            d = SimpleNamespace(**dims)
            layout = {b.name: b.resolve(d) for b in self.buffers}
            if dkey is not None and len(self._layouts) < 4096:
                self._layouts[dkey] = layout
        tensors: dict[str, torch.Tensor] = {}
        user: dict[str, torch.Tensor] = {}
        passed = self._passed
        for b, name, output, alloc in self._fast:
            t = given.get(name)
            shape, dtype = layout[name]
            if t is None:
                tensors[name] = alloc(shape, dtype=dtype, device=device)
                continue
            if output and dkey is not None:
                try:
                    ck = (name, dkey, device, t.shape, t.stride(), t.dtype, t.device)
                except AttributeError:  # not a tensor: check() says so
                    ck = None
                if ck is None or ck not in passed:
                    t = check(self.op, b, t, shape, dtype, device)
                    if ck is not None and len(passed) < 4096:
                        passed.add(ck)
            else:
                t = check(self.op, b, t, shape, dtype, device)
            user[name] = t
            tensors[name] = t
        return Buffers(tensors, user, None)


class Buffers(dict):
    """The tensors to launch with, by buffer name."""

    __slots__ = ("_user", "_zone")

    def __init__(self, tensors, user, zone):
        super().__init__(tensors)
        self._user = user
        self._zone = zone

    def finish(self, kernel=None) -> None:
        """After the launch(es): in redzone mode synchronize, check every guard band, copy shadowed
        results back to the caller's tensors; raise ``RedzoneError`` on a hit. Otherwise nothing."""
        if self._zone is not None:
            self._zone.finish(getattr(kernel, "name", kernel), self._user)

    def result(self, name: str):
        """The tensor to hand back for ``name``: the caller's own if they gave one."""
        t = self._user.get(name)
        if t is not None:
            return t
        t = self[name]
        if self._zone is not None and not t.is_contiguous():
            return t.contiguous()  # row-guarded in redzone mode: hand back a plain tensor
        return t


def check(op: str, b: Buffer, t, shape, dtype, device):
    """A caller-provided tensor for buffer ``b``: the right kind, or a ``BufferError`` that says so."""
    what = f"{op}: {b.role} buffer {b.name!r}"
    want = f"{shape} {_dt(dtype)} on {device}"
    if not isinstance(t, torch.Tensor):
        raise BufferError(f"{what} must be a torch.Tensor of {want}, got {type(t).__name__}")
    if t.dtype != dtype:
        raise BufferError(f"{what} has dtype {_dt(t.dtype)}; the kernel writes {_dt(dtype)} (expected {want})")
    if t.device != torch.device(device):
        raise BufferError(f"{what} is on {t.device}; expected {want}")
    need = math.prod(shape)
    if b.role == "output":
        if tuple(t.shape) != shape:
            small = " (too small)" if t.numel() < need else ""
            raise BufferError(f"{what} has shape {tuple(t.shape)}{small}; expected {shape} "
                              f"({need * t.element_size()} bytes)")
        if need and not t.is_contiguous():
            raise BufferError(f"{what} must be contiguous (strides {tuple(t.stride())} given); "
                              f"pass a contiguous tensor of {want}")
        return t
    if t.numel() < need:
        raise BufferError(f"{what} is too small: {t.numel()} elements ({t.numel() * t.element_size()} bytes) "
                          f"given, the kernel writes {need} ({need * t.element_size()} bytes, shape {shape}); "
                          f"size it with the op's contract (.nbytes(...))")
    if not t.is_contiguous():
        raise BufferError(f"{what} must be contiguous (strides {tuple(t.stride())} given)")
    view = t.reshape(-1)[:need].view(shape)
    if b.init == "zero":
        view.zero_()
    return view
