"""``jitkern doctor``'s sections, as data (``collect()``; the CLI prints them or their ``--json``): the
GPU, toolchains, the AMD toolchain, cache layers, the size cap and signatures, op routes, the remote
cache, tuning and settings not at their default.

The op routes section says which variant of each op is active on this machine, and why each earlier
one in the fallback order is not.

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

import os
import re
import shutil
import time
from typing import Any, Callable

from . import arch as _arch
from . import builders, cachectl, registry, remote, settings, signing, tuning
from .builders import hip
from .cache import Store, default_store
from .errors import ArchError, ConfigError, CorruptEntryError, JitkernError
from .failures import is_failure
from .plan import make_job
from .tables import human_size


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


# ---- the sections of `jitkern doctor` (printed by jitkern.cli) ------------------------------------
def row(key: str, label: str, value: Any, text: str | None = None) -> dict[str, Any]:
    """One doctor row: ``value`` for --json, ``text`` (default: ``str(value)``) for people."""
    return {"key": key, "label": label, "value": value, "text": str(value) if text is None else text}


def section(key: str, title: str, rows: list[dict[str, Any]], data: Any = None) -> dict[str, Any]:
    """A doctor section; ``data`` (default: ``{row key: row value}``) is what ``--json`` shows for it."""
    sec = {"key": key, "title": title, "rows": rows}
    if data is not None:
        sec["data"] = data
    return sec


def _doctor_gpu() -> dict[str, Any]:
    rows = [row("jitkern_arch", "JITKERN_ARCH", settings.get("arch"), settings.get("arch") or "(not set)")]
    try:
        a = _arch.current()
        rows.append(row("arch", "arch", {"name": a.name, "product": a.product, "vendor": a.vendor,
                                         "shared_bytes_per_block": a.shared_mem_per_block},
                        f"{a.name} ({a.product}); LDS/shared per block {a.shared_mem_per_block // 1024} KiB"))
    except JitkernError as e:
        rows.append(row("arch", "arch", {"name": None, "error": str(e)}, f"none: {e}"))
    return section("gpu", "GPU", rows)


#: How to find the version line in ``<tool> --version``'s output.
_VERSION_LINE = {"nvcc": r"release"}


def tool_version(tool: str, output: str) -> str | None:
    """The line of ``output`` that states ``tool``'s version (nvcc: the "release" line; others: the first).
    hipcc and clang are reported by the AMD section (``jitkern.builders.hip.describe``)."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    want = re.compile(_VERSION_LINE.get(tool, "."), re.IGNORECASE)
    return next((ln for ln in lines if want.search(ln)), lines[0] if lines else None)


def _doctor_toolchains() -> dict[str, Any]:
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    rows = []
    for pkg in ("jitkern", "triton", "torch", "numpy"):
        try:
            v = version(pkg)
            rows.append(row(pkg, pkg, v))
        except PackageNotFoundError:
            rows.append(row(pkg, pkg, None, "not installed"))
    for tool in ("nvcc", "ninja", "c++"):  # HIP: its own section
        path = shutil.which(tool)
        if not path:
            rows.append(row(tool, tool, None, "not found"))
            continue
        try:
            r = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20)
            ver = tool_version(tool, r.stdout + "\n" + r.stderr) or "version not reported"
            rows.append(row(tool, tool, {"path": path, "version": ver}, f"{ver} ({path})"))
        except (OSError, subprocess.SubprocessError) as e:
            rows.append(row(tool, tool, {"path": path, "version": None, "error": str(e)}, f"fails to run: {e}"))
    interp = os.environ.get("TRITON_INTERPRET", "")
    rows.append(row("triton_interpret", "TRITON_INTERPRET", interp or None, interp or "(not set)"))
    return section("toolchains", "Toolchains", rows)


def _doctor_cache() -> dict[str, Any]:
    rows, first, layers = [], True, []
    for i, info in enumerate(cachectl.layer_info()):
        role, receives = "read-only", False
        if info.get("installed_from"):
            role = f"installed by {info['installed_from']} (entry point jitkern.cache_layers), read-only"
        elif info["writable"]:
            role = "writable (new entries go here)" if first else "writable, but only read (new entries go to an earlier layer)"
            receives, first = first, False
        value = {**info, "receives_new_entries": receives}
        layers.append(value)
        rows.append(row(f"layer{i}", info["path"], value,
                        f"{role}, {info['entries']} entries, {human_size(info['bytes'])}"))
        if info.get("prebuild"):
            rows.append(row(f"layer{i}_prebuild", "  last prebuild", info["prebuild"],
                            cachectl.describe_prebuild(info["prebuild"])))
    return section("cache", "Cache layers (JITKERN_CACHE_DIR, then installed cache wheels)", rows,
                   {"layers": layers})


def _doctor_cache_policy() -> dict[str, Any]:
    return section("cache_policy", "Cache size cap and signatures (docs/fleet-cache.md)", cachectl.policy_rows())


def _doctor_ops() -> dict[str, Any]:
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
            rows.append(row(f"{op}/{rec['variant']}", f"{op}/{rec['variant']}", rec, text))
    # the no-GPU reason is the GPU section's; here only which route is shown
    title = f"Ops: active variant for {r['arch']}" + (" (no GPU: the CPU interpreter route)" if r["note"] else "")
    if settings.get("arch"):
        title += " [JITKERN_ARCH]"
    return section("ops", title, rows, {"arch": r["arch"], "cpu_route": bool(r["note"]), "ops": r["ops"]})


def _doctor_amd():
    return "AMD toolchain (HIP variants, offline builds for gfx942/gfx950; docs/amd.md)", hip.describe()


def _doctor_settings() -> dict[str, Any]:
    described = settings.describe()
    rows = [row(r["name"], r["env"], r, setting_text(r)) for r in described if r["source"] != "default"]
    return section("settings", "Settings not at their default (all: jitkern config)", rows,
                   {r["name"]: {"value": r["value"], "source": r["source"]} for r in described})




def _doctor_remote() -> dict:
    """``jitkern doctor`` section (see ``jitkern.cli``): the configured remote, whether it answers, how
    many entries it holds."""
    url = settings.get("remote_cache")
    if not url:
        return {"key": "remote", "title": "Remote cache",
                "rows": [row("url", remote.ENV_URL, None, "(not set: no remote cache)")]}
    try:
        signed = bool(settings.get("remote_cache_key"))
        secret = ("set (entries signed and checked)" if signed else
                  "(not set: checksums only; anyone who can write to the server can run code on its readers)")
    except ConfigError as e:
        signed, secret = None, f"error: {e}"
    rows = [row("url", remote.ENV_URL, remote.redact(url), remote.redact(url)), row("signed", remote.ENV_SECRET, signed, secret)]
    try:
        pub = signing.verify_keys()
        priv = signing.sign_key()
        value = {"verify_keys": [signing.key_id(k) for k in pub or ()],
                 "sign_key": signing.key_id(priv.public_key()) if priv is not None else None}
        rows.append(row("ed25519", "Ed25519", value,
                        (f"entries must be signed by {', '.join(value['verify_keys'])}" if pub else
                         "entries are not checked for an Ed25519 signature (JITKERN_CACHE_VERIFY_KEY not set)")
                        + (f"; publishing signed by {value['sign_key']}" if priv is not None else "")))
    except ConfigError as e:
        rows.append(row("ed25519", "Ed25519", {"error": str(e)}, f"error: {e}"))
    try:
        r = remote.from_env(url)
        t0 = time.perf_counter()
        r.client.ping()
        ms = 1000 * (time.perf_counter() - t0)
        n = sum(1 for _ in r.client.scan_iter(match=f"{remote.PREFIX}entry:*", count=1000))
        rows.append(row("server", "server", {"reachable": True, "ping_ms": round(ms, 3), "entries": n,
                                             "format": remote.FORMAT_VERSION},
                        f"answers in {ms:.1f} ms; {n} jitkern entries (format v{remote.FORMAT_VERSION})"))
    except Exception as e:
        rows.append(row("server", "server", {"reachable": False, "error": f"{type(e).__name__}: {e}"},
                        f"not usable: {type(e).__name__}: {e} (builds go on without it)"))
    return {"key": "remote", "title": "Remote cache", "rows": rows}


def _doctor_tuning() -> dict:
    """The ``jitkern doctor`` section (see ``jitkern.cli``): autotune switch, tile overrides in the
    environment, tuning records in the cache layers, shipped tables."""
    on = settings.get("autotune")
    rows = [row("autotune", "JITKERN_AUTOTUNE", on, ("1 (tune on first use)" if on else "0")
                if settings.source("autotune") != "default" else "(not set: recorded and shipped winners only)")]
    overrides = {k: v for op in sorted(tuning._op_names()) for k, v in sorted(settings.tile_overrides(op).items())}
    rows.append(row("tile_overrides", "tile overrides", overrides,
                    ", ".join(f"{k}={v}" for k, v in overrides.items()) or "(none)"))
    records, shipped = {}, {}
    for d in tuning._tuning_dirs():
        files = sorted(d.glob("*/*/*.json")) if d.is_dir() else []
        per: dict[str, int] = {}
        for f in files:
            k = f"{f.parent.parent.name}/{f.parent.name}"
            per[k] = per.get(k, 0) + 1
        records[str(d)] = per
        rows.append(row(f"records:{d}", f"records in {d}", per,
                        ", ".join(f"{k}: {v}" for k, v in sorted(per.items())) or "(none)"))
    for path in sorted(tuning.TUNED_DIR.glob("*.json")):
        table = tuning.shipped_table(path.stem)
        n = sum(len(b) for dt in table.get("ops", {}).values() for b in dt.values())
        source = table.get("source", "")
        shipped[path.stem] = {"entries": n, "source": source}
        rows.append(row(f"shipped:{path.stem}", f"shipped {path.stem}", {"entries": n, "source": source},
                        f"{n} entries; {source}"))
    return {"key": "tuning", "title": "Tuning (tile winners: records in the cache, then shipped tables)",
            "rows": rows, "data": {"autotune": on, "tile_overrides": overrides, "records": records,
                                   "shipped": shipped}}


def _normalise_section(fn, result) -> dict[str, Any]:
    """A section in the old ``(title, [(label, text)])`` form becomes the dict form (text values)."""
    if isinstance(result, dict):
        return result
    title, pairs = result
    key = re.sub(r"[^a-z0-9]+", "_", getattr(fn, "__name__", title).lower().replace("_doctor_", "")).strip("_")
    return section(key, title, [row(re.sub(r"[^a-z0-9]+", "_", k.lower()).strip("_"), k, v, v) for k, v in pairs])


def setting_text(r: dict[str, Any]) -> str:
    v = r["value"]
    if isinstance(v, dict) and "error" in v:
        return f"error: {v['error']}"
    if v is None or v == [] or v == "":
        text = "(not set)" if not r["default"] or r["default"] == v else f"(not set: {r['default']})"
    elif isinstance(v, bool):
        text = "1 (on)" if v else "0 (off)"
    elif isinstance(v, list):
        text = (os.pathsep if r["type"] == "paths" else ",").join(map(str, v)) if r["type"] != "flags" else " ".join(v)
    else:
        text = str(v)
    return f"{text}  [{r['source']}]"


#: ``jitkern doctor`` prints each of these sections; append yours.
SECTIONS: list[Callable[[], dict[str, Any]]] = [
    _doctor_gpu, _doctor_toolchains, _doctor_amd, _doctor_cache, _doctor_cache_policy, _doctor_ops, _doctor_remote,
    _doctor_tuning, _doctor_settings,
]


def collect() -> list[dict[str, Any]]:
    """Every section, in order; a section that raises becomes one error row (it must not hide the others)."""
    out = []
    for fn in SECTIONS:
        try:
            sec = _normalise_section(fn, fn())
        except Exception as e:
            name = getattr(fn, "__name__", "section").replace("_doctor_", "")
            sec = section(name, name, [row("error", "error", f"{type(e).__name__}: {e}")])
        out.append(sec)
    return out
