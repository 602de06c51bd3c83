"""What a GPU binary says about itself: the ELF header of a cubin or hsaco names its target.

A cache entry's checksums prove its files are the ones that were written; they do not prove that
what was written is for this GPU (a copied or hand-edited entry can carry a consistent manifest).
Loading a binary built for another arch fails at best and faults at worst, so before a binary is
loaded its ELF machine and arch flags are compared with the arch the job was planned for.

ELF facts used (64-bit little-endian headers): ``e_machine`` at byte 18 is 190 (``EM_CUDA``) for a
cubin and 224 (``EM_AMDGPU``) for an hsaco; ``e_flags`` at byte 48 holds the SM number for CUDA
(low byte; bits 8-15 in the cubins of CUDA 13, whose ``e_ident`` ABI version is 8), and
``EF_AMDGPU_MACH`` (low byte) for AMD.
"""
from __future__ import annotations

import struct

#: The files of a Triton GPU entry: the rendered module, Triton's metadata, the binary.
SOURCE_FILE = "kernel.py"
METADATA_FILE = "metadata.json"


def binary_name(arch) -> str:
    return f"kernel.{arch.binary_ext}"


EM_CUDA = 190
EM_AMDGPU = 224
#: EF_AMDGPU_MACH values (LLVM's ELF.h) for the AMD arches jitkern knows.
AMDGPU_MACH = {"gfx942": 0x04C, "gfx950": 0x04F}
_AMDGPU_MACH_NAMES = {v: k for k, v in AMDGPU_MACH.items()}


def cuda_sm(abi_version: int, flags: int) -> int:
    """The SM number in a cubin's ``e_flags``: bits 8-15 from ELF ABI version 8 (CUDA 13's cubins),
    else the low byte (older cubins; Triton's ptxas)."""
    return (flags >> 8) & 0xFF if abi_version >= 8 else flags & 0xFF


def describe(data: bytes) -> str:
    """What the binary's header says it is, in words (for messages)."""
    if len(data) < 52 or data[:4] != b"\x7fELF":
        return "not an ELF file"
    if data[4] != 2 or data[5] != 1:
        return "an ELF file that is not 64-bit little-endian"
    machine = struct.unpack_from("<H", data, 18)[0]
    flags = struct.unpack_from("<I", data, 48)[0]
    if machine == EM_CUDA:
        return f"a CUDA binary for sm_{cuda_sm(data[8], flags)}"
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
        return machine == EM_CUDA and int(arch.triton_arch) == cuda_sm(data[8], flags)
    if arch.backend == "hip":
        want = AMDGPU_MACH.get(arch.name)
        return machine == EM_AMDGPU and (want is None or (flags & 0xFF) == want)
    return False


# ---- the AMDGPU metadata note ------------------------------------------------------------------
#: ELF note of an AMD code object (v3 and later) that holds the kernels' metadata as MessagePack.
NT_AMDGPU_METADATA = 32
SHT_NOTE = 7


def elf_notes(data: bytes):
    """``(name, type, desc)`` of every note in every SHT_NOTE section of a 64-bit little-endian ELF file."""
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    for i in range(shnum):
        base = shoff + i * shentsize
        if base + 64 > len(data):
            raise ValueError("ELF section header table runs past the end of the file")
        sh_type = struct.unpack_from("<I", data, base + 4)[0]
        if sh_type != SHT_NOTE:
            continue
        off, size = struct.unpack_from("<QQ", data, base + 0x18)
        pos, end = off, min(off + size, len(data))
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
            pos += 12
            name = data[pos:pos + namesz].rstrip(b"\0").decode("ascii", "replace")
            pos += (namesz + 3) & ~3
            desc = data[pos:pos + descsz]
            pos += (descsz + 3) & ~3
            yield name, ntype, desc


def msgpack_loads(buf: bytes):
    """Decode one MessagePack value (the subset LLVM writes: maps, arrays, strings, ints, bools, floats)."""
    value, _ = _mp(buf, 0)
    return value


def _mp(b: bytes, i: int):
    t = b[i]
    i += 1
    if t <= 0x7F:
        return t, i
    if t >= 0xE0:
        return t - 0x100, i
    if 0x80 <= t <= 0x8F:
        return _mp_map(b, i, t & 0x0F)
    if 0x90 <= t <= 0x9F:
        return _mp_array(b, i, t & 0x0F)
    if 0xA0 <= t <= 0xBF:
        n = t & 0x1F
        return b[i:i + n].decode("utf-8", "replace"), i + n
    fixed = {0xC0: None, 0xC2: False, 0xC3: True}
    if t in fixed:
        return fixed[t], i
    ints = {0xCC: "<B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q", 0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q",
            0xCA: ">f", 0xCB: ">d"}
    if t in ints:
        fmt = ints[t]
        return struct.unpack_from(fmt, b, i)[0], i + struct.calcsize(fmt)
    lengths = {0xD9: ">B", 0xDA: ">H", 0xDB: ">I", 0xC4: ">B", 0xC5: ">H", 0xC6: ">I",
               0xDC: ">H", 0xDD: ">I", 0xDE: ">H", 0xDF: ">I"}
    if t in lengths:
        fmt = lengths[t]
        n = struct.unpack_from(fmt, b, i)[0]
        i += struct.calcsize(fmt)
        if t in (0xD9, 0xDA, 0xDB):
            return b[i:i + n].decode("utf-8", "replace"), i + n
        if t in (0xC4, 0xC5, 0xC6):
            return bytes(b[i:i + n]), i + n
        return (_mp_array if t in (0xDC, 0xDD) else _mp_map)(b, i, n)
    raise ValueError(f"MessagePack type byte {t:#x} at offset {i - 1} is not supported")


def _mp_map(b: bytes, i: int, n: int):
    out = {}
    for _ in range(n):
        k, i = _mp(b, i)
        v, i = _mp(b, i)
        out[k] = v
    return out, i


def _mp_array(b: bytes, i: int, n: int):
    out = []
    for _ in range(n):
        v, i = _mp(b, i)
        out.append(v)
    return out, i


def amdgpu_metadata(data: bytes) -> dict:
    """The decoded AMDGPU metadata note of a code object (``amdhsa.version``, ``amdhsa.target``,
    ``amdhsa.kernels``: one map per kernel with ``.vgpr_count``, ``.sgpr_count``, ...)."""
    for name, ntype, desc in elf_notes(data):
        if name == "AMDGPU" and ntype == NT_AMDGPU_METADATA:
            md = msgpack_loads(desc)
            if isinstance(md, dict):
                return md
    raise ValueError("the code object has no AMDGPU metadata note")


def amdgpu_kernel_metadata(data: bytes, kernel: str | None = None) -> dict:
    """One kernel's metadata map: the one named ``kernel`` (or ``kernel.kd``), else the only/first one."""
    kernels = amdgpu_metadata(data).get("amdhsa.kernels") or []
    if not kernels:
        raise ValueError("the code object's metadata lists no kernel")
    for k in kernels:
        if kernel is not None and k.get(".name") == kernel:
            return k
    return kernels[0]
