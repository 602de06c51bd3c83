"""The resource check after every compile: what an artifact uses against what its arch allows.

Triton reports a kernel's shared memory (``metadata.shared``) at compile time but only compares it
with the device's limit when it loads the kernel on a live GPU. jitkern compares at build time,
offline too, so an over-budget configuration is rejected on a build machine without a GPU and never
reaches a launch (seed 003: a gfx950 MoE tile that needed 269 KiB of LDS against 160 KiB).

Figures, per backend:

* shared memory / LDS bytes: Triton's metadata (``shared``), for every backend;
* registers and spills: NVIDIA from ``cuobjdump --dump-resource-usage`` on the cubin (the tool
  ships with Triton); AMD, for Triton and HIP code objects alike, from the code object's AMDGPU
  metadata note (``jitkern.binaries.amdgpu_metadata``, parsed here, no tool needed): ``vgprs``,
  ``agprs``, ``sgprs``, ``lds_bytes`` (static ``.group_segment_fixed_size``, plus for Triton the
  dynamic LDS its launch asks for, ``metadata.shared``), ``scratch_bytes``
  (``.private_segment_fixed_size``, per lane), ``spills`` (VGPR + SGPR spill counts).

Verdict (``assess``): ``rejected_over_budget`` when shared bytes (LDS) exceed the arch's per-block
budget, the block's registers exceed the register file a block can use (AMD: 512 VGPRs incl. AGPRs per
SIMD lane, shared by the block's waves on that SIMD); otherwise ``ok``. SGPRs, spills and scratch are
recorded, not rejected (the compiler keeps SGPRs within a wave's; spills and scratch run, slower).
The verdict is stored in the cache entry's metadata (``status``, ``resources``), so a rejected
configuration is compiled once and then remembered by every later process; ``enforce`` raises
``OverBudgetError`` for it.

``status(job)`` is the function prebuild calls: build-or-load a job and return its status
(``built``/``cached``/``rejected_over_budget``) with the figures.
"""
from __future__ import annotations

import logging
import re
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Mapping

from . import binaries
from .errors import OverBudgetError
from .logs import warn_once
from .status import OK, REJECTED

log = logging.getLogger("jitkern")

#: Registers a single block may hold, by vendor. NVIDIA: 64 K 32-bit registers per block (sm_50 and
#: later). AMD CDNA3/CDNA4: 512 VGPRs (incl. AGPRs) per lane of a SIMD; a workgroup's waves are
#: spread over the CU's 4 SIMDs, so ceil(waves / 4) waves share one SIMD's file.
REGS_PER_BLOCK_NVIDIA = 65536
AMD_SIMDS_PER_CU = 4
AMD_VGPRS_PER_SIMD_LANE = 512


# ---- figures ------------------------------------------------------------------------------------
#: What the AMDGPU metadata note says about a kernel, under the names jitkern reports.
_AMD_NOTE_KEYS = {"vgprs": ".vgpr_count", "agprs": ".agpr_count", "sgprs": ".sgpr_count",
                  "lds_bytes": ".group_segment_fixed_size", "scratch_bytes": ".private_segment_fixed_size",
                  "vgpr_spills": ".vgpr_spill_count", "sgpr_spills": ".sgpr_spill_count",
                  "wavefront_size": ".wavefront_size", "max_workgroup_size": ".max_flat_workgroup_size"}
AMD_FIGURES = tuple(_AMD_NOTE_KEYS) + ("spills", "dynamic_stack", "lds_static_bytes")


def amd_figures(hsaco: bytes, kernel: str | None = None) -> dict[str, Any]:
    """A code object's resource figures from its AMDGPU metadata note (the same for Triton's and HIP
    builds): VGPRs, AGPRs, SGPRs, LDS bytes, scratch bytes per lane, spills; ``regs`` = VGPRs + AGPRs
    (one register file per lane on CDNA3/CDNA4). Unknown figures (no readable note) are None."""
    try:
        md = binaries.amdgpu_kernel_metadata(hsaco, kernel)
    except (ValueError, struct.error, IndexError) as e:
        log.debug("jitkern: no AMDGPU metadata in the code object (%s); figures unknown", e)
        return {"regs": None, "spills": None, **{k: None for k in AMD_FIGURES}}
    out: dict[str, Any] = {k: md.get(note) for k, note in _AMD_NOTE_KEYS.items()}
    vspill, sspill = out["vgpr_spills"], out["sgpr_spills"]
    out["spills"] = None if vspill is None and sspill is None else (vspill or 0) + (sspill or 0)
    out["dynamic_stack"] = md.get(".uses_dynamic_stack")
    out["regs"] = None if out["vgprs"] is None else out["vgprs"] + (out["agprs"] or 0)
    return out


_CUOBJDUMP = re.compile(r"REG:(\d+).*?LOCAL:(\d+)")


def nvidia_figures(cubin: bytes) -> dict[str, int | None]:
    """Registers per thread and local (spill/stack) bytes per thread, via Triton's cuobjdump."""
    try:
        from triton import knobs

        tool = knobs.nvidia.cuobjdump.path
    except Exception as e:  # Triton without its NVIDIA tools: figures unknown, never a failure
        log.debug("jitkern: no cuobjdump (%s); register figures unknown", e)
        return {"regs": None, "spills": None}
    with tempfile.TemporaryDirectory(prefix="jitkern-res-") as d:
        path = Path(d) / "kernel.cubin"
        path.write_bytes(cubin)
        try:
            out = subprocess.run([tool, "--dump-resource-usage", str(path)], capture_output=True, text=True,
                                 timeout=60, check=True).stdout
        except (OSError, subprocess.SubprocessError) as e:
            log.debug("jitkern: cuobjdump failed (%s); register figures unknown", e)
            return {"regs": None, "spills": None}
    m = _CUOBJDUMP.search(out)
    if m is None:
        return {"regs": None, "spills": None}
    return {"regs": int(m.group(1)), "spills": int(m.group(2))}


def figures(arch, files: Mapping[str, bytes], meta: Mapping[str, Any]) -> dict[str, Any]:
    """What a freshly built artifact uses: shared bytes, registers per thread, spills; on AMD also the
    metadata note's figures (``amd_figures``), and ``shared_bytes`` is the LDS figure where the builder
    reports none (HIP)."""
    out = {"shared_bytes": meta.get("shared_bytes"), "regs": None, "spills": None}
    binary = files.get(f"kernel.{arch.binary_ext}") if arch.binary_ext else None
    if binary:
        if arch.backend == "hip":
            out.update(amd_figures(binary, meta.get("kernel_name")))
            out["lds_static_bytes"] = out["lds_bytes"]
            if out["shared_bytes"] is None:  # HIP: static LDS only (launched with no dynamic LDS)
                out["shared_bytes"] = out["lds_bytes"]
            elif out["lds_bytes"] is not None:  # Triton: its LDS is dynamic, given at launch (metadata.shared)
                out["lds_bytes"] += out["shared_bytes"]
        else:
            out.update(nvidia_figures(binary))
    elif meta.get("lds_bytes") is not None:  # no code object: the compiler refused the kernel's LDS
        out["lds_bytes"] = meta["lds_bytes"]
    return out


# ---- verdict ------------------------------------------------------------------------------------
def register_limit(arch, num_warps: int | None) -> int | None:
    """Registers per thread a block of ``num_warps`` warps/waves can use on ``arch``."""
    if num_warps is None or arch.backend is None:
        return None
    if arch.vendor == "nvidia":
        return min(arch.max_regs_per_thread, REGS_PER_BLOCK_NVIDIA // (num_warps * arch.warp_size))
    waves_per_simd = -(-num_warps // AMD_SIMDS_PER_CU)
    return min(arch.max_regs_per_thread, AMD_VGPRS_PER_SIMD_LANE // waves_per_simd)


def assess(arch, figs: Mapping[str, Any], num_warps: int | None = None) -> dict[str, Any]:
    """``{"status": "ok"|"rejected_over_budget", "reason", "resources": {...}}`` for ``figs`` on ``arch``."""
    budget = arch.shared_mem_per_block if arch.backend is not None else None
    reg_limit = register_limit(arch, num_warps)
    res = {**figs, "budget_bytes": budget, "regs_limit": reg_limit}
    reasons = []
    shared = max((v for v in (figs.get("shared_bytes"), figs.get("lds_bytes")) if v is not None), default=None)
    if budget is not None and shared is not None and shared > budget:
        reasons.append(f"needs {shared} B ({shared / 1024:.0f} KiB) of shared memory, budget {budget} B "
                       f"({budget / 1024:.0f} KiB)")
    regs = figs.get("regs")
    if reg_limit is not None and regs is not None and regs > reg_limit:
        reasons.append(f"needs {regs} registers per thread, {num_warps} warps allow {reg_limit}")
    return {"status": REJECTED if reasons else OK, "reason": "; ".join(reasons), "resources": res}


def assess_build(job, files: Mapping[str, bytes], meta: Mapping[str, Any]) -> dict[str, Any]:
    """Entry metadata to add after building ``job``: status, reason, resources. Called by build."""
    figs = figures(job.arch, files, meta)
    verdict = assess(job.arch, figs, job.config.compile_options().get("num_warps") or _waves(job, figs))
    if verdict["status"] == REJECTED:
        log.debug("jitkern: %s rejected: %s", job.describe(), verdict["reason"])
    return verdict


def _waves(job, figs: Mapping[str, Any]) -> int | None:
    """Waves (warps) per workgroup of a C++ variant: its launch's block (``block_x * block_y * block_z``),
    else the code object's maximum workgroup size."""
    p = job.config.p
    threads = int(p.get("block_x", 0)) * int(p.get("block_y", 1)) * int(p.get("block_z", 1)) \
        or figs.get("max_workgroup_size")
    return -(-int(threads) // job.arch.warp_size) if threads else None


def enforce(job, entry) -> None:
    """Raise ``OverBudgetError`` if ``entry`` (built or loaded for ``job``) was rejected; log one
    line per (op, arch) naming the configuration, its bytes and the budget."""
    meta = entry.meta
    if meta.get("status") != REJECTED:
        return
    figs = dict(meta.get("resources") or {})
    figs.update(config=job.config.describe(), op=job.spec.name, arch=job.arch.name, key=job.key)
    msg = f"{job.describe()} is over the budget of {job.arch.name}: {meta.get('reason')}; not launched"
    if not warn_once(("over-budget", job.spec.name, job.arch.name),
                     "jitkern: %s; using the next candidate (further rejections for %s on %s are logged "
                     "at debug level)", msg, job.spec.name, job.arch.name):
        log.debug("jitkern: %s", msg)
    raise OverBudgetError(msg, figs)


FIGURE_KEYS = ("shared_bytes", "budget_bytes", "regs", "regs_limit", "spills") + AMD_FIGURES

__all__ = ["OK", "REJECTED", "figures", "assess", "assess_build", "enforce", "register_limit", "FIGURE_KEYS"]
