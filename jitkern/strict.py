"""Strict mode: a process that must find every kernel in the cache says so, and says why it did not.

``JITKERN_STRICT=1`` turns any compile at run time into ``CacheMissError``; ``JITKERN_STRICT=warn``
logs one warning per key and builds. Either way the message names the op, config and arch, and
explains the miss from what the cache holds: the nearest entry for the same op, variant and arch
(``jitkern.cache.nearest``) and the key parts in which it differs (``jitkern.key.explain``), e.g.
``compiler: triton 3.6.0 -> 3.6.1`` or ``env: TRITON_F32_DEFAULT added (=ieee)``.

The check runs at the one place a build happens (``jitkern.build``), after the remote cache was
asked: an entry fetched from the fleet's cache is not a compile. Tools that compile on purpose
(``jitkern prebuild`` and its workers, ``jitkern tune``) call ``suspend()``.
"""
from __future__ import annotations

from . import settings, state
from .cache import Store, nearest
from .errors import CacheMissError
from .key import explain
from .logs import log, warn_once

ENV = "JITKERN_STRICT"
_suspended = False


def mode() -> str | None:
    """``"error"``, ``"warn"`` or None (off), from ``JITKERN_STRICT``."""
    if _suspended:
        return None
    return settings.get("strict")


def suspend() -> None:
    """This process compiles on purpose (prebuild, tune): never strict, whatever ``JITKERN_STRICT`` says."""
    global _suspended
    _suspended = True


@state.on_reset
def resume() -> None:
    """Strict again as ``JITKERN_STRICT`` says (``jitkern.reset()``)."""
    global _suspended
    _suspended = False


def explain_miss(job, store: Store, entries=None) -> tuple[list[str], object]:
    """``(lines, nearest)``: why ``job`` is not in ``store``, as key-part differences from the nearest
    recorded entry (``nearest`` is a ``jitkern.cache.Nearest`` or None). ``entries``: a ``cache.catalog``."""
    near = nearest(store, job.spec.name, job.variant.name, job.arch.name, job.parts, entries)
    if near is None:
        where = ", ".join(str(layer.base) for layer in store.layers)
        return [f"no entry for {job.spec.name}/{job.variant.name} on {job.arch.name} in any cache layer ({where})"], None
    return explain(near.meta, job.parts) or ["the nearest entry records the same key parts (key format changed?)"], near


def describe_miss(job, store: Store, entries=None) -> tuple[str, list[str], object]:
    """One message for a miss: what would be compiled, the nearest entry, and the differing key parts."""
    lines, near = explain_miss(job, store, entries)
    head = f"{job.spec.name}/{job.config.describe()} for {job.arch.name} is not in the cache (key {job.key[:16]})"
    if near is None:
        return f"{head}: {lines[0]}", lines, None
    return f"{head}; nearest entry {near.key[:16]} in {near.layer.base} differs in: " + "; ".join(lines), lines, near


def check(job, store: Store) -> None:
    """Called just before ``job`` is compiled at run time: raise (``JITKERN_STRICT=1``), warn once per key
    (``warn``), or do nothing (off)."""
    m = mode()
    if m is None:
        return
    msg, lines, near = describe_miss(job, store)
    if m == "error":
        raise CacheMissError(
            f"{ENV}=1: {msg}. It would be compiled at run time. Prebuild it with the toolchain and environment "
            f"this process uses (jitkern prebuild --manifest FILE --arch {job.arch.name}), or unset {ENV}",
            op=job.spec.name, config=job.config, arch=job.arch.name, key=job.key, differences=lines,
            nearest=str(near.path) if near is not None else None)
    if not warn_once(("strict-miss", job.key), "jitkern: %s=warn: %s; compiling it now", ENV, msg):
        log.debug("jitkern: strict miss again for %s", job.key[:16])
