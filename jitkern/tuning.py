"""Persistent autotuning: benchmark an op's candidates once per (arch, op, dtype, shape bucket,
compiler fingerprint), keep the winner, and put it first in the op's candidate order.

Where winners come from, first match wins:

1. **Records** written by a tuning run on this machine or fleet: one JSON file per key under
   ``<cache layer>/v<N>/tuning/<arch>/<op>/<dtype>-<bucket>-<fingerprint>.json`` in any layer of
   ``JITKERN_CACHE_DIR`` (so a container image can ship them in its read-only layer). A record is
   used only if its compiler fingerprint (Triton version, code-generation environment, the op's
   template text) matches the running one: a new toolchain retunes instead of trusting old timings.
2. **Shipped tables** in the package, ``jitkern/tuned/<arch>.json``: winners measured on real
   hardware (sm_90: an H100, ``tools/tune_gemm.py``) or reasoned defaults (gfx942/gfx950). They
   are a preference, not a pin: the winner still passes the arch rules and the budget check.

Tuning runs only when asked: ``JITKERN_AUTOTUNE=1`` (an op tunes a bucket on first use when it has
no record), or ``jitkern tune --op NAME --shapes MxNxK,...``. One process tunes a key at a time
(a file lock); the others wait and then read its record.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from . import settings, state
from .errors import BuildError, ConfigError, LaunchError, NoDeviceError, OverBudgetError
from .logs import warn_once
from . import registry, runtime
from .cache import default_store
from .key import FORMAT_VERSION, triton_fingerprint

log = logging.getLogger("jitkern")

RECORD_VERSION = 1
TUNED_DIR = Path(__file__).resolve().parent / "tuned"
_memory_records: dict[tuple, dict] = {}  # when no cache layer is writable


def autotune_enabled() -> bool:
    return settings.get("autotune")


# ---- fingerprint ---------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _template_hash(op: str) -> str:
    spec = registry.get(op)
    h = hashlib.sha256()
    for v in spec.variants:
        path = Path(spec.template_dir) / v.template
        h.update(v.name.encode() + b"\0")
        h.update(path.read_bytes() if path.is_file() else b"")
    return h.hexdigest()


def fingerprint(arch: str, op: str) -> dict[str, Any]:
    """What a tuning result depends on besides the shape: toolchain, codegen env, template text."""
    return {"arch": arch, "op": op, "compiler": triton_fingerprint(), "template": _template_hash(op),
            "format": FORMAT_VERSION, "record": RECORD_VERSION}


def fingerprint_hash(arch: str, op: str) -> str:
    fp = fingerprint(arch, op)
    memo = (arch, op, fp["compiler"]["triton"], tuple(fp["compiler"]["env"].items()), fp["template"])
    h = _fingerprint_hashes.get(memo)  # a pure function of the fingerprint (which is read afresh)
    if h is None:
        blob = json.dumps(fp, sort_keys=True, separators=(",", ":"))
        h = _fingerprint_hashes[memo] = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return h


_fingerprint_hashes: dict = {}


@state.on_reset
def _forget() -> None:
    _fingerprint_hashes.clear()


# ---- records -------------------------------------------------------------------------------------
def _tuning_dirs() -> list[Path]:
    return [layer.root / "tuning" for layer in default_store().layers]


def _record_name(dtype: str, bucket: str, fp: str) -> str:
    return f"{dtype}-{bucket}-{fp}.json"


def record_path(arch: str, op: str, dtype: str, bucket: str) -> Path | None:
    """Where a new record for this key goes (first writable cache layer), or None."""
    layer = default_store().write_layer
    if layer is None:
        return None
    return layer.root / "tuning" / arch / op / _record_name(dtype, bucket, fingerprint_hash(arch, op))


def load_record(arch: str, op: str, dtype: str, bucket: str) -> dict | None:
    """The tuning record for this key and the running toolchain, from any cache layer."""
    fp = fingerprint_hash(arch, op)
    mem = _memory_records.get((arch, op, dtype, bucket, fp))
    if mem is not None:
        return mem
    name = _record_name(dtype, bucket, fp)
    for d in _tuning_dirs():
        path = os.path.join(d, arch, op, name)  # strings: this runs for every decided signature of a tuned op
        try:
            with open(path, encoding="utf-8") as f:
                rec = json.loads(f.read())
        except (FileNotFoundError, NotADirectoryError):
            continue
        except (OSError, ValueError) as e:
            warn_once(("bad-tuning-record", str(path)), "jitkern: ignoring unreadable tuning record %s (%s)", path, e)
            continue
        if isinstance(rec, dict) and rec.get("fingerprint_hash") == fp and isinstance(rec.get("params"), dict):
            return rec
    return None


def save_record(record: Mapping[str, Any]) -> Path | None:
    """Write a record atomically (temp file + rename) into the first writable cache layer."""
    key = (record["arch"], record["op"], record["dtype"], record["bucket"], record["fingerprint_hash"])
    path = record_path(record["arch"], record["op"], record["dtype"], record["bucket"])
    if path is None:
        warn_once(("tuning-in-memory",), "jitkern: no writable cache layer; tuning results kept in memory only")
        _memory_records[key] = dict(record)
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return path


@functools.lru_cache(maxsize=None)
def shipped_table(arch: str) -> dict:
    """``jitkern/tuned/<arch>.json`` (empty if there is none)."""
    path = TUNED_DIR / f"{arch}.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


def shipped(arch: str, op: str, dtype: str, bucket: str | Sequence[str]) -> dict | None:
    """The shipped winner's parameters for ``bucket``; given several (most specific first), those of
    the first that has one."""
    entries = shipped_table(arch).get("ops", {}).get(op, {}).get(dtype, {})
    for b in (bucket,) if isinstance(bucket, str) else bucket:
        if entries.get(b):
            return dict(entries[b]["params"])
    return None


def lookup(arch: str, op: str, dtype: str, bucket: str) -> dict | None:
    """The preferred tile parameters for this key: a matching record, else the shipped table."""
    rec = load_record(arch, op, dtype, bucket)
    if rec is not None:
        return dict(rec["params"])
    return shipped(arch, op, dtype, bucket)


# ---- tuning --------------------------------------------------------------------------------------
def _bench(fn: Callable[[], Any]) -> float:
    """Median milliseconds of ``fn`` on the current GPU (Triton's benchmarking helper)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def tune(spec, arch, dtype: str, bucket: str, cfgs, run: Callable, info: Mapping[str, Any] | None = None,
         check: Callable[[Callable], str | None] | None = None, *,
         bench: Callable[[Callable], float] | None = None) -> dict:
    """Benchmark ``cfgs`` (Configs) with ``run(cfg) -> launch function`` and persist the winner.

    Candidates over the budget or failing to build/load are recorded with the reason and skipped;
    so is one whose results ``check(fn)`` (runs ``fn`` on fresh outputs, compares them with the
    op's reference) calls wrong: a fast wrong kernel must never win. ``bench(fn) -> ms`` times one
    candidate (default: Triton's ``do_bench`` on the GPU). Returns the record.
    """
    bench = bench or _bench
    results = []
    for cfg in cfgs:
        tile = {k: v for k, v in cfg.p.items() if k in spec.tunables}
        try:
            fn = run(cfg)
            fn()  # compile/load and warm up outside the timing
            wrong = check(fn) if check is not None else None
            if wrong:
                results.append({"params": tile, "wrong": wrong})
                log.warning("jitkern: tune %s %s %s on %s: candidate %s gives wrong results (%s); skipped",
                            spec.name, dtype, bucket, arch.name, tile, wrong)
                continue
            ms = bench(fn)
        except OverBudgetError as e:
            results.append({"params": tile, "rejected": str(e)})
            continue
        except (BuildError, LaunchError) as e:
            results.append({"params": tile, "failed": f"{type(e).__name__}: {e}"})
            continue
        results.append({"params": tile, "ms": round(ms, 6)})
        log.debug("jitkern: tune %s %s %s %s: %.4f ms", spec.name, arch.name, bucket, tile, ms)
    timed = [r for r in results if "ms" in r]
    if not timed:
        raise BuildError(f"tuning {spec.name} {dtype} {bucket} on {arch.name}: no candidate could run: {results}")
    best = min(timed, key=lambda r: r["ms"])
    record = {
        "arch": arch.name, "op": spec.name, "dtype": dtype, "bucket": bucket,
        "fingerprint": fingerprint(arch.name, spec.name), "fingerprint_hash": fingerprint_hash(arch.name, spec.name),
        "params": best["params"], "ms": best["ms"], "results": results, "created": time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": _device_name(), **dict(info or {}),
    }
    path = save_record(record)
    log.info("jitkern: tuned %s %s %s on %s: %s (%.4f ms, %d candidates) -> %s", spec.name, dtype, bucket, arch.name,
             best["params"], best["ms"], len(results), path or "memory")
    return record


def ensure_tuned(spec, arch, dtype: str, bucket: str, make_args: Callable[[], tuple]) -> dict:
    """The record for this key, tuning first (once across processes, under a file lock) if there is
    none. ``make_args() -> (cfgs, run, info)`` prepares the benchmark only when it is needed."""
    rec = load_record(arch.name, spec.name, dtype, bucket)
    if rec is not None:
        return rec
    path = record_path(arch.name, spec.name, dtype, bucket)
    if path is None:
        return tune(spec, arch, dtype, bucket, *make_args())
    import filelock

    path.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(path) + ".lock"):
        rec = load_record(arch.name, spec.name, dtype, bucket)
        if rec is None:
            rec = tune(spec, arch, dtype, bucket, *make_args())
    return rec


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    """``"4096x4096x4096,16x4096x4096"`` -> [(4096, 4096, 4096), (16, 4096, 4096)]."""
    shapes = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        try:
            dims = tuple(int(x) for x in part.lower().split("x"))
        except ValueError:
            dims = ()
        if not dims or any(d < 1 for d in dims):
            raise ConfigError(f"cannot read shape {part!r} in {text!r}; write sizes joined by 'x', shapes "
                              f"separated by commas, e.g. 4096x4096x4096,16x4096x4096 (M x N x K for gemm)")
        shapes.append(dims)
    if not shapes:
        raise ConfigError(f"no shape in {text!r}; e.g. --shapes 4096x4096x4096,16x4096x4096")
    return shapes


def tune_op(op: str, shapes, dtype: str = "bf16", *, b_trans: bool = False, force: bool = False,
            device=None, exact: bool = False) -> list[dict]:
    """Tune ``op`` on this GPU for ``shapes`` (grouped by the op's shape buckets; the shapes of one
    bucket are timed together) and persist one record per bucket. Buckets that already have a
    record for this toolchain are kept unless ``force``. ``exact``: the op's most specific records
    instead (its ``tuning_bucket(shape, b_trans, exact=True)``; gemm: one per weight shape).
    Returns the records, in bucket order."""
    import torch

    spec = registry.get(op)
    bucket_of, make = spec.extra.get("tuning_bucket"), spec.extra.get("tune_args")
    if bucket_of is None or make is None:
        raise ConfigError(f"op {op!r} cannot be tuned: its spec declares no 'tuning_bucket' and 'tune_args' in "
                          f"extra")
    if exact and "exact" not in inspect.signature(bucket_of).parameters:
        raise ConfigError(f"op {op!r} keeps no exact tuning records (its 'tuning_bucket' takes no exact=); tune it "
                          f"per bucket, without --exact")
    if device is None:
        if not torch.cuda.is_available():
            raise NoDeviceError("tuning measures kernels on a GPU and none was found; run `jitkern tune` on the "
                                "machine whose arch you are tuning")
        device = torch.device("cuda", torch.cuda.current_device())
    _, arch = runtime.arches_for(device)
    groups: dict[str, list] = {}
    for shape in shapes:
        name = bucket_of(shape, b_trans, exact=True) if exact else bucket_of(shape, b_trans)
        groups.setdefault(name, []).append(tuple(shape))
    records = []
    for b, group in groups.items():
        if force:
            records.append(tune(spec, arch, dtype, b, *make(dtype, group, b_trans, device)))
        else:
            records.append(ensure_tuned(spec, arch, dtype, b, lambda: make(dtype, group, b_trans, device)))
    return records


def table_entry(record: Mapping[str, Any]) -> dict:
    """What a shipped table keeps of a record (``jitkern/tuned/<arch>.json``)."""
    return {"params": dict(record["params"]), "ms": record.get("ms"), "shapes": record.get("shapes"),
            "device": record.get("device"), "triton": record.get("fingerprint", {}).get("compiler", {}).get("triton"),
            "tuned": record.get("created")}


def _op_names() -> set[str]:
    return set(registry.names())


def _device_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except Exception:  # informational only
        return "unknown"


__all__ = ["parse_shapes", "tune_op", "table_entry", "autotune_enabled", "fingerprint", "fingerprint_hash", "load_record", "save_record", "shipped",
           "shipped_table", "lookup", "tune", "ensure_tuned", "record_path"]
