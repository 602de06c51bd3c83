"""Prebuild: build every artifact the runtime can select, for named arches, in parallel.

The job list is ``op x variant x config`` from each op's ``OpSpec.configs(arch)``, which is by
contract everything the runtime may pick on that arch, so a prebuilt cache means the first request
on a fresh node compiles nothing.

The library entry point is ``prebuild()`` (it returns a ``PrebuildResult`` and never prints);
``jitkern prebuild`` (``jitkern.cli``) prints its progress and report and sets the exit status.

How it runs:

1. This process plans every job (render + key: cheap, no compiler) and looks each key up in the
   store. Hits are reported as ``cached`` and never reach a worker, so a second run builds nothing
   and starts no worker.
2. Misses go to a pool of worker processes (``spawn``; default and at most one per core). A worker receives
   plain data (op name, the module that declares it, variant, parameters, arch name, cache layers),
   plans the job again, checks that it arrives at the same key, and builds it through
   ``jitkern.build.get_entry``: the same per-key lock, atomic publish and budget checks as a lazy
   compile. Workers run without ``TRITON_INTERPRET`` (Triton cannot generate GPU code with it on),
   and, unless ``TRITON_CACHE_DIR`` is set, with a private Triton cache removed at the end: the
   jitkern entry is the artifact, a second copy in ``~/.triton`` would only bloat an image.
3. Ctrl-C (SIGINT) reaches only this process's handler (workers ignore SIGINT): the pool is
   terminated, and any temporary directory a killed worker was writing is removed. Entries are
   published by an atomic rename, so an interrupted build leaves no partial entry: the key is
   simply absent and the next run builds it.
4. A worker that dies (SIGKILL, out of memory, a compiler crash) breaks the pool; the artifacts
   that were in flight are retried one at a time in a fresh worker, so the one that kills its
   worker again is named and reported ``failed`` (transient: nothing is recorded), and the rest go on.
5. **An artifact's result is what the cache holds afterwards.** A worker's ``built`` is checked
   against the store; an artifact that was built but could not be saved (a full disk: the build
   path then keeps the kernel in memory) is reported ``failed`` (transient), never ``built``.

Statuses in the report: ``built``, ``cached``, ``rejected_over_budget`` (the artifact needs more
shared memory / LDS or registers than the arch gives a block: compiled once, recorded, never
launched; see ``jitkern.budget``), ``unavailable`` (the variant's toolchain is missing on this
machine, e.g. no hipcc/CK on a CPU build box: the runtime falls back to the next variant; reported
loudly, but not an error), ``failed`` (a build error; recorded in the cache like a lazy build's, see
``jitkern.fallback``; transient failures, see ``jitkern.errors.is_transient``, are reported with
``"transient": true`` and not recorded). Only ``failed`` makes the exit status non-zero (unless
``--keep-going``). An op whose configuration list cannot be computed (an ImportError, a broken tuned
table) is a ``failed`` record for that op and arch; a bad setting (``ConfigError``) stops prebuild
with exit status 2.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from . import arch as _arch
from . import fastcall, registry, strict
from .budget import AMD_FIGURES
from .build import checker, get_entry
from .cache import Store, add_prebuild_record, check_dirs, configured_layers, default_store, write_probe
from .errors import (BuildError, CacheError, ConfigError, JitkernError, NoDeviceError, OverBudgetError,
                     UnavailableError, UnknownOpError, is_transient)
from .key import explain, recorded
from .logs import log, quiet_third_party_warnings
from .plan import plan
from .spec import Config
from . import __version__

STATUSES = ("built", "cached", "rejected_over_budget", "unavailable", "failed")
#: Entry-meta statuses that record a negative result instead of an artifact (written by the build path).
_META_STATUS = {"failed": "failed", "rejected_over_budget": "rejected_over_budget"}


@dataclass(frozen=True)
class Task:
    """One artifact to build, as plain data a worker process can receive."""

    op: str
    module: str  # module that registers the op (for ops registered by a library, not an entry point)
    variant: str
    params: tuple[tuple[str, Any], ...]
    arch: str
    key: str
    #: the parent's key parts as an entry records them (``key.recorded``): explains a worker's other key
    key_parts: dict | None = field(default=None, compare=False, hash=False)

    def describe(self) -> str:
        return f"{self.op}/{self.variant}(" + ", ".join(f"{k}={v}" for k, v in self.params) + f") for {self.arch}"


def default_jobs() -> int:
    """One worker per core this process may run on (respects taskset/cpusets, unlike ``os.cpu_count``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# ---- enumeration -------------------------------------------------------------------------------
def resolve_arches(arches: Iterable[_arch.Arch] | None) -> list[_arch.Arch]:
    if arches:
        return list(arches)
    try:
        return [_arch.current()]
    except NoDeviceError:
        raise ConfigError(
            "no GPU detected and no --arch given; name the arches to build for, e.g. "
            f"--arch gfx942,gfx950,sm_90 (known: {', '.join(_arch.ARCHES)}; 'cpu' = Triton interpreter)"
        ) from None


def enumerate_tasks(ops: Iterable[str] | None, arches: Iterable[_arch.Arch], limit: int | None = None,
                    errors: list | None = None, store: Store | None = None) -> list[Task]:
    """Every (op, config, arch) the runtime can select, planned and keyed, without duplicates.

    A configuration that cannot even be planned (its template does not render) is not a task: its
    ``failed`` record is appended to ``errors`` (if given), and the rest goes on. Planning goes
    through ``store``'s plan index and records every job there, so a process over the prebuilt
    layer renders no template.
    """
    arches = list(arches)
    if ops:
        specs = registry.specs(list(ops))  # named: an unknown op is the user's error (exit 2)
    else:
        specs = []
        for name in registry.names():  # all: one broken third-party op must not stop the others
            try:
                specs.append(registry.get(name))
            except JitkernError as e:
                log.warning("jitkern prebuild: skipping op %s: %s", name, e)
                if errors is not None:
                    for a in arches:
                        errors.append(_record(Task(name, "", "", (), a.name, ""), "failed",
                                              error=f"cannot load op: {e}"))
    tasks: list[Task] = []
    seen: set[str] = set()
    for a in arches:
        for spec in specs:
            module = getattr(spec.fn, "__module__", "") or ""
            try:
                cfgs = list(spec.configs(a))
            except ConfigError:  # a bad setting (JITKERN_<OP>_* override): the user's to fix, exit 2
                raise
            except Exception as e:  # never "nothing to build": the op's artifacts are missing from the image
                why = f"cannot list its configurations: {type(e).__name__}: {e}"
                if errors is None:
                    raise BuildError(f"{spec.name} for {a.name}: {why}") from e
                log.warning("jitkern prebuild: %s for %s: %s", spec.name, a.name, why)
                errors.append(_record(Task(spec.name, module, "", (), a.name, ""), "failed", error=why))
                continue
            for i, cfg in enumerate(cfgs):
                if limit is not None and i >= limit:
                    break
                try:
                    job = plan(spec, cfg, a, store)
                except JitkernError as e:
                    if errors is not None:
                        errors.append(_record(Task(spec.name, module, cfg.variant, cfg.params, a.name, ""),
                                              "failed", error=f"cannot plan: {e}"))
                    continue
                if job.key in seen:
                    continue
                seen.add(job.key)
                tasks.append(Task(spec.name, module, cfg.variant, cfg.params, a.name, job.key, recorded(job.parts)))
                _jobs[job.key] = job
    return tasks


#: key -> Job of the tasks this process planned (for the entry-versus-job check of its lookups)
_jobs: dict = {}


def _record(task: Task, status: str, **extra) -> dict[str, Any]:
    a = _arch.get(task.arch)
    rec = {
        "op": task.op, "variant": task.variant, "arch": task.arch, "params": dict(task.params), "key": task.key,
        "status": status, "shared_bytes": None, "budget_bytes": a.shared_mem_per_block if a.backend else None,
        "seconds": None,
        "error": None, "transient": False,
    }
    rec.update(extra)
    return rec


def _from_entry(task: Task, entry, status: str, seconds: float | None = None) -> dict[str, Any]:
    meta = entry.meta or {}
    recorded = _META_STATUS.get(str(meta.get("status", "")))
    if recorded == "failed" and meta.get("unavailable"):
        recorded = "unavailable"
    error = meta.get("reason") or meta.get("error")
    if recorded in ("failed", "unavailable"):
        error = f"{error or 'build failed'} (recorded; 'jitkern cache clear --failures' retries it)"
    res = meta.get("resources") or {}
    log_path = str(entry.file(meta["log"])) if meta.get("log") else None
    return _record(task, recorded or status, shared_bytes=res.get("shared_bytes", meta.get("shared_bytes")),
                   regs=res.get("regs"), spills=res.get("spills"), **_amd_figures(res),
                   seconds=meta.get("build_seconds", seconds) if status == "built" else None,
                   error=error if recorded else None, log_path=log_path)


def _amd_figures(res) -> dict[str, Any]:
    """The code object's figures (vgprs, sgprs, lds_bytes, scratch_bytes, ...) where the entry has them."""
    return {k: res[k] for k in AMD_FIGURES if k in res and k != "spills"}


# ---- worker side -------------------------------------------------------------------------------
def _worker_init(layers: str, level: int, triton_cache: str | None = None, log_queue=None) -> None:
    # Ctrl-C goes to the whole foreground process group; only the parent decides what to do.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    quiet_third_party_warnings()
    strict.suspend()  # prebuild compiles on purpose: JITKERN_STRICT applies to the processes it warms
    os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported in this process
    os.environ["JITKERN_CACHE_DIR"] = layers
    if triton_cache:  # jitkern's entry is the artifact: don't leave a second copy in Triton's own cache
        os.environ["TRITON_CACHE_DIR"] = triton_cache
    import logging

    logger = logging.getLogger("jitkern")
    logger.setLevel(level)
    if log_queue is not None:  # the parent prints (level prefix) and drops repeats from other workers
        import logging.handlers

        logger.handlers[:] = [logging.handlers.QueueHandler(log_queue)]
        logger.propagate = False


def _spec_for(task: Task):
    try:
        return registry.get(task.op)
    except UnknownOpError:
        if not task.module:
            raise
        import importlib

        importlib.import_module(task.module)  # an op registered by its library at import
        return registry.get(task.op)


def build_task(task: Task) -> dict[str, Any]:
    """Build one task in this process (a worker) and return its report record."""
    t0 = time.perf_counter()
    try:
        spec = _spec_for(task)
        job = plan(spec, Config(task.variant, task.params), _arch.get(task.arch), default_store())
        if job.key != task.key:
            changed = "; ".join(explain(task.key_parts, job.parts)) if task.key_parts else "(parts not recorded)"
            raise BuildError(f"{task.describe()} plans to key {job.key[:16]} in the worker but {task.key[:16]} in "
                             f"the parent; what changed while prebuild ran: {changed}. Run prebuild again")
        entry, status = get_entry(job, default_store(), record_failures=True)
        return _from_entry(task, entry, status, time.perf_counter() - t0)
    except OverBudgetError as e:  # compiled, over the arch's budget: recorded, never launched
        f = e.figures
        return _record(task, "rejected_over_budget", shared_bytes=f.get("shared_bytes"), regs=f.get("regs"),
                       spills=f.get("spills"), **_amd_figures(f), error=str(e),
                       seconds=round(time.perf_counter() - t0, 3))
    except BuildError as e:
        unavailable = isinstance(e, UnavailableError) or getattr(e, "unavailable", False)
        return _record(task, "unavailable" if unavailable else "failed", error=str(e), transient=is_transient(e),
                       seconds=round(time.perf_counter() - t0, 3), log_path=getattr(e, "log_path", None))
    except JitkernError as e:
        return _record(task, "failed", error=str(e), seconds=round(time.perf_counter() - t0, 3),
                       log_path=getattr(e, "log_path", None), transient=is_transient(e))
    except Exception as e:  # a compiler crash must not take the whole prebuild down
        return _record(task, "failed", error=f"{type(e).__name__}: {e}", seconds=round(time.perf_counter() - t0, 3),
                       transient=is_transient(e))


# ---- parent side -------------------------------------------------------------------------------
class Progress:
    """What a caller is told while prebuild runs; every method does nothing here. ``jitkern.cli``
    subclasses it to print (a bar on a terminal, else one line per artifact)."""

    def planning(self, ops: list[str] | None, arches: list[_arch.Arch]) -> None:
        """Before the jobs are planned (rendered and keyed)."""

    def planned(self, tasks: list[Task], ops: list[str] | None, arches: list[_arch.Arch], where: str) -> None:
        """The jobs are planned; ``where``: the writable layer they go to."""

    def start(self, total: int) -> None:
        """``total`` artifacts are not in the cache and go to the workers."""

    def update(self, rec: dict[str, Any]) -> None:
        """One artifact's record (as in the report), as soon as it is known."""

    def close(self) -> None:
        """The workers are done (or were stopped)."""


def summarize(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        s = out.setdefault(r["arch"], {**dict.fromkeys(STATUSES, 0), "total": 0, "compile_seconds": 0.0})
        s[r["status"]] = s.get(r["status"], 0) + 1
        s["total"] += 1
        if r["status"] == "built" and r.get("seconds"):
            s["compile_seconds"] += r["seconds"]
    for s in out.values():
        s["compile_seconds"] = round(s["compile_seconds"], 3)
        s["seconds_per_built"] = round(s["compile_seconds"] / s["built"], 3) if s["built"] else None
    return out


def _sweep_tmp(store: Store, pids: set[int]) -> int:
    """Remove temporary entry directories left by killed workers (named ``<key>.<pid>.<rand>``)."""
    import shutil

    layer = store.write_layer
    if layer is None or not pids:
        return 0
    n = 0
    for d in (layer.root / "tmp").glob("*.*.*"):
        parts = d.name.split(".")
        if len(parts) >= 3 and parts[1].isdigit() and int(parts[1]) in pids:
            shutil.rmtree(d, ignore_errors=True)
            n += 1
    return n


def effective_jobs(jobs: int | None, pending: int) -> int:
    """Worker count: ``jobs`` (default one per core), never more than the cores or the artifacts."""
    cores = default_jobs()
    if jobs and jobs > cores:
        log.warning("jitkern prebuild: --jobs %d is more than the %d cores this process may use; using %d",
                    jobs, cores, cores)
    return max(1, min(jobs or cores, cores, pending))


class _Workers:
    """Worker pools (``concurrent.futures``, so a worker that dies breaks the pool instead of hanging
    it). ``drive`` runs tasks until they are done or the pool breaks, and returns those in flight then."""

    def __init__(self, initargs: tuple):
        import multiprocessing

        self.ctx = multiprocessing.get_context("spawn")
        self.initargs = initargs
        self.pool = None
        self.pids: set[int] = set()

    def drive(self, tasks, width: int, done) -> list[Task]:
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
        from concurrent.futures.process import BrokenProcessPool

        self.pool = ProcessPoolExecutor(width, mp_context=self.ctx, initializer=_worker_init, initargs=self.initargs)
        inflight: dict = {}
        lost: list[Task] = []
        try:
            while tasks or inflight:
                while tasks and len(inflight) < width:  # never more queued than running: in flight = suspects
                    t = tasks.popleft()
                    inflight[self.pool.submit(build_task, t)] = t
                    self.pids.update(self.pool._processes or {})  # the only handle on workers before 3.14
                finished, _ = wait(inflight, return_when=FIRST_COMPLETED)
                for f in finished:
                    t = inflight.pop(f)
                    try:
                        rec = f.result()
                    except BrokenProcessPool:
                        lost.append(t)
                        continue
                    done(t, rec)
                if lost:
                    lost.extend(inflight.values())
                    self.stop(kill=True)
                    return lost
            self.stop()
            return []
        except BaseException:  # Ctrl-C: don't wait for the workers' builds
            self.stop(kill=True)
            raise

    def stop(self, kill: bool = False) -> None:
        if self.pool is None:
            return
        if kill:
            for proc in list((self.pool._processes or {}).values()):
                proc.terminate()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pool = None


class _WorkerLogs:
    """Log records from the workers, printed by this process through the ``jitkern`` logger (so with
    its level prefix), each distinct message once however many workers say it."""

    def __init__(self, ctx):
        import logging
        import logging.handlers

        self.queue = ctx.Queue()
        seen: set[tuple[int, str]] = set()

        class Relay(logging.Handler):
            def emit(self, record):
                k = (record.levelno, record.getMessage())
                if k not in seen:
                    seen.add(k)
                    logging.getLogger("jitkern").handle(record)

        self.listener = logging.handlers.QueueListener(self.queue, Relay())
        self.listener.start()

    def stop(self) -> None:
        self.listener.stop()


def run(tasks: list[Task], store: Store, jobs: int | None = None, progress: Progress | None = None,
        layers_env: str | None = None) -> tuple[list[dict[str, Any]], bool, float]:
    """Build ``tasks`` (cached ones are only looked up); ``progress`` hears of each artifact built.

    Returns (records, interrupted, build seconds: from starting the workers to the last result)."""
    records: list[dict[str, Any]] = []
    pending: list[Task] = []
    for t in tasks:
        job = _jobs.get(t.key)
        entry = store.lookup(t.key, checker(job) if job is not None else None)
        if entry is not None:
            records.append(_from_entry(t, entry, "cached"))
        else:
            pending.append(t)
    if not pending:
        return records, False, 0.0
    layer = store.write_layer
    if layer is None:
        raise CacheError(f"no writable layer in {[str(x.base) for x in store.layers]}; "
                         "prebuild needs one (--cache-dir DIR or JITKERN_CACHE_DIR)")
    why = write_probe(layer.root / "tmp")
    if why:
        raise CacheError(f"cannot write to the cache at {layer.base}: {why}; free some space or point --cache-dir "
                         "at a filesystem with room")
    import logging
    import shutil
    import tempfile
    from collections import deque

    jobs = effective_jobs(jobs, len(pending))
    layers_env = layers_env or os.pathsep.join(str(x.base) for x in store.layers)
    triton_cache = None
    if not os.environ.get("TRITON_CACHE_DIR"):
        triton_cache = tempfile.mkdtemp(prefix="jitkern-prebuild-triton-")
    bar = progress or Progress()
    bar.start(len(pending))

    def done(task: Task, rec: dict[str, Any]) -> None:
        if rec["status"] == "built" and store.lookup(task.key) is None:  # what is on disk is the result
            rec.update(status="failed", transient=True, seconds=None,
                       error=f"built, but the cache at {layer.base} does not hold it afterwards (disk full or "
                             "not writable; see the warning above): nothing was saved, run again")
        records.append(rec)
        bar.update(rec)

    import multiprocessing

    worker_logs = _WorkerLogs(multiprocessing.get_context("spawn"))
    workers = _Workers((layers_env, logging.getLogger("jitkern").level, triton_cache, worker_logs.queue))
    t0 = time.perf_counter()
    todo, suspects = deque(pending), deque()
    interrupted = False
    try:
        while todo or suspects:
            if suspects:  # one at a time, so a worker that dies again names its artifact
                for t in workers.drive(suspects, 1, done):
                    _sweep_tmp(store, workers.pids)
                    done(t, _record(t, "failed", transient=True,
                                    error="the worker process building it died (killed, out of memory, or a "
                                          "compiler crash); nothing was recorded, run again"))
            else:
                lost = workers.drive(todo, jobs, done)
                if lost:
                    _sweep_tmp(store, workers.pids)
                    log.warning("jitkern prebuild: a worker process died; retrying the %d artifact(s) in flight "
                                "one at a time", len(lost))
                    suspects.extend(lost)
    except KeyboardInterrupt:
        interrupted = True
        workers.stop(kill=True)
        removed = _sweep_tmp(store, workers.pids)
        log.debug("prebuild interrupted: terminated workers %s, removed %d temporary directories",
                  sorted(workers.pids), removed)
    finally:
        workers.stop()
        worker_logs.stop()
        bar.close()
        if triton_cache:
            shutil.rmtree(triton_cache, ignore_errors=True)
    return records, interrupted, time.perf_counter() - t0


def layer_record(ops: list[str] | None, arches, records, summary, interrupted: bool, seconds: float) -> dict[str, Any]:
    """What a full prebuild records in the layer it built (``jitkern.cache.add_prebuild_record``)."""
    import importlib.metadata as md

    counts = {"artifacts": len(records), **{st: sum(s[st] for s in summary.values()) for st in STATUSES}}
    return {"manifest": None, "ops": list(ops or ()) or "all", "arches": [a.name for a in arches],
            "counts": counts, "complete": not interrupted and counts["failed"] == 0,
            "created": time.time(), "seconds": round(seconds, 3), "jitkern": __version__, "triton": md.version("triton")}


@dataclass
class PrebuildResult:
    """What ``prebuild`` did: every artifact's record, per-arch counts, and the JSON report."""

    arches: list[_arch.Arch]
    layers: list[Path]
    ops: list[str] | None  # as asked (None: all registered ops)
    tasks: int  # artifacts planned (those that could not be planned are in ``records`` as ``failed``)
    records: list[dict[str, Any]]
    summary: dict[str, dict[str, Any]]
    interrupted: bool
    seconds: float
    build_seconds: float
    jobs: int
    write_layer: str | None  # the layer built into (None: no writable layer)

    def count(self, status: str) -> int:
        return sum(s.get(status, 0) for s in self.summary.values())

    @property
    def built(self) -> int:
        return self.count("built")

    @property
    def failed(self) -> int:
        return self.count("failed")

    @property
    def transient(self) -> int:
        return sum(1 for r in self.records if r["status"] == "failed" and r.get("transient"))

    @property
    def not_built(self) -> int:
        """Artifacts that have no record: an interrupted run did not get to them."""
        return self.tasks - (len(self.records) - self._plan_errors)

    _plan_errors: int = 0

    def report(self) -> dict[str, Any]:
        """The JSON report (``jitkern prebuild --json`` / ``--report``; keys: docs/cli.md)."""
        import importlib.metadata as md

        return {
            "jitkern": __version__, "triton": md.version("triton"), "arches": [a.name for a in self.arches],
            "ops": list(self.ops or registry.names()), "cache_layers": [str(p) for p in self.layers],
            "jobs": self.jobs, "seconds": round(self.seconds, 3),
            "build_seconds": round(self.build_seconds, 3), "interrupted": self.interrupted,
            "summary": self.summary, "artifacts": sorted(self.records, key=lambda r: (r["arch"], r["op"], r["key"])),
        }


def prebuild(ops: Iterable[str] | None = None, arches: Iterable[_arch.Arch] | None = None,
             cache_dir: str | os.PathLike | None = None, jobs: int | None = None, limit: int | None = None,
             progress: Progress | None = None) -> PrebuildResult:
    """Build every artifact the runtime can select for ``ops`` (default: all) on ``arches``
    (default: the detected GPU) into the first writable layer of ``cache_dir`` (default:
    ``JITKERN_CACHE_DIR``, else the user cache dir), and record the prebuild in that layer.

    Never prints; ``progress`` hears of each stage and artifact. An interrupted run (Ctrl-C) returns
    with ``interrupted`` set. Raises ``ConfigError`` for a bad setting or no arch to build for, and
    ``CacheError`` when there is something to build but no writable layer."""
    t0 = time.perf_counter()
    progress = progress or Progress()
    ops = list(ops) if ops else None
    strict.suspend()  # building is the point here (selection may compile budget probes in this process)
    arches = resolve_arches(arches)
    layers = check_dirs(configured_layers(cache_dir))
    store = Store(layers)
    progress.planning(ops, arches)
    plan_errors: list[dict[str, Any]] = []
    tasks = enumerate_tasks(ops, arches, limit, plan_errors, store)
    write = store.write_layer
    where = str(write.base) if write is not None else "(no writable layer)"
    progress.planned(tasks, ops, arches, where)
    records, interrupted, build_seconds = run(tasks, store, jobs, progress, os.pathsep.join(str(p) for p in layers))
    records += plan_errors
    seconds = time.perf_counter() - t0
    summary = summarize(records)
    result = PrebuildResult(arches, layers, ops, len(tasks), records, summary, interrupted, seconds, build_seconds,
                            min(jobs or default_jobs(), default_jobs()), str(write.base) if write is not None else None,
                            len(plan_errors))
    if write is not None:
        add_prebuild_record(write, layer_record(ops, arches, records, summary, interrupted, seconds))
        if any(a.backend == "cuda" for a in arches) and not interrupted:
            install_host_module(write)
    return result


def install_host_module(layer) -> None:
    """The C hot path and CUDA loader (``jitkern.fastcall``) for this Python, and its C++ tensor reader
    for this torch, into the layer: a process over the layer made read-only then needs neither a
    compiler nor Triton to start."""
    for what, install in (("the C hot path", fastcall.install), ("its C++ tensor reader", fastcall.install_torch)):
        try:
            install(layer)
        except Exception as e:  # noqa: BLE001  (no compiler here: the runtime builds it where it runs)
            log.info("jitkern: prebuild: %s was not built into the layer (%s: %s); processes will build it on "
                     "first GPU use", what, type(e).__name__, (str(e).strip().splitlines() or [""])[-1])
