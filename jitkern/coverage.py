"""From a manifest to the artifacts that serve it: resolve, prebuild exactly those, check, explain.

Each recorded signature (``jitkern.manifest``) is rebuilt as meta tensors and handed to the op's own
plan through its dispatcher (``Dispatcher.candidates``: the same code, tuned tables, arch rules and
``JITKERN_<OP>_<PARAM>`` overrides as a lazy call), run for each named arch without a GPU. The
runtime takes the first candidate whose kernels build and fit the arch's budget (``jitkern.fallback``),
so resolution walks the candidates the same way:

- ``prebuild``: build the current candidate of every (signature, arch) in parallel
  (``jitkern.prebuild.run``: cache hits are only looked up); a candidate rejected over budget, whose
  toolchain is unavailable or whose build failed passes to the next one, in another round, until
  every signature is covered or out of candidates;
- ``check``: the same walk with lookups only: a (signature, arch) is covered if the cache (all
  layers) holds the kernels of the candidate the runtime would run; otherwise the first missing
  job is named, and ``explain`` says why it misses (``jitkern.strict.describe_miss``).

Arch ``cpu`` (Triton's interpreter) is resolved as the runtime does for CPU tensors: configs are
chosen for ``JITKERN_ARCH`` if it is set, and must then also be built for that arch (the runtime
checks their budget there).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from . import arch as _arch
from . import manifest as _manifest
from . import prebuild as _prebuild
from . import registry, settings, strict
from .cache import Store, add_prebuild_record, catalog, configured_layers
from .dispatch import dispatcher
from .errors import ConfigError, JitkernError
from .plan import Job, plan
from .spec import Candidate

#: Prebuild statuses after which the runtime moves on to the next candidate.
_NEXT = ("rejected_over_budget", "unavailable", "failed")


def select_arch(a: _arch.Arch) -> _arch.Arch:
    """The arch whose rules choose configs for kernels built for ``a`` (``jitkern.runtime.arches_for``)."""
    if a.backend is not None:
        return a
    named = settings.get("arch")
    return _arch.get(named) if named else a


@dataclass
class Item:
    """One recorded signature on one arch, and where resolving it got to."""

    record: dict[str, Any]
    arch: _arch.Arch
    select: _arch.Arch
    candidates: list[Candidate] | None = None  # None: the plan launches nothing for this signature
    index: int = 0
    status: str = "pending"  # pending | covered | uncovered | empty | error
    covered_by: list[str] = field(default_factory=list)
    missing: list[Job] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # candidates passed over, and why
    error: str = ""
    args: tuple = ()

    @property
    def signature(self) -> str:
        return _manifest.describe(self.record)

    def current(self) -> Candidate | None:
        if self.candidates is None or self.index >= len(self.candidates):
            return None
        return self.candidates[self.index]

    def jobs(self, cand: Candidate) -> list[Job]:
        """What running ``cand`` needs built: each launch's config for the arch (and for the selection
        arch too, where it differs: the runtime checks the budget there)."""
        spec = registry.get(self.record["op"])
        out = []
        for la in cand.launches:
            if self.select is not self.arch and self.select.backend is not None:
                out.append(plan(spec, la.config, self.select))
            out.append(plan(spec, la.config, self.arch))
        return out

    def guard_refuses(self, cand: Candidate) -> bool:
        if cand.guard is None:
            return False
        try:
            return not cand.guard(*self.args)
        except Exception:  # a guard that cannot judge meta tensors: assume it takes the call
            return False

    def advance(self, why: str) -> None:
        cand = self.current()
        self.skipped.append(f"{cand.name if cand else '?'}: {why}")
        self.index += 1
        if self.current() is None:
            self.status = "uncovered"
            self.error = "no candidate can run it: " + "; ".join(self.skipped)

    def report(self) -> dict[str, Any]:
        return {"signature": self.record, "describe": self.signature, "arch": self.arch.name,
                "select_arch": self.select.name, "status": self.status, "covered_by": list(self.covered_by),
                "missing": [j.describe() for j in self.missing], "skipped": list(self.skipped),
                "error": self.error or None}


def resolve(man: _manifest.Manifest, arches: Iterable[_arch.Arch], ops: Iterable[str] | None = None) -> list[Item]:
    """Every (signature, arch) of ``man`` with its candidates from the op's plan (``ops``: only these)."""
    wanted = set(ops or ())
    items = []
    for a in arches:
        select = select_arch(a)
        for rec in man.records:
            if wanted and rec["op"] not in wanted:
                continue
            it = Item(rec, a, select)
            items.append(it)
            try:
                d = dispatcher(registry.get(rec["op"]))
                it.args = _manifest.meta_args(d.spec, d.names, d.tensors, rec)
                it.candidates = d.candidates(it.args, select, None)
            except JitkernError as e:
                it.status, it.error = "error", f"{type(e).__name__}: {e}"
                continue
            if it.candidates is None:
                it.status = "empty"  # nothing to launch (an empty tensor): covered by definition
            else:
                _skip_refused(it)
    return items


def _skip_refused(it: Item) -> None:
    while it.status == "pending" and it.current() is not None and it.guard_refuses(it.current()):
        it.advance(f"its guard refuses the signature ({it.current().guard_doc or 'guard'})")


def _settle(it: Item, statuses: dict[str, str], errors: dict[str, str]) -> None:
    """Move ``it`` on from what happened to the jobs of its current candidate."""
    cand = it.current()
    jobs = it.jobs(cand)
    bad = [(j, statuses.get(j.key, "missing")) for j in jobs if statuses.get(j.key, "missing") != "ok"]
    if not bad:
        it.status, it.covered_by = "covered", [j.config.describe() for j in jobs if j.arch is it.arch]
        return
    job, status = bad[0]
    if status == "missing":
        it.status, it.missing = "uncovered", [j for j, s in bad if s == "missing"]
        return
    if status == "transient":  # the runtime would retry this candidate, not move on: run prebuild again
        it.status, it.missing = "uncovered", [job]
        it.error = f"{job.describe()} failed transiently ({errors.get(job.key) or 'see the report'}); run prebuild again"
        return
    it.advance(f"{job.describe()} {status}" + (f" ({errors[job.key]})" if errors.get(job.key) else ""))
    _skip_refused(it)


def _walk_torch(it: Item) -> bool:
    cand = it.current()
    if cand is not None and cand.torch is not None:
        it.status, it.covered_by = "covered", [f"torch:{cand.name}"]
        return True
    return False


# ---- check: lookups only -------------------------------------------------------------------------
def check(items: list[Item], store: Store) -> list[Item]:
    """Resolve every pending item against the cache without building anything."""
    for it in items:
        while it.status == "pending":
            if _walk_torch(it):
                break
            statuses, errors = {}, {}
            for job in it.jobs(it.current()):
                entry = store.lookup(job.key)
                if entry is None:
                    statuses[job.key] = "missing"
                    break
                s = str(entry.meta.get("status") or "ok")
                if s == "failed":
                    s = "unavailable" if entry.meta.get("unavailable") else "failed"
                    errors[job.key] = str(entry.meta.get("reason") or entry.meta.get("error") or "")[:200]
                statuses[job.key] = "ok" if s not in _NEXT else s
                if s in _NEXT:
                    break
            _settle(it, statuses, errors)
    return items


def explain(items: list[Item], store: Store) -> list[dict[str, Any]]:
    """For each uncovered item, why its first missing job is not in the cache (the nearest entry
    and the key parts in which it differs)."""
    entries = catalog(store)
    out = []
    for it in items:
        rep = it.report()
        if it.missing:
            msg, lines, near = strict.describe_miss(it.missing[0], store, entries)
            rep.update(explanation=msg, differences=lines,
                       nearest=str(near.path) if near is not None else None)
        out.append(rep)
    return out


# ---- prebuild: build rounds ----------------------------------------------------------------------
def prebuild(items: list[Item], store: Store, jobs: int | None, progress: _prebuild.Progress | None,
             layers_env: str) -> tuple[list[dict[str, Any]], bool, float]:
    """Build what every pending item's current candidate needs, round after round (a round moves
    items whose candidate was rejected on to the next one). Returns (artifact records, interrupted,
    build seconds)."""
    records: dict[str, dict[str, Any]] = {}
    seconds, interrupted = 0.0, False
    while not interrupted:
        for it in items:
            if it.status == "pending":
                _walk_torch(it)
        pending = [it for it in items if it.status == "pending"]
        if not pending:
            break
        tasks = {}
        for it in pending:
            for job in it.jobs(it.current()):
                if job.key not in records and job.key not in tasks:
                    tasks[job.key] = _prebuild.Task(job.spec.name, getattr(job.spec.fn, "__module__", "") or "",
                                                    job.config.variant, job.config.params, job.arch.name, job.key)
        got, interrupted, dt = _prebuild.run(list(tasks.values()), store, jobs, progress, layers_env)
        seconds += dt
        for r in got:
            records[r["key"]] = r
        statuses = {k: ("ok" if r["status"] in ("built", "cached") else
                        "transient" if r["status"] == "failed" and r.get("transient") else r["status"])
                    for k, r in records.items()}
        errors = {k: (r.get("error") or "").splitlines()[0][:200] if r.get("error") else "" for k, r in records.items()}
        for it in pending:
            if interrupted:
                break
            _settle(it, statuses, errors)
    return list(records.values()), interrupted, seconds


def counts(items: list[Item]) -> dict[str, int]:
    out = dict.fromkeys(("covered", "uncovered", "empty", "error", "pending"), 0)
    for it in items:
        out[it.status] = out.get(it.status, 0) + 1
    return out


def layer_prebuild_record(man, arches, items, artifacts, interrupted: bool) -> dict[str, Any]:
    """What ``prebuild --manifest`` records in the layer it built (``jitkern.cache.add_prebuild_record``)."""
    from importlib.metadata import version

    from . import __version__

    c = counts(items)
    per_status: dict[str, int] = {}
    for r in artifacts:
        per_status[r["status"]] = per_status.get(r["status"], 0) + 1
    return {
        "manifest": {"path": os.path.abspath(man.path), "digest": man.digest, "signatures": len(man)},
        "arches": [a.name for a in arches],
        "counts": {"signatures": len(man), **c, "artifacts": len(artifacts), **per_status},
        "complete": not interrupted and c["covered"] + c["empty"] == len(items),
        "created": time.time(), "jitkern": __version__, "triton": version("triton"),
    }


def load_manifest(path) -> _manifest.Manifest:
    man = _manifest.read(path)
    if not len(man):
        raise ConfigError(f"manifest {path} holds no signatures; record one with JITKERN_RECORD={path} or "
                          f"'jitkern record -o {path} -- CMD ...'")
    return man


@dataclass
class ManifestPrebuild:
    """What ``prebuild_manifest`` did."""

    items: list[Item]
    artifacts: list[dict[str, Any]]
    record: dict[str, Any]  # what it recorded in the layer (``layer_prebuild_record``)
    interrupted: bool
    seconds: float
    build_seconds: float

    def report(self) -> dict[str, Any]:
        """The JSON report (``jitkern prebuild --manifest ... --json`` / ``--report``)."""
        return {**self.record, "build_seconds": round(self.build_seconds, 3),
                "summary": _prebuild.summarize(self.artifacts), "signatures": [it.report() for it in self.items],
                "artifacts": sorted(self.artifacts, key=lambda r: (r["arch"], r["op"], r["key"]))}


def prebuild_manifest(path, arches: Iterable[_arch.Arch] | None = None, ops: Iterable[str] | None = None,
                      cache_dir=None, jobs: int | None = None, progress: _prebuild.Progress | None = None,
                      started=None) -> ManifestPrebuild:
    """Build exactly what the signatures of the manifest at ``path`` run on each arch, and record the
    prebuild in the layer it built. ``started(manifest, arches, where)``, if given, is called once
    the signatures are resolved, before anything is built. Never prints (``jitkern.cli`` does)."""
    strict.suspend()  # building is the point (plans may compile budget probes in this process)
    t0 = time.perf_counter()
    man = load_manifest(path)
    arches = _prebuild.resolve_arches(arches)
    layers = configured_layers(cache_dir)
    store = Store(layers)
    items = resolve(man, arches, ops)
    write = store.write_layer
    if started is not None:
        started(man, arches, write.base if write else "(no writable layer)")
    artifacts, interrupted, build_seconds = prebuild(items, store, jobs, progress,
                                                     os.pathsep.join(str(p) for p in layers))
    seconds = time.perf_counter() - t0
    rec = layer_prebuild_record(man, arches, items, artifacts, interrupted)
    rec["seconds"] = round(seconds, 3)
    if write is not None:
        add_prebuild_record(write, rec)
        if any(a.backend == "cuda" for a in arches) and not interrupted:
            _prebuild.install_host_module(write)
    return ManifestPrebuild(items, artifacts, rec, interrupted, seconds, build_seconds)


def check_manifest(path, arches, cache_dir=None) -> tuple[list[Item], Store]:
    """Every signature of the manifest at ``path`` on ``arches`` (``Arch``es; None: the detected
    GPU), checked against the cache's layers (``cache_dir``: as ``--cache-dir``): the items
    (``status`` ``covered``/``empty`` are served without compiling) and the store they were checked in
    (``explain`` takes both). ``jitkern cache check`` and ``cache explain`` print them."""
    man = load_manifest(path)
    store = Store(configured_layers(cache_dir))
    return check(resolve(man, _prebuild.resolve_arches(arches)), store), store


__all__ = ["Item", "resolve", "check", "explain", "prebuild", "counts", "layer_prebuild_record", "select_arch",
           "prebuild_manifest", "ManifestPrebuild", "check_manifest"]
