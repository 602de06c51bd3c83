"""Stage 3 of the pipeline: ``load(entry, job)`` — a launchable kernel from a verified entry.

Every variant kind loads through its builder's ``load`` (``jitkern.builders.base``): Triton GPU
entries through Triton's driver (``jitkern.launcher``), CPU entries through Triton's interpreter,
CUDA/HIP/host C++ through ``jitkern.builders.cpp``/``hip``. A failure to load is a ``LaunchError``:
routing treats it like a build failure and goes on to the next candidate. Before an interpreted
(CPU) entry runs, Triton is imported through ``jitkern.triton_import`` (without its entry-point scan
where that finds nothing more); a warm GPU load imports no Triton at all (``jitkern.launcher``).
"""
from __future__ import annotations

from . import builders
from .builders.base import Kernel
from .errors import BuildError, JitkernError, LaunchError
from .plan import Job
from .triton_import import ensure_imported


def load(entry, job: Job) -> Kernel:
    if job.variant.kind == "triton" and job.arch.backend is None:
        ensure_imported()  # the interpreted module imports Triton: import it once, lean (a GPU load imports none)
    try:
        return builders.get(job.variant.kind).load(entry, job)
    except (BuildError, LaunchError):
        raise
    except JitkernError:
        raise
    except Exception as e:
        raise LaunchError(f"could not load {job.describe()} from {entry.path}: {type(e).__name__}: {e}") from e


__all__ = ["load", "Kernel"]
