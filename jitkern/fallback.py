"""The fallback table: route a call signature to the first of its candidates that can run it.

An op lists its variants in order (``OpSpec.variants``: e.g. a CK-based HIP kernel, a CUDA kernel,
then Triton), and its ``plan`` gives, for one call signature, ``Candidate``s in that order (and,
within a variant, tiles in order of preference). ``jitkern.dispatch`` makes a ``Route`` of them. A
candidate is skipped when

* its **guard** (a predicate on what the call signature holds, e.g. ``type(w) is torch.Tensor``;
  asked once per signature) refuses the arguments: the signature goes to the next candidate, no
  exception is raised;
* its build **failed or was unavailable** (no nvcc/hipcc, no CK headers, not this vendor's GPU):
  the failure is recorded in the cache (``jitkern.failures``) so no later process runs the compiler
  again for it; or its artifact is **over the arch's budget** (``jitkern.budget``);
* it could not be **loaded**, or it **raised at run time** the first times it ran in this process.
  Until a candidate has completed once in this process, the route backs up the in-place arguments
  (``inplace``: argument positions) and restores them if the launch raises, then goes on to the next
  candidate and remembers the failure for the rest of the process; after the first success there is
  no copy. (Only errors raised by the launch can be caught; a kernel that faults asynchronously on
  the GPU has already corrupted the context.)

The first time an op falls back in a process, one warning names each variant skipped, why (the
first compiler error line) and where the full log is; later fallbacks of that op log at INFO.
Over-budget tiles are expected on small arches: they are logged once per (op, arch) by the budget
check, not warned about here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from . import background, counters, runtime, state
from .errors import BuildError, InputError, LaunchError, NoVariantError, OverBudgetError, RedzoneError
from .logs import log, warn_once
from .spec import Candidate, OpSpec

#: ``bind(candidate, kernels, device) -> fire(args)``: how a candidate's loaded kernels run the op's
#: arguments (``jitkern.dispatch`` supplies it).
Binder = Callable[[Candidate, list, Any], Callable[[tuple], Any]]


@dataclass
class _Slot:
    cand: Candidate
    fire: Callable | None = None
    keys: tuple = ()
    error: Exception | None = None
    proven: bool = False
    deferred: bool = False  # its build was handed to the background worker (jitkern.background)
    admitted: bool | None = None  # its guard's answer for this route's signature (None: not asked yet)


_proven_keys: set = set()  # kernel keys (or torch candidates' names) that completed once in this process
_noted: dict = {}  # op -> [(variant, reason, log)] failures not yet warned about


@dataclass
class Route:
    """Candidates in fallback order for one call signature; call it with the op's argument tuple."""

    spec: OpSpec
    candidates: Sequence[Candidate]
    device: Any
    bind: Binder
    inplace: tuple[int, ...] = ()
    _slots: list = field(init=False, repr=False)
    fast: Callable | None = field(init=False, repr=False, default=None)
    #: ``on_fast(fn)``: told the route's hot path whenever it changes (the dispatcher memoises it)
    on_fast: Callable | None = field(init=False, repr=False, default=None)

    def __post_init__(self):
        if not self.candidates:
            raise NoVariantError(f"{self.spec.name}: a route needs at least one candidate")
        self._slots = [_Slot(c) for c in self.candidates]

    @property
    def active_candidate(self) -> Candidate | None:
        """The first candidate that has run for this route and not failed (None before the first call)."""
        for s in self._slots:
            if s.error is None and s.proven:
                return s.cand
        return None

    @property
    def active(self) -> str | None:
        c = self.active_candidate
        return None if c is None else c.name

    def __call__(self, args: tuple):
        fast = self.fast
        if fast is not None:
            return fast(args)
        return self._route(args)

    # -- slow path: first calls, guards that refused, failures ----------------------------------
    def _acquire(self, s: _Slot) -> bool:
        c = s.cand
        if c.torch is not None:
            s.fire, s.keys = self.bind(c, [], self.device), (f"torch:{self.spec.name}:{c.name}",)
        else:
            try:
                kernels = [runtime.kernel(self.spec, la.config, self.device) for la in c.launches]
            except OverBudgetError as e:
                self._fail(s, e, quiet=True)
                return False
            except (BuildError, LaunchError) as e:
                self._fail(s, e)
                return False
            s.fire, s.keys = self.bind(c, kernels, self.device), tuple(k.key for k in kernels)
        s.proven = all(k in _proven_keys for k in s.keys)
        return True

    def _route(self, args: tuple):
        for i, s in enumerate(self._slots):
            c = s.cand
            if s.error is not None:
                continue
            if c.guard is not None and s.admitted is None:  # once per signature: it sees only what the key holds
                s.admitted = bool(c.guard(*args))
                if not s.admitted:
                    counters.bump("guard_refusals")
                    log.debug("jitkern: %s: guard of %r refused the signature (%s)", self.spec.name, c.name,
                              c.guard_doc)
            if s.admitted is False:
                continue
            if s.fire is None:
                if self._defer(i, s, args):
                    continue
                if not self._acquire(s):
                    continue
                if s.deferred:
                    self._switched(s)
            if not s.proven:
                backups = [(args[i], args[i].clone()) for i in self.inplace if args[i] is not None]
                counters.bump("inplace_backups", len(backups))
                try:
                    s.fire(args)
                except (InputError, RedzoneError):  # the caller's arguments, not the candidate: say so
                    for t, b in backups:
                        t.copy_(b)
                    raise
                except Exception as e:  # any other failure of an unproven candidate: restore, fall through
                    for t, b in backups:
                        t.copy_(b)
                    counters.bump("runtime_fallbacks")
                    err = LaunchError(f"{self.spec.name}/{c.name} raised at run time "
                                      f"({type(e).__name__}: {e}); its in-place arguments were restored")
                    err.reason = f"raised at run time: {type(e).__name__}: {e}"
                    err.__cause__ = e
                    for la in c.launches:
                        runtime.remember_failure(self.spec, la.config, self.device, err)
                    self._fail(s, err)
                    continue
                s.proven = True
                _proven_keys.update(s.keys)
            else:
                s.fire(args)
            self._settled(c.name)
            return c.name
        self._settled(None)
        reasons = "; ".join(f"{s.cand.name}: {_reason(s.error) if s.error else 'guard refused'}"
                            for s in self._slots)
        raise NoVariantError(f"{self.spec.name}: no variant can run these arguments ({reasons})")

    # -- serve while compiling (JITKERN_BACKGROUND_BUILD=1; jitkern.background) -----------------
    def _defer(self, i: int, s: _Slot, args: tuple) -> bool:
        """Skip slot ``i`` for now if its build can run in the background while a later slot serves."""
        if s.cand.torch is not None or not background.enabled():
            return False
        configs = [la.config for la in s.cand.launches]
        if s.deferred:  # handed over earlier: skip it while it builds
            return background.pending(self.spec, configs, self.device)
        if not self._ready_after(i, args):
            return False
        s.deferred = background.defer(self.spec, configs, self.device)
        return s.deferred

    def _ready_after(self, i: int, args: tuple) -> bool:
        """Whether a slot after ``i`` can run these arguments without a build."""
        for s in self._slots[i + 1:]:
            c = s.cand
            if s.error is not None or (c.guard is not None and not c.guard(*args)):
                continue
            if s.fire is not None or c.torch is not None:
                return True
            if all(background.cached(self.spec, la.config, self.device) for la in c.launches):
                return True
        return False

    def _switched(self, s: _Slot) -> None:
        waited = background.waited(self.spec, [la.config for la in s.cand.launches], self.device)
        counters.bump("background_switches")
        log.info("jitkern: %s: switching to %r, built in the background (ready %.1f s after it was handed over)",
                 self.spec.name, s.cand.name, waited or 0.0)
        s.deferred = False

    def _fail(self, slot: _Slot, err: Exception, quiet: bool = False) -> None:
        slot.error = err
        slot.fire = None
        counters.bump("fallbacks")
        entry = (slot.cand.name, _reason(err), getattr(err, "log_path", None))
        (log.debug if quiet else log.info)("jitkern: %s: candidate %r skipped: %s%s", self.spec.name, entry[0],
                                           entry[1], f" (log: {entry[2]})" if entry[2] else "")
        if not quiet:
            _noted.setdefault(self.spec.name, []).append(entry)

    def _settled(self, chosen: str | None) -> None:
        noted = _noted.pop(self.spec.name, None)
        if noted:
            parts = [f"{v!r} ({reason}{f'; log: {path}' if path else ''})" for v, reason, path in noted]
            warn_once(("fallback", self.spec.name), "jitkern: %s falls back to variant %s; skipped: %s",
                      self.spec.name, repr(chosen) if chosen else "(none)", ", ".join(parts))
        self.fast = self._fast_path()
        if self.fast is not None and self.on_fast is not None:
            self.on_fast(self.fast)

    def _fast_path(self):
        """The hot path: the fire function (it returns the candidate's name) of the first candidate
        that takes this signature and has run; None while that one has not run yet; routing again
        (which says why) where no candidate takes the signature."""
        watch = False
        for s in self._slots:
            if s.error is not None or s.admitted is False:
                continue
            if s.deferred and s.fire is None:  # building in the background: served by a later slot
                watch = True
                continue
            if not s.proven:
                return None
            fast = s.fire
            break
        else:
            fast = self._route
        return self._watching(fast) if watch else fast

    def _watching(self, fast):
        """``fast`` that goes back to routing once a background build has finished (and the process is
        not capturing a CUDA graph or tracing): one integer comparison per call until then."""
        seen = background.generation

        def watching(args):
            if background.generation != seen and background.switch_allowed():
                self.fast = None
                return self._route(args)
            return fast(args)
        return watching


def _reason(err: Exception) -> str:
    return getattr(err, "reason", None) or f"{type(err).__name__}: {err}"


@state.on_reset
def reset_process_state() -> None:
    """Forget which kernels succeeded and pending warnings."""
    _proven_keys.clear()
    _noted.clear()


__all__ = ["Route"]
