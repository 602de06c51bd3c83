"""The fallback table: route an op's call to the first of its variants that can run it.

An op lists its variants in order (``OpSpec.variants``: e.g. a CK-based HIP kernel, a CUDA kernel,
then Triton). For one call signature the op builds a ``Route`` of ``Candidate`` s, one config per
variant, and calls it. A candidate is skipped when

* its **guard** (a cheap predicate on the call's arguments, e.g. ``type(w) is torch.Tensor``)
  refuses the arguments: that call goes to the next candidate, no exception is raised;
* its build **failed or was unavailable** (the builder's probe: no nvcc/hipcc, no CK headers, not
  this vendor's GPU). The failure is *recorded in the cache under the key the artifact would
  have had* (an entry whose ``entry.json`` says ``"status": "failed"`` with the reason, plus the full
  compiler log as ``build.log``), so no later process runs the compiler again for it. The key holds
  the compiler fingerprint, so a new toolchain retries; ``clear_failures()``
  (``jitkern cache clear --failures``) forgets all records;
* it could not be **loaded**, or it **raised at run time** the first times it ran in this process.
  Until a candidate has completed once in this process, the route backs up the in-place arguments
  (``inplace``: argument positions) and restores them if the launch raises, then goes on to the next
  candidate and remembers the failure for the rest of the process; after the first success there is
  no copy. (Only errors raised by the launch can be caught; a kernel that faults asynchronously on
  the GPU has already corrupted the context.)

The first time an op falls back in a process, one warning names each variant skipped, why (the
first compiler error line) and where the full log is; later fallbacks of that op log at INFO.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from . import counters, runtime
from .build import Job, get_entry, job_meta, plan
from .cache import ENTRY_META, Entry, Store, default_store
from .errors import BuildError, LaunchError, NoVariantError, RecordedBuildFailure, UnavailableError, is_transient
from .logs import log, warn_once
from .spec import Config, OpSpec

FAILED = "failed"
LOG_FILE = "build.log"


# ---- failure records ---------------------------------------------------------------------------
def failure_record(job: Job, err: BuildError) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Files and metadata of the cache entry that records ``job``'s failed build."""
    log_text = getattr(err, "log_text", None) or f"{type(err).__name__}: {err}\n"
    reason = getattr(err, "reason", None) or str(err)
    files = {LOG_FILE: log_text.encode(), "source.txt": job.source.encode()}
    meta = {
        **job_meta(job),
        "status": FAILED,
        "unavailable": isinstance(err, UnavailableError),
        "error_type": type(err).__name__,
        "reason": reason,
        "error": str(err),
        "log": LOG_FILE,
    }
    return files, meta


def record_failure(store: Store, job: Job, err: BuildError) -> RecordedBuildFailure:
    """Publish the failure record for ``job`` (the caller holds the key's lock); return the error to raise.

    Transient failures (``jitkern.errors.is_transient``: disk full, permission, timeout, interrupted,
    worker died) are not recorded: this process skips the variant, the next one tries again."""
    if is_transient(err):
        err.transient = True
        return err
    counters.bump("failures_recorded")
    files, meta = failure_record(job, err)
    try:
        entry = store.publish(job.key, files, meta)
    except OSError as e:
        log.info("jitkern: could not record the failed build of %s (%s)", job.describe(), e)
        return RecordedBuildFailure(str(err), None, reason=meta["reason"], log_text=getattr(err, "log_text", None))
    return _failure_error(entry, fresh=True)


def recorded_failure(entry: Entry) -> RecordedBuildFailure:
    """The error for a failure record found in the cache."""
    counters.bump("failures_cached")
    return _failure_error(entry, fresh=False)


def _failure_error(entry: Entry, fresh: bool) -> RecordedBuildFailure:
    m = entry.meta
    log_path = entry.file(m.get("log", LOG_FILE))
    when = "" if fresh else " (recorded earlier; not retried until the toolchain changes or " \
                           "'jitkern cache clear --failures')"
    e = RecordedBuildFailure(f"{m.get('op')}/{m.get('variant')} for {m.get('arch')}: {m.get('reason')}{when}",
                             str(log_path), reason=f"{m.get('reason')}{' (recorded earlier)' if not fresh else ''}")
    e.unavailable = bool(m.get("unavailable"))
    return e


def is_failure(meta) -> bool:
    return meta.get("status") == FAILED


def _entry_dirs(layer):
    entries = layer.root / "entries"
    if not entries.is_dir():
        return
    for shard in sorted(entries.iterdir()):
        if shard.is_dir():
            yield from sorted(p for p in shard.iterdir() if p.is_dir())


def failures(store: Store | None = None) -> list[dict[str, Any]]:
    """Every recorded failure in every layer: op, variant, arch, reason, log path, layer, key."""
    store = store or default_store()
    out = []
    for layer in store.layers:
        for d in _entry_dirs(layer):
            try:
                meta = json.loads((d / ENTRY_META).read_text())
            except (OSError, ValueError):
                continue
            if is_failure(meta):
                out.append({"op": meta.get("op"), "variant": meta.get("variant"), "arch": meta.get("arch"),
                            "reason": meta.get("reason"), "log": str(d / meta.get("log", LOG_FILE)),
                            "layer": str(layer.base), "key": d.name})
    return out


def clear_failures(store: Store | None = None) -> int:
    """Remove every recorded build failure from the writable layers; return how many were removed.

    This is what ``jitkern cache clear --failures`` does: the next use of those variants tries
    to build them again. Read-only layers are left alone.
    """
    store = store or default_store()
    n = 0
    for layer in store.layers:
        if not os.access(layer.root / "entries", os.W_OK | os.X_OK):
            continue
        for d in list(_entry_dirs(layer)):
            try:
                meta = json.loads((d / ENTRY_META).read_text())
            except (OSError, ValueError):
                continue
            if is_failure(meta):
                layer.discard(d.name)
                n += 1
    if n:
        log.info("jitkern: cleared %d recorded build failure(s)", n)
    return n


# ---- probes and loading ------------------------------------------------------------------------
def probe(spec: OpSpec, variant_name: str, arch) -> str | None:
    """Why ``variant_name`` cannot be built for ``arch`` on this machine (None: it can try)."""
    from . import builders

    builder = builders.get(spec.variant(variant_name).kind)
    fn = getattr(builder, "probe", None)
    return fn(arch) if fn is not None else None


def load(entry: Entry, job: Job):
    """A launchable kernel for ``entry``: Triton's launcher for Triton variants, the builder's for others."""
    if job.variant.kind == "triton":
        from .launcher import load as triton_load

        return triton_load(entry, job)
    from . import builders

    return builders.get(job.variant.kind).load(entry, job)


_obtained = runtime.plan_cache()  # (op, config, arch, device) -> Kernel | BuildError | LaunchError


def obtain(spec: OpSpec, config: Config, device):
    """The loaded kernel for ``config`` on ``device``, building it (and recording a failure) if needed.

    Raises ``BuildError`` (incl. ``RecordedBuildFailure``/``UnavailableError``) or ``LaunchError``;
    the outcome is memoised for the process, failures included.
    """
    _, build_arch = runtime.arches_for(device)
    memo = (spec.name, config, build_arch.name, device.type, device.index)
    got = _obtained.get(memo)
    if got is None:
        try:
            job = plan(spec, config, build_arch)
            entry, _ = get_entry(job, record_failures=True)
            got = load(entry, job)
        except (BuildError, LaunchError) as e:
            got = e
        _obtained[memo] = got
    if isinstance(got, Exception):
        raise got
    return got


def _remember_runtime_failure(spec, config, device, err: Exception) -> None:
    _, build_arch = runtime.arches_for(device)
    _obtained[(spec.name, config, build_arch.name, device.type, device.index)] = err


# ---- routing -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    """One variant's config for a call signature, how to launch it, and when it applies.

    ``launch(kernel, *args)`` runs the kernel on the op's arguments. ``guard(*args) -> bool`` (cheap,
    no exceptions) says whether this candidate accepts them; ``guard_doc`` says what it checks
    (``jitkern doctor`` prints it). A candidate with ``config=None`` is a plain PyTorch
    implementation (e.g. ``torch.matmul`` for inputs no kernel supports): nothing is built, and
    ``launch`` receives ``None`` as the kernel; ``name`` names it.
    """

    config: Config | None
    launch: Callable[..., Any]
    guard: Callable[..., bool] | None = None
    guard_doc: str = ""
    name: str = "torch"

    @property
    def variant(self) -> str:
        return self.config.variant if self.config is not None else self.name


class _Native:
    """Stands in for a kernel of a PyTorch candidate."""

    def __init__(self, key: str):
        self.key = key


@dataclass
class _Slot:
    cand: Candidate
    kernel: Any = None
    error: Exception | None = None
    proven: bool = False


_proven_keys: set = set()  # entry keys of kernels that completed once in this process
_noted: dict = {}  # op -> [(variant, reason, log)] failures not yet warned about


@dataclass
class Route:
    """Candidates in fallback order for one call signature of an op; call it with the op's arguments."""

    spec: OpSpec
    candidates: Sequence[Candidate]
    device: Any
    inplace: tuple[int, ...] = ()
    _slots: list = field(init=False, repr=False)
    _fast: tuple | None = field(init=False, repr=False, default=None)

    def __post_init__(self):
        if not self.candidates:
            raise NoVariantError(f"{self.spec.name}: a route needs at least one candidate")
        self._slots = [_Slot(c) for c in self.candidates]

    @property
    def active(self) -> str | None:
        """The first variant that has run for this route and not failed (None before the first call)."""
        for s in self._slots:
            if s.error is None and s.proven:
                return s.cand.variant
        return None

    def __call__(self, *args):
        fast = self._fast
        if fast is not None:
            for guard, launch, k, variant in fast:
                if guard is None or guard(*args):
                    launch(k, *args)
                    return variant
        return self._route(args)

    # -- slow path: first calls, guards that refused, failures ----------------------------------
    def _route(self, args):
        for s in self._slots:
            c = s.cand
            if s.error is not None:
                continue
            if c.guard is not None and not c.guard(*args):
                counters.bump("guard_refusals")
                log.debug("jitkern: %s: guard of variant %r refused the arguments (%s)", self.spec.name,
                          c.variant, c.guard_doc)
                continue
            if s.kernel is None and c.config is None:
                s.kernel = _Native(f"native:{self.spec.name}:{c.name}")
                s.proven = s.kernel.key in _proven_keys
            if s.kernel is None:
                try:
                    s.kernel = obtain(self.spec, c.config, self.device)
                except (BuildError, LaunchError) as e:
                    self._fail(s, e)
                    continue
                s.proven = s.kernel.key in _proven_keys
            if not s.proven:
                backups = [(args[i], args[i].clone()) for i in self.inplace if args[i] is not None]
                counters.bump("inplace_backups", len(backups))
                try:
                    c.launch(None if isinstance(s.kernel, _Native) else s.kernel, *args)
                except Exception as e:  # any failure of an unproven variant: restore, fall through
                    for t, b in backups:
                        t.copy_(b)
                    counters.bump("runtime_fallbacks")
                    err = LaunchError(f"{self.spec.name}/{c.variant} raised at run time "
                                      f"({type(e).__name__}: {e}); its in-place arguments were restored")
                    err.reason = f"raised at run time: {type(e).__name__}: {e}"
                    err.__cause__ = e
                    _remember_runtime_failure(self.spec, c.config, self.device, err)
                    self._fail(s, err)
                    continue
                s.proven = True
                _proven_keys.add(s.kernel.key)
            else:
                c.launch(None if isinstance(s.kernel, _Native) else s.kernel, *args)
            self._settled(c.variant)
            return c.variant
        self._settled(None)
        reasons = "; ".join(f"{s.cand.variant}: {_reason(s.error) if s.error else 'guard refused'}"
                            for s in self._slots)
        raise NoVariantError(f"{self.spec.name}: no variant can run these arguments ({reasons})")

    def _fail(self, slot: _Slot, err: Exception) -> None:
        slot.error = err
        slot.kernel = None
        counters.bump("fallbacks")
        entry = (slot.cand.variant, _reason(err), getattr(err, "log_path", None))
        log.info("jitkern: %s: variant %r skipped: %s%s", self.spec.name, entry[0], entry[1],
                 f" (log: {entry[2]})" if entry[2] else "")
        _noted.setdefault(self.spec.name, []).append(entry)

    def _settled(self, chosen: str | None) -> None:
        noted = _noted.pop(self.spec.name, None)
        if noted:
            parts = [f"{v!r} ({reason}{f'; log: {path}' if path else ''})" for v, reason, path in noted]
            warn_once(("fallback", self.spec.name), "jitkern: %s falls back to variant %s; skipped: %s",
                      self.spec.name, repr(chosen) if chosen else "(none)", ", ".join(parts))
        # the fast path is valid while every non-failed slot up to the first unguarded one is proven
        fast = []
        for s in self._slots:
            if s.error is not None:
                continue
            if not s.proven:
                self._fast = tuple(fast) or None
                return
            fast.append((s.cand.guard, s.cand.launch, None if isinstance(s.kernel, _Native) else s.kernel,
                         s.cand.variant))
            if s.cand.guard is None:
                break
        self._fast = tuple(fast) or None


def _reason(err: Exception) -> str:
    return getattr(err, "reason", None) or f"{type(err).__name__}: {err}"


def route(spec: OpSpec, candidates: Sequence[Candidate], device, inplace: tuple[int, ...] = ()) -> Route:
    return Route(spec, tuple(candidates), device, tuple(inplace))


def reset_process_state() -> None:
    """Forget which kernels succeeded and pending warnings (tests)."""
    _proven_keys.clear()
    _noted.clear()


__all__ = ["Candidate", "Route", "route", "obtain", "probe", "load", "record_failure", "recorded_failure",
           "failures", "clear_failures", "is_failure", "FAILED"]
