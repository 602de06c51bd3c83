"""GPU architecture facts: the one table jitkern consults, and detection of the current GPU.

Budgets are per thread block (workgroup) and are what a kernel may use, i.e. the opt-in maximum on
NVIDIA. Sources: CUDA C Programming Guide (compute capability tables), AMD CDNA3/CDNA4 ISA guides
and ROCm's hardware spec table.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from . import settings, state
from .errors import NoDeviceError, UnknownArchError

KiB = 1024


@dataclass(frozen=True)
class Arch:
    name: str  # canonical name: "gfx942", "sm_90", ...
    vendor: str  # "amd" | "nvidia" | "cpu"
    backend: str | None  # Triton backend ("hip" | "cuda"); None for the CPU interpreter
    triton_arch: object  # what GPUTarget takes: "gfx942" or 90
    warp_size: int  # wavefront (AMD) / warp (NVIDIA) width in threads
    shared_mem_per_block: int  # LDS / shared memory a block may use, in bytes
    num_cus: int  # compute units (AMD) / streaming multiprocessors (NVIDIA) of the flagship part
    max_regs_per_thread: int  # architectural VGPR (AMD, incl. AGPRs) / register limit (NVIDIA)
    product: str = ""

    @property
    def binary_ext(self) -> str | None:
        return {"hip": "hsaco", "cuda": "cubin"}.get(self.backend)

    def target(self):
        """Triton's ``GPUTarget`` for this arch (imports triton)."""
        if self.backend is None:
            raise UnknownArchError(f"arch {self.name!r} has no compile target; it runs in Triton's interpreter")
        from triton.backends.compiler import GPUTarget

        return GPUTarget(self.backend, self.triton_arch, self.warp_size)


ARCHES: dict[str, Arch] = {
    a.name: a
    for a in (
        Arch("gfx942", "amd", "hip", "gfx942", 64, 64 * KiB, 304, 512, "MI300X/MI325X (CDNA3)"),
        Arch("gfx950", "amd", "hip", "gfx950", 64, 160 * KiB, 256, 512, "MI350X/MI355X (CDNA4)"),
        Arch("sm_80", "nvidia", "cuda", 80, 32, 163 * KiB, 108, 255, "A100 (Ampere)"),
        Arch("sm_90", "nvidia", "cuda", 90, 32, 227 * KiB, 132, 255, "H100/H200 (Hopper)"),
        Arch("sm_100", "nvidia", "cuda", 100, 32, 227 * KiB, 148, 255, "B200 (Blackwell)"),
        # Triton's interpreter on CPU tensors (TRITON_INTERPRET=1): no binary, no real budget.
        Arch("cpu", "cpu", None, None, 1, 1 << 30, os.cpu_count() or 1, 1 << 30, "Triton interpreter"),
    )
}
GPU_ARCHES = tuple(n for n, a in ARCHES.items() if a.backend is not None)


def interpreter_enabled() -> bool:
    """Whether Triton's interpreter is on (``TRITON_INTERPRET``): CPU tensors then run as arch ``cpu``."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def get(name: str) -> Arch:
    """Look an arch up by name. Accepts ``sm90``/``sm_90a``/``gfx942:sramecc+:xnack-`` spellings."""
    canon = normalize(name)
    try:
        return ARCHES[canon]
    except KeyError:
        raise UnknownArchError(
            f"unknown arch {name!r}; known arches: {', '.join(ARCHES)}"
        ) from None


def normalize(name: str) -> str:
    n = str(name).strip().lower().split(":")[0]  # gfx942:sramecc+:xnack- -> gfx942
    if n.startswith("sm") and not n.startswith("sm_"):
        n = "sm_" + n[2:]
    if n.startswith("sm_") and n.endswith("a"):  # sm_90a -> sm_90
        n = n[:-1]
    return n


def parse_list(text: str) -> list[Arch]:
    """``"gfx942,gfx950,sm_90"`` -> arches, in order, without duplicates."""
    names = [p for p in (s.strip() for s in text.split(",")) if p]
    if not names:
        raise UnknownArchError(f"no arch named in {text!r}; known arches: {', '.join(GPU_ARCHES)}")
    out: list[Arch] = []
    for n in names:
        a = get(n)
        if a not in out:
            out.append(a)
    return out


@functools.lru_cache(maxsize=None)
def detect(device_index: int | None = None) -> Arch:
    """The arch of the current (or given) GPU, read through torch."""
    import torch

    if not torch.cuda.is_available():
        raise NoDeviceError(
            "no GPU found (torch.cuda.is_available() is False) and JITKERN_ARCH is not set; "
            "set JITKERN_ARCH (one of: " + ", ".join(GPU_ARCHES) + ") to compile for a named arch, "
            "or TRITON_INTERPRET=1 to run on CPU tensors through Triton's interpreter"
        )
    idx = torch.cuda.current_device() if device_index is None else device_index
    got = _detected.get(idx)
    if got is None:  # asked for every new call signature and kernel: the device's properties once
        props = torch.cuda.get_device_properties(idx)
        if getattr(torch.version, "hip", None):
            raw = props.gcnArchName
        else:
            raw = f"sm_{props.major}{props.minor}"
        got = _detected[idx] = get(raw)
    return got


_detected: dict = {}  # device index -> its Arch (a GPU's does not change while the process runs)


@state.on_reset
def _forget() -> None:
    _detected.clear()


def current() -> Arch:
    """``JITKERN_ARCH`` if set, else the detected GPU."""
    name = settings.get("arch")
    if name:
        return get(name)
    return detect()
