"""HIP builder: HIP C++ (optionally with Composable Kernel headers) to a bare AMD code object.

The compiler is driven directly; no GPU and no ROCm install are needed to build for gfx942/gfx950.
Which compiler (first found wins):

1. ``JITKERN_HIPCC``: a ``hipcc`` (it brings its own headers and device libraries);
2. ``JITKERN_HIP_CLANG``: a clang++ to drive directly;
3. a ROCm install's ``hipcc`` (``$ROCM_PATH``, else ``/opt/rocm``);
4. ``clang++-22`` ... ``clang++-20``, then ``clang++``, on ``PATH`` (LLVM 20 or later: gfx950). Debian's own
   ``hipcc`` is never picked from ``PATH``: it hard-codes an older clang that rejects gfx942.

What a direct clang build needs besides the compiler (found in this order):

* HIP headers (``hip/hip_runtime.h``): ``JITKERN_HIP_INCLUDE``, a ROCm install's ``include``, the
  system's (Debian's ``libamdhip64-dev``). Headers older than HIP 6 get a small pre-include that
  supplies what CK expects of newer ones (``__hip_internal::is_same``), and clang's resource directory
  on the include path (HIP 5's headers include ``<include/cuda_wrappers/...>``);
* device libraries (``ocml.bc``, ``ockl.bc``: math, work-item functions): ``JITKERN_HIP_DEVICE_LIBS``,
  a ROCm install's ``amdgcn/bitcode``, the ones Triton's wheel ships (``triton/backends/amd/lib``). They
  are linked as builtin bitcode, like Triton's AMD backend does; the ``__oclc_*`` control constants
  (ISA version, ABI 500, wave64, IEEE sqrt, no DAZ/finite-only/unsafe math: Triton's values) are
  compiled from a generated C file by the same clang;
* CK (``jitkern.ck``), when the source includes a ``ck/`` header, with ``ck/config.h``/``ck/version.h``
  generated into the build's own temporary directory where CK's tree has only the ``.in`` files.

The flags give a bare code object (``--cuda-device-only --no-gpu-bundle-output``; no clang offload
bundle) of code object version 5 (``-mcode-object-version=5``), the version Triton 3.6's AMD backend
emits (``amd.set_abi_version(..., 500)``) and every ROCm 6/7 runtime loads (clang 22's default, v6,
is not). The code object's ELF header must name the job's arch (``EF_AMDGPU_MACH``) or the build fails.
Where clang itself refuses a kernel's static LDS ("local memory (N) exceeds limit (M)"), the result is
an entry without a code object whose LDS figure is N: the budget check rejects it
(``rejected_over_budget``, remembered like any rejection) and the op moves on to its next candidate.

The key (``fingerprint``) holds the driver, compiler path and ``--version``, the flags, the HIP
headers' directory and version, the device libraries' directory and SHA-256 hashes, the pre-include's
hash and CK's identity (root, version, origin, header count and bytes). Builds are subprocesses with
``JITKERN_BUILD_TIMEOUT`` and a kept ``build.log`` (``jitkern.builders.cpp``'s machinery); the
artifact is loaded like any hsaco (``cpp.DeviceKernel``, needs a ROCm GPU).
"""
from __future__ import annotations

import functools
import glob
import hashlib
import importlib.util
import os
import re
import shlex
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import binaries, counters, settings
from .. import ck as _ck
from ..errors import BuildError, UnavailableError
from .cpp import (_TIMED_OUT, LOG_FILE, DeviceKernel, Toolchain, _env_flags, _run_compiler, build_timeout,
                  first_error_line, tool_version)

SOURCE_NAME = "kernel.hip.cpp"
BINARY_NAME = "kernel.hsaco"
FLAGS_ENV = "JITKERN_HIPCC_FLAGS"
#: Code object version: what Triton's AMD backend emits (ABI version 500).
CODE_OBJECT_VERSION = 5
MIN_CLANG_MAJOR = 20
CLANG_NAMES = ("clang++-22", "clang++-21", "clang++-20", "clang++")

#: Placeholders in the fingerprint's flags for paths that live in the build's temporary directory.
GEN_DIR = "{gen}"
CONTROL_BC = "{gen}/oclc_control.bc"

#: Pre-include for HIP headers older than 6.0 (Debian's 5.2): CK uses this trait of newer headers.
COMPAT_HEADER = "jitkern_hip5_compat.h"
COMPAT_TEXT = """\
// jitkern: what CK expects of HIP >= 6 headers, for older ones (written by jitkern.builders.hip).
#pragma once
namespace __hip_internal {
template <class A, class B> struct is_same { static constexpr bool value = false; };
template <class A> struct is_same<A, A> { static constexpr bool value = true; };
}  // namespace __hip_internal
"""


#: clang's diagnostic for a kernel whose static LDS exceeds the target's (it writes no code object).
_LDS_LIMIT = re.compile(r"local memory \((\d+)\) exceeds limit \((\d+)\)")


_rocm = _ck.rocm_path


# ---- what is installed ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Compiler:
    path: str
    driver: str  # "hipcc" | "clang"
    origin: str  # which setting or search step found it


def _clang_major(path: str) -> int | None:
    m = re.search(r"clang version (\d+)", tool_version(path) or "")
    return int(m.group(1)) if m else None


def find_compiler() -> Compiler | None:
    v = settings.get("hipcc") or ""
    if v and os.access(v, os.X_OK):
        return Compiler(v, "hipcc", "JITKERN_HIPCC")
    v = settings.get("hip_clang") or ""
    if v:
        p = v if os.access(v, os.X_OK) else shutil.which(v)
        if p:
            return Compiler(p, "clang", "JITKERN_HIP_CLANG")
    hipcc = _rocm() / "bin" / "hipcc"
    if os.access(hipcc, os.X_OK):
        return Compiler(str(hipcc), "hipcc", f"ROCm ({_rocm()})")
    for name in CLANG_NAMES:
        p = shutil.which(name)
        if p and (_clang_major(p) or 0) >= MIN_CLANG_MAJOR:
            return Compiler(p, "clang", "PATH")
    return None


@dataclass(frozen=True)
class HipHeaders:
    include: str
    version: str  # "5.2.21153" ...
    origin: str

    @property
    def major(self) -> int:
        try:
            return int(self.version.split(".")[0])
        except ValueError:
            return 0


def _hip_version(include: Path) -> str:
    try:
        text = (include / "hip" / "hip_version.h").read_text(errors="replace")
    except OSError:
        return "unknown"
    nums = dict(re.findall(r"#define\s+HIP_VERSION_(MAJOR|MINOR|PATCH)\s+(\d+)", text))
    return ".".join(nums.get(k, "0") for k in ("MAJOR", "MINOR", "PATCH")) if nums else "unknown"


def find_hip_headers() -> HipHeaders | None:
    candidates = []
    v = settings.get("hip_include") or ""
    if v:
        candidates.append((Path(v), "JITKERN_HIP_INCLUDE"))
    candidates += [(_rocm() / "include", f"ROCm ({_rocm()})"), (Path("/usr/include"), "system (/usr/include)")]
    for inc, origin in candidates:
        if (inc / "hip" / "hip_runtime.h").is_file():
            return HipHeaders(str(inc), _hip_version(inc), origin)
    return None


@dataclass(frozen=True)
class DeviceLibs:
    dir: str
    origin: str

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)


DEVICE_LIBS = ("ocml.bc", "ockl.bc")


def _triton_amd_lib() -> Path | None:
    try:
        spec = importlib.util.find_spec("triton")  # locates the package; imports nothing of it
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "backends" / "amd" / "lib"


def find_device_libs() -> DeviceLibs | None:
    candidates = []
    v = settings.get("hip_device_libs") or ""
    if v:
        candidates.append((Path(v), "JITKERN_HIP_DEVICE_LIBS"))
    rocm = _rocm()
    candidates.append((rocm / "amdgcn" / "bitcode", f"ROCm ({rocm})"))
    candidates += [(Path(p), f"ROCm ({rocm})")
                   for p in sorted(glob.glob(str(rocm / "lib" / "llvm" / "lib" / "clang" / "*" / "lib" / "amdgcn"
                                                 / "bitcode")))]
    tri = _triton_amd_lib()
    if tri is not None:
        candidates.append((tri, "Triton's wheel"))
    for d, origin in candidates:
        if all((d / n).is_file() for n in DEVICE_LIBS):
            return DeviceLibs(str(d), origin)
    return None


@functools.lru_cache(maxsize=None)
def _sha256(path: str, mtime_ns: int, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_hash(path: str) -> str | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _sha256(os.path.realpath(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=None)
def _resource_dir(clang: str, mtime_ns: int) -> str | None:
    import subprocess

    try:
        r = subprocess.run([clang, "-print-resource-dir"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    out = r.stdout.strip()
    return out if r.returncode == 0 and out else None


def resource_dir(clang: str) -> str | None:
    try:
        return _resource_dir(os.path.realpath(clang), os.stat(clang).st_mtime_ns)
    except OSError:
        return None


def isa_version(arch_name: str) -> int:
    """``__oclc_ISA_version`` for ``gfxMMmS``: major * 1000 + minor * 100 + stepping (gfx942 -> 9402)."""
    digits = arch_name[3:]
    return int(digits[:-2]) * 1000 + int(digits[-2], 16) * 100 + int(digits[-1], 16)


def control_source(arch) -> str:
    """C source of the device libraries' ``__oclc_*`` control constants for ``arch`` (Triton's values)."""
    consts = (("int", "__oclc_ISA_version", isa_version(arch.name)), ("int", "__oclc_ABI_version", 500),
              ("unsigned char", "__oclc_finite_only_opt", 0), ("unsigned char", "__oclc_unsafe_math_opt", 0),
              ("unsigned char", "__oclc_daz_opt", 0), ("unsigned char", "__oclc_correctly_rounded_sqrt32", 1),
              ("unsigned char", "__oclc_wavefrontsize64", 1 if arch.warp_size == 64 else 0))
    lines = ["// jitkern: device-library control constants (see jitkern.builders.hip)",
             '#define JK_CONST __attribute__((address_space(4), visibility("hidden"))) const']
    lines += [f"JK_CONST {t} {name} = {value};" for t, name, value in consts]
    return "\n".join(lines) + "\n"


# ---- the builder -----------------------------------------------------------------------------------
class HipToolchain(Toolchain):
    """The ``hip`` variant kind. Same interface as the other C++ kinds (``jitkern.builders.cpp``)."""

    def __init__(self):
        super().__init__("hip", SOURCE_NAME, BINARY_NAME, lambda: (c := find_compiler()) and c.path, "amd",
                         FLAGS_ENV)

    # -- flags and key -----------------------------------------------------------------------------
    def includes(self) -> list[str]:
        inc = list(settings.get("cxx_include"))
        found, _ = _ck.find()
        if found is not None:
            inc.append(str(found.include))
        return inc

    def _flags(self, arch, comp: Compiler | None, headers: HipHeaders | None, libs: DeviceLibs | None,
               ck_found) -> list[str]:
        common = [f"--offload-arch={arch.name}", "--cuda-device-only", "--no-gpu-bundle-output", "-O3",
                  "-std=c++17", f"-mcode-object-version={CODE_OBJECT_VERSION}"]
        out = ["-x", "hip", *common]
        if comp is not None and comp.driver == "clang":
            out += ["-nogpuinc", "-nogpulib", f"-D__AMDGCN_WAVEFRONT_SIZE={arch.warp_size}"]
            res = resource_dir(comp.path)
            if res:  # HIP 5's headers include <include/cuda_wrappers/...>: clang's resource dir on the path
                out += ["-isystem", res]
            if headers is not None:
                if headers.include != "/usr/include":  # the system's: on the default path, where libstdc++ expects it
                    out += ["-isystem", headers.include]
                if headers.major < 6:
                    out += ["-include", f"{GEN_DIR}/{COMPAT_HEADER}"]
            if libs is not None:
                for name in DEVICE_LIBS:
                    out += ["-Xclang", "-mlink-builtin-bitcode", "-Xclang", libs.path(name)]
                out += ["-Xclang", "-mlink-builtin-bitcode", "-Xclang", CONTROL_BC]
        if ck_found is not None:
            out += [f"-I{GEN_DIR}"]
        out += [f"-I{p}" for p in self.includes()]
        return out + _env_flags(self.flags_env)

    def flags(self, arch) -> list[str]:
        return self._flags(arch, find_compiler(), find_hip_headers(), find_device_libs(), _ck.find()[0])

    def fingerprint(self, arch) -> dict[str, Any]:
        comp = find_compiler()
        headers, libs = find_hip_headers(), find_device_libs()
        found, _ = _ck.find()
        fp: dict[str, Any] = {
            "kind": "hip",
            "driver": comp and comp.driver,
            "compiler": comp and os.path.realpath(comp.path),
            "version": tool_version(comp and comp.path),
            "flags": self._flags(arch, comp, headers, libs, found) if arch.vendor == "amd" else None,
            "ck": _ck.fingerprint(found),
        }
        if comp is not None and comp.driver == "clang":
            fp["hip_headers"] = headers and {"dir": headers.include, "version": headers.version}
            fp["compat"] = hashlib.sha256(COMPAT_TEXT.encode()).hexdigest()[:16] if headers and headers.major < 6 \
                else None
            fp["device_libs"] = libs and {"dir": libs.dir, **{n: file_hash(libs.path(n)) for n in DEVICE_LIBS}}
            fp["control"] = hashlib.sha256(control_source(arch).encode()).hexdigest()[:16] \
                if arch.vendor == "amd" else None
        return fp

    # -- availability -----------------------------------------------------------------------------
    def probe(self, arch) -> str | None:
        reasons = []
        if arch.vendor != "amd":
            where = "CPU tensors (Triton interpreter)" if arch.vendor == "cpu" else f"arch {arch.name}"
            reasons.append(f"hip variants need an AMD GPU arch; this call is for {where}")
        comp = find_compiler()
        if comp is None:
            reasons.append("no HIP compiler found (install clang-22 and lld-22, or ROCm; or set JITKERN_HIP_CLANG "
                           "or JITKERN_HIPCC; see docs/amd.md)")
        elif comp.driver == "clang" and find_device_libs() is None:
            reasons.append("no AMD device libraries (ocml.bc, ockl.bc) found: install ROCm or Triton's wheel, or "
                           "set JITKERN_HIP_DEVICE_LIBS")
        return "; ".join(reasons) or None

    def source_reason(self, source: str) -> str | None:
        """Why this machine cannot build ``source`` although the toolchain is there (CK or HIP headers)."""
        comp = find_compiler()
        if _ck.needs_ck(source):
            found, why = _ck.find()
            if found is None:
                return why
        if comp is not None and comp.driver == "clang" and find_hip_headers() is None \
                and re.search(r"^\s*#\s*include\s*[<\"]hip/", source, re.MULTILINE):
            return ("HIP headers not found (install Debian's libamdhip64-dev or ROCm, or set JITKERN_HIP_INCLUDE)")
        return None

    # -- build ------------------------------------------------------------------------------------
    def build(self, job) -> tuple[dict[str, bytes], dict[str, Any]]:
        reason = "; ".join(r for r in (self.probe(job.arch), self.source_reason(job.source)) if r) or None
        if reason is not None:
            raise UnavailableError(f"{job.describe()}: {reason}", reason=reason, log_text=reason + "\n")
        comp = find_compiler()
        headers, libs = find_hip_headers(), find_device_libs()
        found, _ = _ck.find()
        limit = build_timeout()
        log_parts: list[str] = []
        with tempfile.TemporaryDirectory(prefix="jitkern-hip-") as d:
            gen = Path(d) / "gen"
            gen.mkdir()
            (Path(d) / SOURCE_NAME).write_text(job.source)
            if found is not None:
                for p in _ck.generate(found, job.arch.name, gen):
                    log_parts.append(f"# generated {p.relative_to(gen)} for {found.describe()}\n")
            flags = [f.replace(GEN_DIR, str(gen)) for f in self._flags(job.arch, comp, headers, libs, found)]
            t0 = time.perf_counter()
            if comp.driver == "clang":
                (gen / COMPAT_HEADER).write_text(COMPAT_TEXT)
                if libs is not None:
                    self._control_bitcode(job, comp, gen, limit, log_parts)
            cmd = [comp.path, *flags, "-o", BINARY_NAME, SOURCE_NAME]
            counters.bump("compiler_runs")
            text, rc = _run_compiler(cmd, d, limit)
            dt = time.perf_counter() - t0
            log_parts.append(f"$ {shlex.join(cmd)}\n{text}\n[exit status {rc}, {dt:.2f} s]\n")
            log_text = "".join(log_parts)
            out = Path(d) / BINARY_NAME
            over = _LDS_LIMIT.search(text) if rc != 0 else None
            if over is not None:  # clang refuses LDS beyond the target's: a budget verdict, not a broken variant
                files = {SOURCE_NAME: job.source.encode(), LOG_FILE: log_text.encode()}
                need = int(over.group(1))
                return files, {"compiler": comp.path, "driver": comp.driver, "compile_seconds": round(dt, 3),
                               "kernel_name": job.variant.kernel, "shared_bytes": need, "lds_bytes": need,
                               "compiler_lds_limit": int(over.group(2)), "compiler_verdict": over.group(0)}
            if rc != 0 or not out.is_file():
                line = first_error_line(text)
                err = BuildError(f"hip build of {job.describe()} failed: {line}", reason=line, log_text=log_text)
                err.transient = rc == _TIMED_OUT
                raise err
            binary = out.read_bytes()
        if not binaries.matches(job.arch, binary):
            why = f"the compiler wrote {binaries.describe(binary)}, not a code object for {job.arch.name}"
            raise BuildError(f"hip build of {job.describe()}: {why}", reason=why, log_text=log_text)
        files = {SOURCE_NAME: job.source.encode(), BINARY_NAME: binary, LOG_FILE: log_text.encode()}
        return files, {"compiler": comp.path, "driver": comp.driver, "compile_seconds": round(dt, 3),
                       "binary": BINARY_NAME, "kernel_name": job.variant.kernel}

    def _control_bitcode(self, job, comp: Compiler, gen: Path, limit: float, log_parts: list[str]) -> None:
        src = gen / "oclc_control.c"
        src.write_text(control_source(job.arch))
        cmd = [comp.path, "-x", "c", "--target=amdgcn-amd-amdhsa", f"-mcpu={job.arch.name}", "-nogpulib",
               f"-mcode-object-version={CODE_OBJECT_VERSION}", "-O2", "-emit-llvm", "-c", "-o", "oclc_control.bc",
               "oclc_control.c"]
        text, rc = _run_compiler(cmd, str(gen), limit)
        log_parts.append(f"$ {shlex.join(cmd)}\n{text}[exit status {rc}]\n")
        if rc != 0:
            line = first_error_line(text)
            err = BuildError(f"hip build of {job.describe()} failed compiling the device-library control "
                             f"constants: {line}", reason=line, log_text="".join(log_parts))
            err.transient = rc == _TIMED_OUT
            raise err

    def load(self, entry, job):
        return DeviceKernel(entry, job, self)


HIP = HipToolchain()


def describe() -> list[tuple[str, str]]:
    """``jitkern doctor``'s AMD rows: compiler, HIP headers, device libraries, CK."""
    comp = find_compiler()
    rows = []
    if comp is None:
        rows.append(("HIP compiler", "not found (install clang-22 lld-22, or ROCm; see docs/amd.md)"))
    else:
        ver = (tool_version(comp.path) or "?").splitlines()[0]
        rows.append(("HIP compiler", f"{ver} ({comp.path}; {comp.driver}, from {comp.origin}); "
                                     f"code object v{CODE_OBJECT_VERSION}"))
    if comp is None or comp.driver == "clang":
        h = find_hip_headers()
        rows.append(("HIP headers", f"HIP {h.version} at {h.include} (from {h.origin})"
                                    + ("; with jitkern's HIP 5 pre-include" if h.major < 6 else "")
                     if h else "not found (install libamdhip64-dev or ROCm, or set JITKERN_HIP_INCLUDE)"))
        libs = find_device_libs()
        rows.append(("AMD device libs", f"{libs.dir} (from {libs.origin})" if libs else
                     "not found (ocml.bc/ockl.bc: ROCm, Triton's wheel, or JITKERN_HIP_DEVICE_LIBS)"))
    found, why = _ck.find()
    rows.append(("Composable Kernel", found.describe() + ("; config.h/version.h generated per build"
                                                          if found.needs_generated_headers else "")
                 if found else why))
    return rows


__all__ = ["HIP", "HipToolchain", "find_compiler", "find_hip_headers", "find_device_libs", "describe",
           "CODE_OBJECT_VERSION"]
