"""Serve while compiling (``JITKERN_BACKGROUND_BUILD=1``): run on a cached candidate while the
preferred one builds in a background worker process.

Routing (``jitkern.fallback.Route``) asks ``defer(spec, configs, device)`` before it acquires a
candidate whose kernels it has not loaded yet, when a later candidate of the same route can run
without a build (its kernels are in the cache, or it is a PyTorch function). ``defer`` answers True
when the candidate's kernels are not in the cache and it has handed their builds to the background
worker: the route then serves from the later candidate. The worker (one process, started on first
use, ``spawn``) plans each job again and builds it through ``jitkern.build.get_entry`` — the usual
per-key lock, failure records and publish into the cache; a second process that wants the same key
waits on that lock or finds the entry.

When a background build finishes, ``generation`` changes. A route serving from a later candidate
checks that one integer per call; once it has changed and ``switch_allowed()`` (not inside CUDA-graph
capture, not while ``torch.compile`` traces: a captured graph or a compiled graph keeps what it was
recorded with), the route acquires the preferred candidate again — now a cache hit, or a recorded
failure that routing skips — and from then on runs it; one INFO line says so, and the
``background_switches`` counter counts it (``background_builds`` counts builds handed over).

Only registered ops (``jitkern.register``, entry points, or the library) can be built by the worker,
which finds the op by name after importing the module that declares it; for other specs, and where
configs are selected for another arch than they are built for (CPU tensors with ``JITKERN_ARCH``),
nothing is deferred.
"""
from __future__ import annotations

import concurrent.futures
import importlib
import os
import threading
import time

from . import counters, registry, settings, state
from .arch import get as get_arch
from .build import checker, get_entry
from .cache import default_store
from .errors import BuildError, JitkernError, UnknownOpError
from .logs import log
from .plan import plan
from .runtime import arches_for
from .spec import Config

#: Changes (+1) whenever a background build finishes; routes compare it against what they saw.
generation = 0

_lock = threading.Lock()
_pool: concurrent.futures.ProcessPoolExecutor | None = None
_pending: dict = {}  # (op, config, build arch) -> Future
_started: dict = {}  # (op, config, build arch) -> time.monotonic() when handed over


def enabled() -> bool:
    """``JITKERN_BACKGROUND_BUILD``: on (1) or off (default)."""
    return settings.get("background_build")


def switch_allowed() -> bool:
    """Whether a route may change the kernels it launches now: not during CUDA-graph capture, not
    while torch.compile traces."""
    import torch

    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing())


def cached(spec, config: Config, device) -> bool:
    """Whether ``config`` can be had without a build: an entry in the cache (a recorded failure
    counts: routing skips it without a build)."""
    _, build_arch = arches_for(device)
    job = plan(spec, config, build_arch)
    return default_store().lookup(job.key, checker(job)) is not None


def defer(spec, configs, device) -> bool:
    """True if ``configs`` (one candidate's launches) are not all cached and their builds are now
    pending in the background worker (or were already); False: acquire them the usual way."""
    if not enabled():
        return False
    select, build_arch = arches_for(device)
    if select is not build_arch or _module_of(spec) is None:
        return False
    todo = []
    for cfg in configs:
        memo = (spec.name, cfg, build_arch.name)
        with _lock:
            fut = _pending.get(memo)
        if fut is not None:
            if not fut.done():
                todo.append(None)
            continue
        if not cached(spec, cfg, device):
            todo.append((memo, cfg))
    if not todo:
        return False
    for item in todo:
        if item is not None:
            _submit(spec, item[1], build_arch, item[0])
    return True


def pending(spec, configs, device) -> bool:
    """Whether any of ``configs`` is still building in the background."""
    _, build_arch = arches_for(device)
    with _lock:
        futs = [_pending.get((spec.name, cfg, build_arch.name)) for cfg in configs]
    return any(f is not None and not f.done() for f in futs)


def waited(spec, configs, device) -> float | None:
    """Seconds since the first of ``configs`` was handed to the worker (None: none was)."""
    _, build_arch = arches_for(device)
    with _lock:
        t = [_started[m] for m in ((spec.name, c, build_arch.name) for c in configs) if m in _started]
    return time.monotonic() - min(t) if t else None


def wait(timeout: float | None = None) -> bool:
    """Wait for every pending background build (tests, benchmarks); True if all finished."""
    with _lock:
        futs = list(_pending.values())
    done, not_done = concurrent.futures.wait(futs, timeout=timeout)
    return not not_done


def _module_of(spec) -> str | None:
    """The module whose import registers ``spec`` (None: the worker could not find it)."""
    try:
        if registry.get(spec.name) is not spec:
            return None
    except UnknownOpError:
        return None
    return getattr(spec.fn, "__module__", None) or ""


def _submit(spec, cfg: Config, build_arch, memo) -> None:
    global _pool
    with _lock:
        if memo in _pending:
            return
        if _pool is None:
            import atexit
            import multiprocessing

            _pool = concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
            atexit.register(shutdown)
        fut = _pool.submit(build_in_worker, _module_of(spec), spec.name, cfg.variant, tuple(cfg.params),
                           build_arch.name, settings.child_environ())
        _pending[memo] = fut
        _started[memo] = time.monotonic()
    counters.bump("background_builds")
    log.info("jitkern: %s: %s is not cached; building it in the background, serving from the next candidate",
             spec.name, cfg.describe())
    fut.add_done_callback(_finished)


def _finished(fut) -> None:
    global generation
    exc = fut.exception()
    if exc is not None:
        log.info("jitkern: a background build ended with %s: %s", type(exc).__name__, exc)
    with _lock:
        generation += 1


def build_in_worker(module: str, op: str, variant: str, params: tuple, arch_name: str, environ: dict) -> str:
    """Runs in the worker process: plan and build one config, as the caller's process would."""
    os.environ.clear()
    os.environ.update(environ)
    if module:
        importlib.import_module(module)
    spec = registry.get(op)
    job = plan(spec, Config(variant, params), get_arch(arch_name))
    try:
        get_entry(job, record_failures=True)
    except BuildError as e:  # recorded (unless transient): routing skips the candidate from now on
        return f"failed: {e}"
    except JitkernError as e:
        return f"failed: {e}"
    return "built"


@state.on_reset
def _reset() -> None:
    """Forget pending builds (the worker keeps running what it has)."""
    with _lock:
        _pending.clear()
        _started.clear()


def shutdown() -> None:
    """Stop the worker process (after its current build)."""
    global _pool
    with _lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)  # a build under way finishes (and is published)


__all__ = ["enabled", "defer", "cached", "pending", "switch_allowed", "wait", "waited", "shutdown", "generation"]
