"""What op functions call: pick the arch for a device, and get a loaded kernel for a config.

Kernels are memoised per process; the first request for a (config, arch, device) goes through the
cache (load in milliseconds) or builds (once per key across processes, under the key's lock).
"""
from __future__ import annotations

import os
import threading

from . import arch as _arch
from . import counters, settings
from .build import get_entry
from .errors import DeviceError
from .launcher import Kernel, load
from .spec import Config, OpSpec

_kernels: dict = {}
_plan_caches: list[dict] = []
_lock = threading.Lock()


def plan_cache() -> dict:
    """A dict for an op function's per-signature decisions, emptied by ``clear_memory()``."""
    d: dict = {}
    _plan_caches.append(d)
    return d


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def arches_for(device) -> tuple[_arch.Arch, _arch.Arch]:
    """``(select_arch, build_arch)`` for tensors on ``device``.

    ``select_arch`` decides tile constraints and budgets; ``build_arch`` is what the artifact is
    built for. They differ only for CPU tensors in Triton's interpreter, where configs are chosen as
    for ``JITKERN_ARCH`` (if set) and the kernel is interpreted.
    """
    if device.type == "cpu":
        if not interpreter_enabled():
            raise DeviceError(
                "tensors are on the CPU; jitkern ops run on a GPU (cuda/hip tensors), or on the CPU "
                "through Triton's interpreter when TRITON_INTERPRET=1 is set before triton is imported"
            )
        cpu = _arch.ARCHES["cpu"]
        named = settings.get("arch")
        return (_arch.get(named) if named else cpu), cpu
    if device.type != "cuda":  # torch reports ROCm devices as "cuda" too
        raise DeviceError(f"tensors are on a {device.type!r} device; jitkern ops need cuda/hip tensors")
    a = _arch.current()
    return a, a


def kernel(spec: OpSpec, config: Config, device) -> Kernel:
    """The loaded kernel for ``config`` on ``device`` (memoised)."""
    _, build_arch = arches_for(device)
    memo = (spec.name, config, build_arch.name, device.type, device.index)
    k = _kernels.get(memo)
    if k is not None:
        counters.bump("memory_hits")
        return k
    with _lock:
        k = _kernels.get(memo)
        if k is None:
            from .plan_index import planned  # warm processes: the recorded source, no Jinja

            job = planned(spec, config, build_arch)
            entry, _ = get_entry(job)
            k = _kernels[memo] = load(entry, job)
    return k


def clear_memory() -> None:
    """Forget kernels loaded by this process (tests; switching cache directories)."""
    with _lock:
        _kernels.clear()
        for d in _plan_caches:
            d.clear()
