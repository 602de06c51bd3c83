"""Stage 5 of the pipeline: the framework's fast path from an op call to its kernel launches.

An op function calls its dispatcher with its arguments in parameter order::

    _dispatch = jitkern.dispatcher(SPEC)        # once, next to the spec

    def my_op(x: torch.Tensor, eps: float = 1e-6, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = torch.empty_like(x) if out is None else out
        _dispatch(x, eps, out)
        return out

The first call with a new *signature* — the type, shape, strides, dtype and device of every tensor
argument and the value of every other argument, except the per-call ``OpSpec.scalars`` — runs the
op's ``plan(call)`` (validation and the decision: candidates, each a list of ``Launch``es), applies
the selection arch's rules to it, loads the kernels (``jitkern.runtime.kernel``, through the cache)
and routes over the candidates (``jitkern.fallback``). The decision is kept per signature, so a
later call costs: computing the signature, one dict lookup, reading the tensors' addresses, checking
their 16-byte alignment and the per-call scalars, and Triton's C launch with integer addresses.

Under ``JITKERN_DEBUG=checks`` (or ``redzone``) every call of an op that declares
``OpSpec.debug_checks`` first runs that check of its tables' contents (``jitkern.table_checks``).
The mode is read when a signature is decided: the memo then holds the checking function in front of
the route, so with the mode off the hot path has no extra step.
"""
from __future__ import annotations

import functools
import inspect
import operator
import threading
import typing
from dataclasses import replace
from typing import Sequence

from . import constraints, counters, fastcall, manifest, state, table_checks, tuning
from .arch import ARCHES, Arch
from .errors import ArgumentError, ConfigError, DeviceError, LayoutError, SpecError
from .fallback import Route
from . import runtime
from .runtime import arches_for
from .spec import Candidate, In, Launch, OpSpec, Scalar, Scratch, Zeroed


class Call:
    """What ``OpSpec.plan`` receives for one call signature.

    ``args``: the op's arguments in parameter order (also by name: ``call["x"]``). ``arch``: the
    arch configurations are chosen for (``jitkern.runtime.select_arch``). ``device``: where the
    tensors are. ``tiles(candidates)``: the tile candidates as they apply on ``arch``.
    """

    __slots__ = ("spec", "args", "arch", "device", "_names", "tiled", "tuned")

    def __init__(self, spec: OpSpec, args: tuple, arch: Arch, device, names: Sequence[str], tuned: bool = True):
        self.spec, self.args, self.arch, self.device, self._names = spec, args, arch, device, names
        self.tiled = False
        self.tuned = tuned  # False: tuned winners are not put first (tools comparing the untuned order)

    def __getitem__(self, name: str):
        return self.args[self._names.index(name)]

    def tiles(self, candidates: Sequence[dict], *, dtype: str | None = None,
              bucket: str | Sequence[str] | None = None) -> list[dict]:
        """``candidates`` (tile parameter dicts, preferred first) as they apply on ``self.arch``:
        the tuned winner for ``(dtype, bucket)`` first if one is recorded (``jitkern.tuning``; with
        several buckets, the first that has one), then arch pins and ``JITKERN_<OP>_<PARAM>``
        overrides set, rule breakers dropped, duplicates removed (``jitkern.constraints.apply``).
        Raises ``ConfigError`` for a bad override or when nothing is left."""
        self.tiled = True
        listed = [dict(c) for c in candidates]
        if self.tuned and dtype is not None and bucket is not None and listed:
            for b in ((bucket,) if isinstance(bucket, str) else bucket):
                won = tuning.lookup(self.arch.name, self.spec.name, dtype, b)
                if won:  # the winner's tile, with the candidates' other keys (e.g. the dtype rules check)
                    rest = {k: v for k, v in listed[0].items() if k not in self.spec.tunables}
                    listed.insert(0, {**rest, **won})
                    break
        return constraints.apply(self.arch.name, self.spec.name, listed, self.spec.tunables)


def _tensor_annotation(annotation) -> str | None:
    """``"required"`` for ``torch.Tensor``, ``"optional"`` for ``Optional[torch.Tensor]``, else None."""
    import torch

    if annotation is torch.Tensor:
        return "required"
    if typing.get_origin(annotation) is typing.Union:
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        if rest == [torch.Tensor]:
            return "optional"
    return None


def _misaligned(spec: OpSpec, names, args, positions):
    for i in positions:
        t = args[i]
        if t.data_ptr() % 16:
            raise LayoutError(f"{spec.name}: {names[i]} is not 16-byte aligned (address {t.data_ptr():#x}, "
                              f"storage offset {t.storage_offset()}); pass {names[i]}.clone() or a tensor "
                              f"that starts at an aligned address")


_NEW = object()  # a signature not decided yet


class _Memo(dict):
    """The dispatcher's memo (signature -> what runs it). ``fast`` is the C path's cache of it by
    compact signature (``jitkern.fastcall``: compact key -> memo value); every change of the memo
    empties it, so the C path never runs a decision the memo no longer holds."""

    __slots__ = ("fast",)

    def __init__(self):
        super().__init__()
        self.fast: dict = {}

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.fast.clear()

    def __delitem__(self, key):
        super().__delitem__(key)
        self.fast.clear()

    def clear(self):
        super().clear()
        self.fast.clear()

    def _changed(self, *a, **kw):  # noqa: ARG002
        raise TypeError("the dispatcher's memo changes only by item assignment, deletion and clear()")

    pop = popitem = setdefault = update = __ior__ = _changed


class Dispatcher:
    """Runs ``spec``'s calls: per signature, the op's plan once; then the decided launches."""

    def __init__(self, spec: OpSpec):
        if spec.plan is None:
            raise SpecError(f"op {spec.name!r} declares no plan: give OpSpec(plan=...) a function mapping a "
                            f"call signature to candidates (see jitkern.dispatch)")
        self.spec = spec
        try:
            sig = inspect.signature(spec.fn, eval_str=True)
        except Exception as e:
            raise SpecError(f"op {spec.name!r}: the annotations of {spec.fn.__qualname__} cannot be resolved "
                            f"({type(e).__name__}: {e}); annotate tensors with torch.Tensor or "
                            f"Optional[torch.Tensor]") from e
        self.names = tuple(sig.parameters)
        unknown = [n for n in spec.scalars if n not in self.names]
        if unknown:
            raise SpecError(f"op {spec.name!r}: scalars names {unknown}, which are not parameters of "
                            f"{spec.fn.__qualname__}{sig}")
        kinds = [_tensor_annotation(p.annotation) for p in sig.parameters.values()]
        self.tensors = tuple(i for i, k in enumerate(kinds) if k)
        self.inplace = tuple(i for i, n in enumerate(self.names) if n in spec.mutates)
        self._required = tuple(i for i, k in enumerate(kinds) if k == "required")
        self._optional = tuple(i for i, k in enumerate(kinds) if k == "optional")
        self._static = tuple(i for i, k in enumerate(kinds) if not k and self.names[i] not in spec.scalars)
        self._scalars = tuple((self.names.index(n), s) for n, s in spec.scalars.items())
        self._check_scalars = _scalar_checker(spec.name, self.names, self._scalars)
        self._memo = _Memo()  # signature -> Route, or once it has settled its fast path; None: no launch
        self._routes: dict = {}  # signature -> Route
        self._lock = threading.Lock()
        self.key = self._key_function()
        self._call = self._call_python  # the C hot path once a candidate launches through it (jitkern.fastcall)

    # ---- the signature -------------------------------------------------------------------------
    def _key_function(self):
        """``key(args)``: the call signature (a per-tensor tuple in a list comprehension is the
        cheapest way CPython has to read five attributes of several tensors). ``jitkern.fastcall``
        builds the same tuple in C."""
        tpos, static = self.tensors, self._static
        get_t = operator.itemgetter(*tpos) if len(tpos) > 1 else (lambda a, i=tpos[0]: (a[i],)) if tpos else None
        if get_t is None:
            return lambda args: tuple(args[i] for i in static)
        if not static:
            return lambda args: tuple([None if t is None else (type(t), t.shape, t.stride(), t.dtype, t.device)
                                       for t in get_t(args)])
        get_s = operator.itemgetter(*static) if len(static) > 1 else (lambda a, i=static[0]: (a[i],))
        return lambda args: (*[None if t is None else (type(t), t.shape, t.stride(), t.dtype, t.device)
                               for t in get_t(args)], *get_s(args))

    # ---- the call ------------------------------------------------------------------------------
    def __call__(self, *args):
        """Run the op's decision for these arguments; returns the name of the candidate that ran
        (None: nothing to launch)."""
        return self._call(args)

    def _call_python(self, args: tuple):
        try:
            route = self._memo.get(self.key(args), _NEW)
        except (AttributeError, TypeError, IndexError):  # not tensors where tensors go: the plan says why
            route = _NEW
        if route is _NEW:
            route = self._decide(args)
        if route is not None:
            return route(args)
        return None

    @property
    def signatures(self) -> int:
        """How many call signatures this process has decided for the op."""
        return len(self._memo)

    def active_configs(self) -> list:
        """The configs each decided signature runs (its active candidate's launches), in decision order."""
        out = []
        for r in list(self._routes.values()):
            c = r.active_candidate if r is not None else None
            if c is not None:
                out.extend(la.config for la in c.launches)
        return out

    def describe_ran(self, name: str | None, *args) -> str:
        """The configs candidate ``name`` of these arguments' route launches, in words (redzone reports)."""
        route = self.route_for(*args)
        for c in getattr(route, "candidates", ()):
            if c.name == name:
                return " + ".join(la.config.describe() for la in c.launches) or name
        return str(name)

    def route_for(self, *args) -> Route | None:
        """The route these arguments' signature runs on (deciding it if new); None: nothing to launch."""
        try:
            key = self.key(args)
            if key in self._routes:
                return self._routes[key]
        except (AttributeError, TypeError, IndexError):
            pass
        return self._settle(args)[0]

    def _decide(self, args: tuple):
        """The slow path: a new signature (or arguments that cannot be keyed: the plan says why).
        Returns what runs the call: the route, behind the op's table checks in debug-checks mode."""
        return self._settle(args)[1]

    def _call_new(self, args: tuple):
        """The C hot path's way back for a signature it has no decision for."""
        run = self._decide(args)
        return None if run is None else run(args)

    def _use_c_path(self, fc) -> None:
        """From now on, calls go through the C ``Dispatch`` over this dispatcher's memo."""
        if self._call == self._call_python:
            fastcall.use_torch_signatures()  # tensors read in C++ once its reader is loaded
            self._call = fc.Dispatch(self.tensors, self._static, self._memo, self._call_new, self._memo.fast)

    def _settle(self, args: tuple):
        """``(route, run)`` for these arguments' signature, decided and memoised if new."""
        if len(args) != len(self.names):
            raise SpecError(f"{self.spec.name}: the dispatcher takes all {len(self.names)} arguments of "
                            f"{self.spec.fn.__qualname__} in order ({', '.join(self.names)}), got {len(args)}")
        try:
            key = self.key(args)
            hash(key)
        except (AttributeError, TypeError):
            key = None
        with self._lock:
            if key is not None and key in self._routes:
                return self._routes[key], self._memo[key]
            device = self._device(args)
            try:
                select, _ = arches_for(device)
            except DeviceError:
                if getattr(device, "type", None) == "meta":  # never runs; but bad arguments are said first
                    self.candidates(args, ARCHES["cpu"], device)
                raise
            manifest.seen(self, args)  # JITKERN_RECORD: what was called (arch-independent)
            candidates = self.candidates(args, select, device)
            route = run = None
            if candidates is not None:
                route = run = Route(self.spec, candidates, device, self.bind, self.inplace)
                if self.spec.debug_checks is not None and table_checks.enabled():  # read once per signature
                    run = self._checked(route, select, device)
                    if key is not None:  # the memo holds the settled fast path behind the checks
                        route.on_fast = lambda fast: self._memo.__setitem__(key, self._checked(fast, select, device))
                elif key is not None:  # once the route has settled, the memo holds its fast path itself
                    route.on_fast = functools.partial(self._memo.__setitem__, key)
            if key is not None:
                self._routes[key] = route
                self._memo[key] = run
            counters.bump("signatures")
        return route, run

    def _checked(self, run, arch: Arch, device):
        """``run`` behind the op's ``debug_checks`` (JITKERN_DEBUG=checks): the tables are checked on
        every call, before anything is launched."""
        spec, names, check = self.spec, self.names, self.spec.debug_checks

        def checked(args):
            counters.bump("table_checks")
            check(Call(spec, args, arch, device, names))
            return run(args)
        return checked

    def _device(self, args):
        for i in self.tensors:
            t = args[i]
            if t is not None and hasattr(t, "device"):
                return t.device
        raise SpecError(f"{self.spec.name}: no tensor argument to take the device from")

    def candidates(self, args: tuple, arch: Arch, device=None, *, tuned: bool = True) -> list[Candidate] | None:
        """The op's plan for these arguments on ``arch``, with the arch's rules applied: candidates
        whose configs break a rule are dropped. None: nothing to launch. Used by the dispatcher,
        and by prebuild (a recorded signature as meta tensors, any arch, no GPU)."""
        spec = self.spec
        self._check_scalars(args)  # before anything is planned or built, as on every later call
        call = Call(spec, args, arch, device, self.names, tuned)
        got = spec.plan(call)
        if got is None:
            return None
        cands = [got] if isinstance(got, Candidate) else list(got)
        if not call.tiled and spec.tunables and constraints.env_overrides(arch.name, spec.name, spec.tunables):
            raise ConfigError(f"{spec.name}: JITKERN_{spec.name.upper()}_* overrides are set, but the op's plan "
                              f"does not choose its tiles through call.tiles(), so they cannot apply")
        kept, dropped = [], []
        for c in cands:
            if not isinstance(c, Candidate):
                raise SpecError(f"{spec.name}: plan() returned {type(c).__name__}; it returns Candidate objects")
            launches = tuple(self._resolve(la, args) for la in c.launches)
            if any(new is not old for new, old in zip(launches, c.launches)):
                c = replace(c, launches=launches)
            bad = [v for la in c.launches for v in constraints.config_violations(arch.name, spec.name, la.config)]
            (dropped if bad else kept).append((c, bad))
        if not kept:
            why = dropped[0][1][0] if dropped else "the plan returned no candidate"
            raise ConfigError(f"{spec.name}: no candidate is allowed on {arch.name} ({why})")
        return [c for c, _ in kept]

    def _resolve(self, launch: Launch, args: tuple) -> Launch:
        """``launch`` with ``In`` references to arguments that are part of the signature (not tensors,
        not per-call scalars) replaced by their values, which cannot change for this signature
        (``launch`` itself where none is)."""
        out, changed = [], False
        for a in launch.args:
            if isinstance(a, In):
                if a.name not in self.names:
                    raise SpecError(f"{self.spec.name}: a launch of {launch.config.describe()} passes In({a.name!r}), "
                                    f"which is not a parameter ({', '.join(self.names)})")
                i = self.names.index(a.name)
                if i in self.tensors and args[i] is None:
                    raise SpecError(f"{self.spec.name}: a launch of {launch.config.describe()} passes "
                                    f"In({a.name!r}), which is None in this call; pass another argument or a constant")
                if i not in self.tensors and a.name not in self.spec.scalars:
                    a, changed = args[i], True
            out.append(a)
        return replace(launch, args=tuple(out)) if changed else launch

    # ---- from loaded kernels to a launch function -----------------------------------------------
    def bind(self, cand: Candidate, kernels: list, device=None):
        """``fire(args) -> cand.name``: the candidate's launches (or its torch function) run.
        ``Scratch`` buffers are allocated on ``device`` for each call and ``Zeroed`` ones looked up
        (kept per stream, see ``jitkern.spec.Zeroed``); both are passed after ``args``."""
        name = cand.name
        if cand.torch is not None:
            fn = cand.torch

            def fire_torch(args):
                fn(*args)
                return name
            return fire_torch
        scratch = {}  # name -> (position after the op's arguments, Scratch | Zeroed)
        for la in cand.launches:
            for a in la.args:
                if isinstance(a, (Scratch, Zeroed)):
                    if a.name not in scratch:
                        scratch[a.name] = (len(self.names) + len(scratch), a)
                    elif scratch[a.name][1] != a:
                        raise SpecError(f"{self.spec.name}: launches of candidate {name!r} name buffer {a.name!r} "
                                        f"twice with different declarations: {scratch[a.name][1]} and {a}")
        prepare = None
        if scratch:
            import torch

            empty = torch.empty
            makers = []
            for _, s in scratch.values():
                if isinstance(s, Zeroed):
                    makers.append(_zeroed_getter(self.spec.name, s, device))
                else:
                    makers.append(lambda shape=s.shape, dtype=s.dtype: empty(shape, dtype=dtype, device=device))

            def prepare(args):
                return (*args, *[make() for make in makers])
        fc = fastcall.module() if kernels and all(getattr(k, "direct", None) is not None for k in kernels) else None
        if fc is not None:  # every launch is a direct GPU launch: the whole candidate runs in C
            launches = [self._c_launch(la, k, scratch) for la, k in zip(cand.launches, kernels)]
            self._use_c_path(fc)
            return fc.Fire(name, [la for la in launches if la is not None], prepare)
        fires = [self._fire(la, k, name, scratch) for la, k in zip(cand.launches, kernels)]
        if prepare is not None:
            def fire_scratch(args):
                full = prepare(args)
                for f in fires:
                    f(full)
                return name
            return fire_scratch
        if len(fires) == 1:
            return fires[0]

        def fire_all(args):
            for f in fires:
                f(args)
            return name
        return fire_all

    def _slots(self, launch: Launch, scratch: dict | None) -> tuple[list, tuple, tuple]:
        """``(slots, tensor positions, (position, Scalar) per scalar)``: per kernel argument, in kernel
        order, ``("t", position)`` a tensor (or scratch buffer) passed by address, ``("s", position)`` a
        per-call scalar, ``("c", value)`` a constant."""
        scalars, slots = dict(self._scalars), []
        for a in launch.args:
            if isinstance(a, In):
                i = self.names.index(a.name)
                slots.append(("s", i) if i in scalars else ("t", i))
            elif isinstance(a, (Scratch, Zeroed)):
                slots.append(("t", scratch[a.name][0]))
            else:
                slots.append(("c", a))
        tpos = tuple(v for k, v in slots if k == "t")
        spos = tuple((v, scalars[v]) for k, v in slots if k == "s")
        return slots, tpos, spos

    def _c_launch(self, launch: Launch, kernel, scratch: dict):
        """One launch as ``jitkern.fastcall``'s ``Fire`` takes it (None: a grid with a zero dimension,
        which launches nothing)."""
        if min(launch.grid) <= 0:
            return None
        spec, names = self.spec, self.names
        slots, tpos, spos = self._slots(launch, scratch)
        scalars = dict(spos)
        c_slots = []
        for k, v in slots:
            if k == "s":
                sc = scalars[v]
                c_slots.append(("s", v, sc.type is int, -float("inf") if sc.min is None else float(sc.min),
                                float("inf") if sc.max is None else float(sc.max)))
            else:
                c_slots.append((k, v))
        d = kernel.direct
        return (d.how, tuple(launch.grid), d.stream, d.device, d.function, c_slots,
                lambda args: _misaligned(spec, names, args, tpos), _scalar_checker(spec.name, names, spos), *d.extra)

    def _fire(self, launch: Launch, kernel, name: str, scratch: dict | None = None):
        """``fire(args)`` for one launch: its constants bound, its ``In`` arguments read per call
        (tensors: their addresses, checked for 16-byte alignment; scalars: checked)."""
        spec, names = self.spec, self.names
        gx, gy, gz = launch.grid
        if gx <= 0 or gy <= 0 or gz <= 0:
            return lambda args: name
        slots, tpos, spos = self._slots(launch, scratch)
        consts = tuple(v for k, v in slots if k == "c")
        # values are gathered as (tensors, constants, scalars): the usual kernel order needs no permutation
        base, seen, order = {"t": 0, "c": len(tpos), "s": len(tpos) + len(consts)}, {"t": 0, "c": 0, "s": 0}, []
        for k, _ in slots:
            order.append(base[k] + seen[k])
            seen[k] += 1
        in_order = order == list(range(len(order)))
        permute = operator.itemgetter(*order) if len(order) > 1 else (lambda v: (v[0],))
        run = kernel.run
        get_t = operator.itemgetter(*tpos) if len(tpos) > 1 else (lambda a, i=tpos[0]: (a[i],)) if tpos else \
            (lambda a: ())
        check = _scalar_checker(spec.name, names, spos)
        reduce, or_ = functools.reduce, operator.or_

        def misaligned(args):
            _misaligned(spec, names, args, tpos)

        if not kernel.takes_addresses:  # the interpreter, Triton's own launcher, C++ kernels: tensors
            def fire(args):
                ts = get_t(args)
                if ts and reduce(or_, [t.data_ptr() for t in ts]) & 15:
                    misaligned(args)
                run(gx, gy, gz, *permute((*ts, *consts, *check(args))))
                return name
        elif not in_order:
            def fire(args):
                ptrs = [t.data_ptr() for t in get_t(args)]
                if ptrs and reduce(or_, ptrs) & 15:
                    misaligned(args)
                run(gx, gy, gz, *permute((*ptrs, *consts, *check(args))))
                return name
        elif spos:
            def fire(args):
                ptrs = [t.data_ptr() for t in get_t(args)]
                if reduce(or_, ptrs) & 15:
                    misaligned(args)
                run(gx, gy, gz, *ptrs, *consts, *check(args))
                return name
        else:
            def fire(args):
                ptrs = [t.data_ptr() for t in get_t(args)]
                if reduce(or_, ptrs) & 15:
                    misaligned(args)
                run(gx, gy, gz, *ptrs, *consts)
                return name
        return fire


def _scalar_checker(op: str, names, spos):
    """``check(args) -> tuple``: the per-call scalars, converted and range-checked."""
    if not spos:
        return lambda args: ()
    items = tuple((i, sc.type, -float("inf") if sc.min is None else sc.min,
                   float("inf") if sc.max is None else sc.max) for i, sc in spos)

    def bad(i, v):
        sc = dict(spos)[i]
        bounds = "".join(f" and at {w} {b:g}" for w, b in (("least", sc.min), ("most", sc.max)) if b is not None)
        raise ArgumentError(f"{op}: {names[i]} must be finite{bounds}, got {v!r}")

    def convert(i, conv, v):
        try:
            return operator.index(v) if conv is int else conv(v)  # an int scalar is never truncated
        except (TypeError, ValueError):
            raise ArgumentError(f"{op}: {names[i]} must be a real number, got {type(v).__name__} {v!r:.60}") from None

    if len(items) == 1:
        ((i, conv, lo, hi),) = items

        def check_one(args):
            v = args[i]
            c = v if type(v) is conv else convert(i, conv, v)
            if not lo <= c <= hi or c - c:  # c - c is NaN (true) for NaN and infinities
                bad(i, v)
            return (c,)
        return check_one

    def check(args):
        out = []
        for i, conv, lo, hi in items:
            v = args[i]
            c = v if type(v) is conv else convert(i, conv, v)
            if not lo <= c <= hi or c - c:
                bad(i, v)
            out.append(c)
        return out

    return check


_zeroed: dict = {}  # (op, Zeroed, device, stream) -> [the kept buffer, zeroed only inside a captured graph]
_zeroed_lock = threading.Lock()


def _zeroed_getter(op: str, z: Zeroed, device):
    """``get() -> tensor``: the kept, once-zeroed buffer ``z`` of ``op`` for the current stream of
    ``device`` (one dict lookup per call once it exists). See ``Zeroed`` for CUDA graphs."""
    import torch

    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        raw_stream = torch._C._cuda_getCurrentRawStream
        stream = lambda: raw_stream(index)  # noqa: E731
        capturing = torch.cuda.is_current_stream_capturing
    else:
        stream = lambda: 0  # noqa: E731  (CPU: launches run in program order)
        capturing = lambda: False  # noqa: E731
    base = (op, z, str(dev))
    mine: dict = {}  # stream -> buffer: this launch's own view of _zeroed (no dataclass hashing per call)

    def get():
        s = stream()
        buf = mine.get(s)
        if buf is not None:
            return buf
        now_capturing = capturing()
        with _zeroed_lock:
            kept = _zeroed.get((*base, s))
            if kept is None:
                kept = _zeroed[(*base, s)] = [_outside_graph_pools(z, dev), True]
            if kept[1]:  # not zeroed outside a graph yet: zero it (a memset node of the graph being captured)
                kept[0].zero_()
                kept[1] = now_capturing
        if not kept[1]:
            mine[s] = kept[0]
        return kept[0]
    return get


def _outside_graph_pools(z: Zeroed, dev):
    """An uninitialised tensor for ``z`` from the ordinary memory pool, even while a CUDA graph is
    being captured or torch.compile's CUDA-graph trees warm up: those route the allocations of their
    stream and thread to the graph's private pool, and the trees refuse a pool that holds a tensor
    they do not know of (a kept buffer outlives the graph). So the allocation runs in a short-lived
    thread of its own, which only allocates (no kernel, no synchronisation)."""
    import torch

    if dev.type != "cuda":
        return torch.empty(z.shape, dtype=z.dtype, device=dev)
    box: list = []

    def allocate():
        try:
            box.append(torch.empty(z.shape, dtype=z.dtype, device=dev))
        except BaseException as e:  # noqa: BLE001  (raised in the caller's thread below)
            box.append(e)
    t = threading.Thread(target=allocate, name="jitkern-zeroed")
    t.start()
    t.join()
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


def zeroed_buffers() -> int:
    """How many ``Zeroed`` buffers this process keeps (all ops, devices and streams)."""
    return len(_zeroed)


_dispatchers: dict = {}
_lock = threading.Lock()


def dispatcher(spec: OpSpec) -> Dispatcher:
    """The dispatcher of ``spec`` (one per spec object)."""
    d = _dispatchers.get(spec.name)
    if d is None or d.spec is not spec:
        with _lock:
            d = _dispatchers.get(spec.name)
            if d is None or d.spec is not spec:
                d = _dispatchers[spec.name] = Dispatcher(spec)
    return d


@state.on_reset
def clear_memory(kernels: bool = True) -> None:
    """Forget every per-signature decision and (``kernels``) loaded kernel: the next calls decide and
    load afresh (from the cache). ``kernels=False`` keeps the loaded kernel objects (a tool that wraps
    their launches decides again with them). ``jitkern.reset()`` also forgets counters and log-once keys."""
    for d in list(_dispatchers.values()):
        with d._lock:
            d._memo.clear()
            d._routes.clear()
            d._call = d._call_python
    if kernels:
        runtime.clear_memory()


__all__ = ["Call", "Dispatcher", "dispatcher", "In", "Launch", "Candidate", "Scalar", "Scratch", "Zeroed"]
