"""Stage 4 of the pipeline: ``kernel(spec, config, device)`` — the per-process memo of loaded kernels.

The first request for a (config, arch, device) plans the job (through the plan index), gets its
entry (cache, or a build under the key's lock) and loads it; the outcome is kept for the process,
failures included, so routing never retries a variant that failed in this process. Every path that
needs a kernel (the dispatcher, fallback routing, tuning) comes here.

``select_arch(device)`` is the arch configurations are chosen for on ``device``: the GPU's (or
``JITKERN_ARCH``), and for CPU tensors under Triton's interpreter ``JITKERN_ARCH`` if set (the
kernel itself then runs interpreted, arch ``cpu``).
"""
from __future__ import annotations

import threading

from . import arch as _arch
from . import counters, settings, state
from .build import get_entry
from .cache import forget_checks
from .builders.base import Kernel
from .errors import BuildError, DeviceError, LaunchError
from .load import load
from .plan import plan
from .spec import Config, OpSpec

_kernels: dict = {}  # (op, config, build arch, device type, index) -> Kernel | BuildError | LaunchError
_lock = threading.RLock()


def arches_for(device) -> tuple[_arch.Arch, _arch.Arch]:
    """``(select_arch, build_arch)`` for tensors on ``device``.

    ``select_arch`` decides tile rules and budgets; ``build_arch`` is what the artifact is built
    for. They differ only for CPU tensors in Triton's interpreter, where configs are chosen as for
    ``JITKERN_ARCH`` (if set) and the kernel is interpreted.
    """
    if device.type == "cpu":
        if not _arch.interpreter_enabled():
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


def select_arch(device) -> _arch.Arch:
    """The arch whose rules, tuned tables and budget choose configurations for tensors on ``device``."""
    return arches_for(device)[0]


def kernel(spec: OpSpec, config: Config, device) -> Kernel:
    """The loaded kernel for ``config`` on ``device`` (memoised, failures too).

    Raises ``BuildError`` (``OverBudgetError``, ``RecordedBuildFailure``, ``UnavailableError``...)
    or ``LaunchError``. Where configs are selected for another arch than the kernel runs on (CPU
    tensors with ``JITKERN_ARCH``), the config must also fit the selection arch's budget: it is
    compiled for that arch too, so the interpreter picks exactly what the GPU would.
    """
    select, build_arch = arches_for(device)
    memo = (spec.name, config, build_arch.name, device.type, device.index)
    got = _kernels.get(memo)
    if got is None:
        with _lock:
            got = _kernels.get(memo)
            if got is None:
                try:
                    if select is not build_arch and select.backend is not None:
                        get_entry(plan(spec, config, select), record_failures=True)  # its budget check
                    job = plan(spec, config, build_arch)
                    entry, _ = get_entry(job, record_failures=True)
                    got = load(entry, job)
                except (BuildError, LaunchError) as e:
                    got = e
                _kernels[memo] = got
    else:
        counters.bump("memory_hits")
    if isinstance(got, Exception):
        raise got
    return got


def remember_failure(spec: OpSpec, config: Config, device, err: Exception) -> None:
    """Record that ``config`` failed at run time on ``device``: ``kernel()`` raises ``err`` from now on."""
    _, build_arch = arches_for(device)
    with _lock:
        _kernels[(spec.name, config, build_arch.name, device.type, device.index)] = err


@state.on_reset
def clear_memory() -> None:
    """Forget kernels loaded by this process (the next loads check the cache layers' ownership and
    modes in full again: ``jitkern.cache.forget_checks``)."""
    with _lock:
        _kernels.clear()
    forget_checks()


__all__ = ["arches_for", "select_arch", "kernel", "remember_failure", "clear_memory"]
