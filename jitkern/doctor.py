"""The per-op part of ``jitkern doctor``: which variant of each op is active on this machine, and why
each earlier one in the fallback order is not.

For every op and every variant, in fallback order, the first configuration the op declares for the
arch is planned (rendered and keyed, nothing is compiled) and looked up:

* ``ready``: built and in the cache;
* ``failed``: a recorded build failure for this toolchain, with the first error line and the log;
* ``unavailable``: the builder's probe says it cannot build here (no nvcc/hipcc, no CK, another vendor);
* ``no config``: the op declares no configuration of this variant for the arch;
* ``buildable``: not built yet; the first call builds it.

For ops whose variants are alternatives in fallback order (``spec.extra["fallback"]`` true, as ops
routed through ``jitkern.fallback`` declare), the active variant is the first ``ready`` or ``buildable``
one; guards (``spec.extra["guards"]``) are printed beside it, since calls they refuse go on to the next
variant. Ops whose variants are several kernels used together get a status per kernel.
"""
from __future__ import annotations

from typing import Any

from . import arch as _arch
from . import builders, registry, settings
from .cache import Store, default_store
from .errors import ArchError, CorruptEntryError, JitkernError
from .failures import is_failure
from .plan import make_job


def doctor_arch():
    """The arch doctor reports for: the GPU here or JITKERN_ARCH, else the CPU interpreter."""
    try:
        return _arch.current(), ""
    except ArchError as e:
        return _arch.ARCHES["cpu"], f"no GPU ({e}); showing the CPU interpreter route"


def _peek(store: Store, key: str):
    """The first sound entry for ``key`` in any layer, read only: nothing is created, discarded or stamped."""
    for layer in store.layers:
        try:
            return layer.verify(key)
        except (FileNotFoundError, CorruptEntryError):
            continue
    return None


def _first_configs(spec, a) -> dict[str, Any]:
    wanted = {v.name for v in spec.variants}
    found: dict[str, Any] = {}
    for cfg in spec.configs(a):
        if cfg.variant in wanted and cfg.variant not in found:
            found[cfg.variant] = cfg
            if len(found) == len(wanted):
                break
    return found


def variant_report(spec, a, store: Store | None = None) -> list[dict[str, Any]]:
    """One record per variant of ``spec`` in fallback order: status, why, guard; ``active`` marks one."""
    store = store or default_store()
    cfgs = _first_configs(spec, a)
    guards = dict(spec.extra.get("guards", {})) if spec.extra else {}
    out = []
    for v in spec.variants:
        rec: dict[str, Any] = {"variant": v.name, "kind": v.kind, "guard": guards.get(v.name, "")}
        cfg = cfgs.get(v.name)
        if cfg is None:
            rec.update(status="no config", why=f"the op declares no {v.name} configuration for {a.name}")
            out.append(rec)
            continue
        try:
            job = make_job(spec, cfg, a)  # doctor only looks: nothing written, not even an index record
            entry = _peek(store, job.key)
        except JitkernError as e:
            rec.update(status="failed", why=f"cannot be planned: {e}")
            out.append(rec)
            continue
        rec["config"] = cfg.describe()
        if entry is not None and is_failure(entry.meta):
            rec.update(status="failed", why=f"build failed: {entry.meta.get('reason')}",
                       log=str(entry.file(entry.meta.get("log", "build.log"))))
        elif entry is not None:
            rec.update(status="ready", why=f"built (key {job.key[:16]})")
        else:
            reason = builders.probe(v.kind, a)
            if reason:
                rec.update(status="unavailable", why=reason)
            else:
                rec.update(status="buildable", why="not built yet; the first call builds it")
        out.append(rec)
    if len(spec.variants) == 1 or (spec.extra and spec.extra.get("fallback")):  # variants are alternatives: the first usable one runs
        for rec in out:
            if rec["status"] in ("ready", "buildable"):
                rec["active"] = True
                break
    return out


def report(ops=None, store: Store | None = None) -> dict[str, Any]:
    a, note = doctor_arch()
    result: dict[str, Any] = {"arch": a.name, "note": note, "ops": {}}
    for name in ops or registry.names():
        try:
            spec = registry.get(name)
            result["ops"][name] = variant_report(spec, a, store)
        except Exception as e:  # one broken op must not hide the others
            result["ops"][name] = [{"variant": "?", "status": "error", "why": f"{type(e).__name__}: {e}"}]
    return result


def section() -> tuple[str, list[tuple[str, str]]]:
    """``jitkern doctor``'s "Ops" section: one row per op variant, the active one marked."""
    r = report()
    rows = []
    for op, recs in r["ops"].items():
        for rec in recs:
            mark = "ACTIVE " if rec.get("active") else ""
            text = f"{mark}{rec['status']}: {rec['why']}"
            if rec.get("log"):
                text += f" (log: {rec['log']})"
            if rec.get("guard") and rec["status"] in ("ready", "buildable"):
                text += f"; guard: {rec['guard']}, other calls go to the next variant"
            rows.append((f"{op}/{rec['variant']}", text))
    title = f"Ops: active variant for {r['arch']}" + (f" ({r['note']})" if r["note"] else "")
    if settings.get("arch"):
        title += " [JITKERN_ARCH]"
    return title, rows
