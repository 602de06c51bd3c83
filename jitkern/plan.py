"""Stage 1 of the pipeline: plan a job — render an op's config for an arch and key it.

``plan(spec, config, arch)`` is the one entry point. It goes through the plan index: which rendered
source a (spec, config, arch) gives, so a warm process skips Jinja. Rendering is most of what a warm
start costs before the GPU loads anything (importing Jinja alone takes tens of milliseconds), and it
is a pure function of the op's template folder, the config's parameters and the arch, so jitkern
remembers its result: one small JSON file per planned job,

    <layer>/v<FORMAT_VERSION>/index/<ih[:2]>/<ih>.json     {"key": ..., "source": ...}

where ``ih`` hashes everything rendering depends on: the op, variant, parameters, arch, the content
of every file in the template folder (by name, size and mtime) and of jitkern's render/plan code,
plus the builder's fingerprint. A record is trusted only for a key some layer holds an entry for
(the entry's own source, checked against its manifest when it loads), and a hit keys the stored
source the usual way: if that key is not the one recorded, the record is ignored and the job is
rendered. So the index can make a plan faster, never different, and never supplies a source to
build. Records are written privately and atomically into the first writable layer (prebuild writes
them into the layer it builds) and read from every layer held to the cache's ownership rules.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__, builders, state
from .arch import Arch
from .cache import Store, default_store, read_private, write_private
from .key import FORMAT_VERSION, make_key, recorded
from .logs import log
from .render import render
from .spec import COMPILE_OPTIONS, Config, OpSpec, Variant


@dataclass(frozen=True)
class Job:
    """One artifact to build: an op's config rendered for an arch, with its key."""

    spec: OpSpec
    variant: Variant
    config: Config
    arch: Arch
    source: str
    signature: dict[str, str]
    parts: tuple[tuple[str, Any], ...] = field(repr=False)
    key: str

    def describe(self) -> str:
        return f"{self.spec.name}/{self.config.describe()} for {self.arch.name}"


def plan(spec: OpSpec, config: Config, arch: Arch, store: Store | None = None) -> Job:
    """The job for ``config`` of ``spec`` on ``arch``: from the plan index of ``store``'s layers
    when a record checks out, else rendered (and recorded in the first writable layer)."""
    store = store or default_store()
    compiler = builders.get(spec.variant(config.variant).kind).fingerprint(arch)
    ih = index_key(spec, config, arch, compiler)
    for layer in store.layers:
        try:
            layer.ensure_secure()
            rec = json.loads(read_private(os.path.join(os.fspath(layer.root), "index", ih[:2], f"{ih}.json")))
            key, source = rec["key"], rec["source"]
        except (OSError, ValueError, KeyError, TypeError) as e:  # CorruptEntryError/InsecureCacheError too
            if not isinstance(e, FileNotFoundError):
                log.debug("jitkern: plan index record %s in %s not used: %s", ih[:16], layer, e)
            continue
        if not isinstance(source, str) or not store.has_entry(key):
            continue  # only an entry's own source is trusted: no entry, render (never build a record's source)
        job = make_job(spec, config, arch, source, compiler)
        if job.key == key:
            return job
        log.debug("jitkern: plan index record %s in %s does not match its key; rendering", ih[:16], layer)
    job = make_job(spec, config, arch, None, compiler)
    _remember(store, ih, job)
    return job


def make_job(spec: OpSpec, config: Config, arch: Arch, source: str | None = None,
             compiler: dict | None = None) -> Job:
    """Render (unless ``source`` is given) and key ``config`` for ``arch``, bypassing the index.
    ``compiler``: the builder's fingerprint for ``arch``, where the caller has just computed it."""
    variant = spec.variant(config.variant)
    params = config.p
    if source is None:
        context = {
            **{k: v for k, v in params.items() if k not in COMPILE_OPTIONS},
            "arch": arch.name,
            "vendor": arch.vendor,
            "warp_size": arch.warp_size,
        }
        source = render(spec.template_dir, variant.template, context)
    signature = {a.name: a.resolve(params) for a in variant.args}
    parts = (
        ("format", FORMAT_VERSION),
        ("op", spec.name),
        ("variant", [variant.name, variant.kind, variant.kernel]),
        ("source", source),
        ("params", params),
        ("signature", signature),
        ("specialization", sorted(a.name for a in variant.args if a.is_pointer or params.get(a.divisible_if or ""))),
        ("arch", [arch.name, arch.backend, arch.triton_arch, arch.warp_size]),
        ("compile_options", config.compile_options()),
        ("compiler", builders.get(variant.kind).fingerprint(arch) if compiler is None else compiler),
    )
    return Job(spec, variant, config, arch, source, signature, parts, make_key(parts))


def job_meta(job: Job) -> dict[str, Any]:
    """What every entry records about the job that made it (built artifacts and failure records)."""
    return {
        "op": job.spec.name,
        "variant": job.variant.name,
        "kind": job.variant.kind,
        "kernel": job.variant.kernel,
        "arch": job.arch.name,
        "params": job.config.p,
        **recorded(job.parts),  # key_parts and part_hashes: what explains a later miss (jitkern.strict)
        "created": time.time(),
    }


# ---- the plan index ------------------------------------------------------------------------------
_RENDER_CODE = tuple(os.path.join(os.path.dirname(os.path.abspath(__file__)), n) for n in ("plan.py", "render.py"))
_dir_digests: dict = {}
_render_stats: tuple | None = None


def _stat_list(paths) -> tuple:
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((p, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((p, -1, -1))
    return tuple(out)


def _files_under(d) -> list[str]:
    found = []
    for root, dirs, files in os.walk(d):
        dirs[:] = sorted(x for x in dirs if x != "__pycache__")
        found.extend(os.path.join(root, f) for f in sorted(files))
    return found


def _digest(template_dir: Path) -> str:
    """Hash of the template folder's files and jitkern's rendering code (memoised on their stats)."""
    global _render_stats
    if _render_stats is None:  # the code this process runs: imported once, so looked at once
        _render_stats = _stat_list(_RENDER_CODE)
    stats = _stat_list(_files_under(template_dir)) + _render_stats
    d = _dir_digests.get(stats)
    if d is None:
        h = hashlib.sha256()
        for path, _, _ in stats:
            h.update(path.encode() + b"\0")
            try:
                h.update(hashlib.sha256(Path(path).read_bytes()).digest())
            except OSError:
                h.update(b"missing")
        d = _dir_digests[stats] = h.hexdigest()
    return d


def index_key(spec: OpSpec, config: Config, arch, compiler: dict) -> str:
    variant = spec.variant(config.variant)
    parts = {
        "format": FORMAT_VERSION,
        "jitkern": __version__,
        "op": spec.name,
        "variant": [variant.name, variant.kind, variant.kernel, variant.template, [[a.name, a.type] for a in variant.args]],
        "params": [[k, repr(v)] for k, v in config.params],
        "arch": [arch.name, arch.vendor, arch.backend, arch.triton_arch, arch.warp_size],
        "templates": _digest(spec.template_dir),
        "compiler": compiler,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _index_path(layer, ih: str) -> Path:
    return layer.root / "index" / ih[:2] / f"{ih}.json"


def _remember(store: Store, ih: str, job: Job) -> None:
    """Record ``job``'s rendered source in the first writable layer (best effort)."""
    layer = store.write_layer
    if layer is None:
        return
    path = _index_path(layer, ih)
    try:
        write_private(path, json.dumps({"key": job.key, "source": job.source}).encode())
    except OSError as e:
        log.debug("jitkern: could not write plan index %s: %s", path, e)


@state.on_reset
def clear_memory() -> None:
    global _render_stats
    _dir_digests.clear()
    _render_stats = None


__all__ = ["Job", "plan", "make_job", "job_meta", "index_key"]
