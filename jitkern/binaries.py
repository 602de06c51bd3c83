"""What a GPU binary says about itself: the ELF header of a cubin or hsaco names its target.

A cache entry's checksums prove its files are the ones that were written; they do not prove that
what was written is for this GPU (a copied or hand-edited entry can carry a consistent manifest).
Loading a binary built for another arch fails at best and faults at worst, so before a binary is
loaded its ELF machine and arch flags are compared with the arch the job was planned for.

ELF facts used (64-bit little-endian headers): ``e_machine`` at byte 18 is 190 (``EM_CUDA``) for a
cubin and 224 (``EM_AMDGPU``) for an hsaco; ``e_flags`` at byte 48 holds the SM number (low byte,
and again in bits 16-23 of current cubins) for CUDA, and ``EF_AMDGPU_MACH`` (low byte) for AMD.
"""
from __future__ import annotations

import struct

EM_CUDA = 190
EM_AMDGPU = 224
#: EF_AMDGPU_MACH values (LLVM's ELF.h) for the AMD arches jitkern knows.
AMDGPU_MACH = {"gfx942": 0x04C, "gfx950": 0x04F}
_AMDGPU_MACH_NAMES = {v: k for k, v in AMDGPU_MACH.items()}


def describe(data: bytes) -> str:
    """What the binary's header says it is, in words (for messages)."""
    if len(data) < 52 or data[:4] != b"\x7fELF":
        return "not an ELF file"
    if data[4] != 2 or data[5] != 1:
        return "an ELF file that is not 64-bit little-endian"
    machine = struct.unpack_from("<H", data, 18)[0]
    flags = struct.unpack_from("<I", data, 48)[0]
    if machine == EM_CUDA:
        return f"a CUDA binary for sm_{flags & 0xFF}"
    if machine == EM_AMDGPU:
        mach = flags & 0xFF
        return f"an AMDGPU binary for {_AMDGPU_MACH_NAMES.get(mach, f'EF_AMDGPU_MACH {mach:#x}')}"
    return f"an ELF file for machine {machine}"


def matches(arch, data: bytes) -> bool:
    """True if ``data`` is an ELF binary for ``arch`` (a ``jitkern.arch.Arch`` with a GPU backend)."""
    if len(data) < 52 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return False
    machine = struct.unpack_from("<H", data, 18)[0]
    flags = struct.unpack_from("<I", data, 48)[0]
    if arch.backend == "cuda":
        return machine == EM_CUDA and int(arch.triton_arch) in (flags & 0xFF, (flags >> 16) & 0xFF)
    if arch.backend == "hip":
        want = AMDGPU_MACH.get(arch.name)
        return machine == EM_AMDGPU and (want is None or (flags & 0xFF) == want)
    return False
