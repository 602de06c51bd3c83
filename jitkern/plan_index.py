"""The plan index: which rendered source a (spec, config, arch) gives, so a warm process skips Jinja.

Rendering is most of what a warm start costs before the GPU loads anything (importing Jinja alone
takes tens of milliseconds). Rendering is a pure function of the op's template folder, the config's
parameters and the arch, so jitkern remembers its result: one small JSON file per planned job,

    <layer>/v<FORMAT_VERSION>/index/<ih[:2]>/<ih>.json     {"key": ..., "source": ...}

where ``ih`` hashes everything rendering depends on: the op, variant, parameters, arch, the content
of every file in the template folder (by name, size and mtime) and of jitkern's render/plan code,
plus the builder's fingerprint. A hit hands the stored source to ``build.plan``, which computes the
key the usual way; if that key is not the one recorded, the index is ignored and the job is rendered.
So the index can make a plan faster, never different: the worst a stale or damaged index file does
is cost one render. Files are written atomically (temp + rename) into the first writable layer and
read from every layer; a layer that cannot be written simply gets no index.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from . import __version__, builders
from .build import Job, plan
from .cache import default_store, read_private, write_private
from .key import FORMAT_VERSION
from .logs import log
from .spec import Config, OpSpec

_RENDER_CODE = tuple(Path(__file__).with_name(n) for n in ("build.py", "render.py"))
_dir_digests: dict = {}


def _stat_list(paths) -> tuple:
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((str(p), st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((str(p), -1, -1))
    return tuple(out)


def _files_under(d: Path) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(d):
        dirs[:] = sorted(x for x in dirs if x != "__pycache__")
        found.extend(Path(root) / f for f in sorted(files))
    return found


def _digest(template_dir: Path) -> str:
    """Hash of the template folder's files and jitkern's rendering code (memoised on their stats)."""
    stats = _stat_list(_files_under(template_dir)) + _stat_list(_RENDER_CODE)
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


def index_key(spec: OpSpec, config: Config, arch, compiler: dict | None = None) -> str:
    variant = spec.variant(config.variant)
    parts = {
        "format": FORMAT_VERSION,
        "jitkern": __version__,
        "op": spec.name,
        "variant": [variant.name, variant.kind, variant.kernel, variant.template, [[a.name, a.type] for a in variant.args]],
        "params": [[k, repr(v)] for k, v in config.params],
        "arch": [arch.name, arch.vendor, arch.backend, arch.triton_arch, arch.warp_size],
        "templates": _digest(spec.template_dir),
        "compiler": builders.get(variant.kind).fingerprint(arch) if compiler is None else compiler,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _path(layer, ih: str) -> Path:
    return layer.root / "index" / ih[:2] / f"{ih}.json"


def lookup(spec: OpSpec, config: Config, arch, store=None) -> Job | None:
    """The planned job from the index, or None (no record, or a record that does not check out)."""
    store = store or default_store()
    compiler = builders.get(spec.variant(config.variant).kind).fingerprint(arch)
    ih = index_key(spec, config, arch, compiler)
    for layer in store.layers:
        try:
            layer.check_secure()
            rec = json.loads(read_private(_path(layer, ih)))
            key, source = rec["key"], rec["source"]
        except (OSError, ValueError, KeyError, TypeError) as e:  # CorruptEntryError/InsecureCacheError too
            if not isinstance(e, FileNotFoundError):
                log.debug("jitkern: plan index record %s in %s not used: %s", ih[:16], layer, e)
            continue
        if not isinstance(source, str) or not store.has_entry(key):
            continue  # only an entry's own source is trusted: no entry, render (never build a record's source)
        job = plan(spec, config, arch, source=source, compiler=compiler)
        if job.key == key:
            return job
        log.debug("jitkern: plan index record %s in %s does not match its key; rendering", ih[:16], layer)
    return None


def remember(job: Job, store=None) -> None:
    """Record ``job``'s rendered source in the first writable layer (best effort)."""
    store = store or default_store()
    layer = store.write_layer
    if layer is None:
        return
    path = _path(layer, index_key(job.spec, job.config, job.arch))
    try:
        write_private(path, json.dumps({"key": job.key, "source": job.source}).encode())
    except OSError as e:
        log.debug("jitkern: could not write plan index %s: %s", path, e)


def planned(spec: OpSpec, config: Config, arch, store=None) -> Job:
    """``build.plan`` through the index: the stored source on a hit, else render and remember."""
    job = lookup(spec, config, arch, store)
    if job is None:
        job = plan(spec, config, arch)
        remember(job, store)
    return job
