"""Where ops are found: jitkern's built-in library, ``register()``, and the ``jitkern.ops``
entry-point group of installed packages.

An entry point names an ``OpSpec``, a list of them, or a callable returning either::

    [project.entry-points."jitkern.ops"]
    my_op = "my_library.jitkern_ops:SPEC"

Nothing is imported until an op is asked for.
"""
from __future__ import annotations

import importlib
import threading
from typing import Iterable

from .errors import SpecError, UnknownOpError
from .spec import OpSpec

ENTRY_POINT_GROUP = "jitkern.ops"

#: Built-in ops: name -> module defining ``SPEC``.
BUILTIN = {
    "rms_norm": "jitkern.library.rms_norm",
    "silu_and_mul": "jitkern.library.silu_and_mul",
    "paged_attention_decode": "jitkern.library.paged_attention_decode",
    "moe_gemm_stage1": "jitkern.library.moe_gemm_stage1",
    "moe_align": "jitkern.library.moe_align",
    "moe_topk_softmax": "jitkern.library.moe_topk_softmax",
    "moe_combine": "jitkern.library.moe_combine",
    "gather_kv_cache": "jitkern.library.gather_kv_cache",
    "paged_mqa_logits": "jitkern.library.paged_mqa_logits",
    "qk_norm_rope": "jitkern.library.qk_norm_rope",
    "qk_norm_rope_cache": "jitkern.library.qk_norm_rope_cache",
    "gemm": "jitkern.library.gemm",
    "prefill_attention": "jitkern.library.prefill_attention",
}

_specs: dict[str, OpSpec] = {}
_lock = threading.RLock()


def register(spec: OpSpec, *, replace: bool = False) -> OpSpec:
    """Make ``spec`` available as ``jitkern.ops.<spec.name>`` and to prebuild."""
    if not isinstance(spec, OpSpec):
        raise SpecError(f"register() takes an OpSpec, got {type(spec).__name__}")
    with _lock:
        old = _specs.get(spec.name)
        if old is not None and old is not spec and not replace:
            raise SpecError(f"an op named {spec.name!r} is already registered; pass replace=True to replace it")
        _specs[spec.name] = spec
    return spec


def _entry_points():
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _load_entry_point(ep) -> None:
    try:
        obj = ep.load()
    except Exception as e:
        raise SpecError(f"entry point {ep.name!r} = {ep.value!r} (group {ENTRY_POINT_GROUP}) failed to load: "
                        f"{type(e).__name__}: {e}") from e
    if callable(obj) and not isinstance(obj, OpSpec):
        obj = obj()
    specs = [obj] if isinstance(obj, OpSpec) else list(obj)
    for s in specs:
        register(s)
    if ep.name not in _specs:
        raise SpecError(f"entry point {ep.name!r} = {ep.value!r} did not provide an op named {ep.name!r}")


def get(name: str) -> OpSpec:
    """The spec of op ``name``, loading its module or entry point on first use."""
    with _lock:
        spec = _specs.get(name)
        if spec is not None:
            return spec
        if name in BUILTIN:
            importlib.import_module(BUILTIN[name])  # the module calls register(SPEC)
        else:
            ep = _entry_points().get(name)
            if ep is not None:
                _load_entry_point(ep)
        spec = _specs.get(name)
    if spec is None:
        raise UnknownOpError(f"unknown op {name!r}; available ops: {', '.join(names()) or '(none)'}")
    return spec


def names() -> list[str]:
    """Names of every available op (built-in, registered, installed), without loading any."""
    with _lock:
        found = set(BUILTIN) | set(_specs)
    return sorted(found | set(_entry_points()))


def specs(selected: Iterable[str] | None = None) -> list[OpSpec]:
    return [get(n) for n in (selected or names())]
