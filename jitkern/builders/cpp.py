"""C++ builders: CUDA (nvcc) and host C++; the subprocess, log and device-code loading machinery that the
HIP builder (``jitkern.builders.hip``) shares.

A C++ variant is a Jinja template like a Triton one. Its rendered source is compiled by the real
toolchain in a subprocess with a time limit (``JITKERN_BUILD_TIMEOUT`` seconds, default 600); the
full compiler log is kept in the entry as ``build.log`` (and in the failure record when it fails).

How the binary is loaded, and why:

* ``cuda`` / ``hip``: the compiler writes a device-code object (``nvcc -cubin`` / clang's bare AMD code
  object: a cubin or hsaco holding one ``extern "C" __global__`` function). A cubin is loaded by
  ``jitkern.fastcall`` through the CUDA driver (module load and function lookup in the current device
  context; Triton's ``driver.active.utils.load_binary`` where that extension is off), an hsaco by
  Triton's driver helper; both are launched with the driver's ``cuLaunchKernel``/
  ``hipModuleLaunchKernel`` (from C on the dispatcher's hot path, else through ``ctypes``). No host code is compiled, so a
  build takes a second or two instead of the tens of seconds a torch C++ extension needs to parse
  torch's headers, the artifact does not depend on the torch version or ABI, and a cubin for
  sm_90 can be built on a machine without a GPU or a CUDA-enabled torch (prebuild).
* ``cpp``: host C++ compiled into a shared library (``c++ -shared -fPIC``) whose
  ``extern "C" int kernel(...)`` is called through ``ctypes`` on CPU tensors' memory; a non-zero
  return value is a launch error. It serves CPU-only reference variants and, in tests, real
  compiler failures and real run-time failures.

The key (``fingerprint``) holds the compiler path and ``--version`` text, the flags and the include
directories. The ``--version`` text is remembered across processes in the user's cache layer
(``jitkern.toolversions``), so a warm process does not run the compiler at all.
"""
from __future__ import annotations

import ctypes
import functools
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .. import counters, fastcall, settings
from ..toolversions import tool_version  # noqa: F401  (hip and doctor take it from here)
from ..errors import BuildError, LaunchError, UnavailableError
from .base import DirectLaunch, Kernel, addresses

LOG_FILE = "build.log"
DEFAULT_TIMEOUT = settings.setting("build_timeout").default


def build_timeout() -> float:
    return max(1.0, settings.get("build_timeout"))


def first_error_line(log_text: str) -> str:
    """The line a human needs first: the first one naming an error, else the first non-empty one."""
    lines = [ln.strip() for ln in log_text.splitlines() if ln.strip()]
    for ln in lines:
        if re.search(r"\b(fatal )?error\b", ln, re.IGNORECASE):
            return ln
    return lines[0] if lines else "(no compiler output)"


_TIMED_OUT = -9999


def _run_compiler(cmd: list[str], cwd: str, limit: float) -> tuple[str, int]:
    """Run a compiler in its own process group; past ``limit`` seconds the whole group is killed
    (nvcc and hipcc start further processes, which would otherwise keep running and hold the pipe)."""
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
                                start_new_session=True)
    except OSError as e:
        return f"error: could not run {cmd[0]}: {e}\n", -1
    try:
        text, _ = proc.communicate(timeout=limit)
        return text, proc.returncode
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        text, _ = proc.communicate()
        return (text or "") + f"\nerror: build timed out after {limit:g} s (JITKERN_BUILD_TIMEOUT)\n", _TIMED_OUT
    except BaseException:  # KeyboardInterrupt: leave no compiler behind
        _kill_group(proc)
        proc.communicate()
        raise


def _kill_group(proc) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def _env_flags(name: str) -> list[str]:
    """Extra flags from the setting behind ``JITKERN_<NAME>`` (``jitkern.settings``)."""
    return list(settings.get(name[len(settings.PREFIX):].lower()))


# ---- toolchains ----------------------------------------------------------------------------------
def find_nvcc() -> str | None:
    """``JITKERN_NVCC`` when set (that one or none: never another nvcc than the one asked for), else
    CUDA_HOME/CUDA_PATH, PATH, /usr/local/cuda."""
    pinned = settings.get("nvcc")
    if pinned:
        return pinned if os.access(pinned, os.X_OK) else None
    for env in ("CUDA_HOME", "CUDA_PATH"):
        v = os.environ.get(env, "").strip()
        if v and os.access(os.path.join(v, "bin", "nvcc"), os.X_OK):
            return os.path.join(v, "bin", "nvcc")
    p = shutil.which("nvcc")
    return p or ("/usr/local/cuda/bin/nvcc" if os.access("/usr/local/cuda/bin/nvcc", os.X_OK) else None)


def find_cxx() -> str | None:
    v = os.environ.get("CXX", "").strip()
    if v:
        return v if os.access(v, os.X_OK) else shutil.which(v)
    return shutil.which("c++") or shutil.which("g++")


@dataclass(frozen=True)
class Toolchain:
    """One C++ variant kind: how to find its compiler, probe it, compile a rendered source and load the result."""

    kind: str
    source_name: str
    binary_name: str
    find: Callable[[], str | None]
    vendor: str  # arch vendor this kind produces code for ("nvidia", "amd", "cpu")
    flags_env: str

    # -- key ----------------------------------------------------------------------------------
    def includes(self) -> list[str]:
        return list(settings.get("cxx_include"))

    def flags(self, arch) -> list[str]:
        if self.kind == "cuda":
            base = ["-cubin", f"-arch=sm_{arch.triton_arch}", "-O3", "-std=c++17", "-lineinfo"]
        else:
            base = ["-shared", "-fPIC", "-O2", "-std=c++17"]
        return base + _env_flags(self.flags_env)

    def fingerprint(self, arch) -> dict[str, Any]:
        comp = self.find()
        fp: dict[str, Any] = {
            "kind": self.kind,
            "compiler": comp and os.path.realpath(comp),
            "version": tool_version(comp),
            "flags": self.flags(arch) if arch.vendor == self.vendor else None,
            "include": self.includes(),
        }
        return fp

    # -- availability -------------------------------------------------------------------------
    def probe(self, arch) -> str | None:
        """Why this kind cannot build for ``arch`` on this machine, or None if it can try."""
        reasons = []
        if arch.vendor != self.vendor:
            what = {"nvidia": "an NVIDIA GPU arch", "amd": "an AMD GPU arch", "cpu": "CPU tensors"}[self.vendor]
            where = "CPU tensors (Triton interpreter)" if arch.vendor == "cpu" else f"arch {arch.name}"
            reasons.append(f"{self.kind} variants need {what}; this call is for {where}")
        if self.find() is None:
            pinned = settings.get("nvcc") if self.kind == "cuda" else None
            reasons.append(f"JITKERN_NVCC={pinned} is not an executable file" if pinned else
                           {"cuda": "nvcc not found (set CUDA_HOME or JITKERN_NVCC, or put nvcc on PATH)",
                            "cpp": "no C++ compiler found (set CXX or put c++ on PATH)"}[self.kind])
        return "; ".join(reasons) or None

    # -- build --------------------------------------------------------------------------------
    def build(self, job) -> tuple[dict[str, bytes], dict[str, Any]]:
        reason = self.probe(job.arch)
        if reason is not None:
            raise UnavailableError(f"{job.describe()}: {reason}", reason=reason, log_text=reason + "\n")
        comp = self.find()
        with tempfile.TemporaryDirectory(prefix=f"jitkern-{self.kind}-") as d:
            src = Path(d) / self.source_name
            out = Path(d) / self.binary_name
            src.write_text(job.source)
            cmd = [comp, *self.flags(job.arch), *[f"-I{p}" for p in self.includes()], "-o", out.name, src.name]
            header = f"$ {shlex.join(cmd)}\n"
            counters.bump("compiler_runs")
            t0 = time.perf_counter()
            limit = build_timeout()
            text, rc = _run_compiler(cmd, d, limit)
            dt = time.perf_counter() - t0
            log_text = f"{header}{text}\n[exit status {rc}, {dt:.2f} s]\n"
            if rc != 0 or not out.is_file():
                line = first_error_line(text)
                err = BuildError(f"{self.kind} build of {job.describe()} failed: {line}", reason=line,
                                 log_text=log_text)
                err.transient = rc == _TIMED_OUT  # a slow machine, not a broken variant: not recorded
                raise err
            binary = out.read_bytes()
        files = {self.source_name: job.source.encode(), self.binary_name: binary, LOG_FILE: log_text.encode()}
        return files, {"compiler": comp, "compile_seconds": round(dt, 3), "binary": self.binary_name}

    def load(self, entry, job) -> "Kernel":
        return HostKernel(entry, job) if self.kind == "cpp" else DeviceKernel(entry, job, self)


CUDA = Toolchain("cuda", "kernel.cu", "kernel.cubin", find_nvcc, "nvidia", "JITKERN_NVCC_FLAGS")
HOST = Toolchain("cpp", "kernel.cpp", "kernel.so", find_cxx, "cpu", "JITKERN_CXXFLAGS")


# ---- loading and launching ---------------------------------------------------------------------
_SCALARS = {"i1": ctypes.c_int8, "i8": ctypes.c_int8, "i16": ctypes.c_int16, "i32": ctypes.c_int32,
            "i64": ctypes.c_int64, "u8": ctypes.c_uint8, "u16": ctypes.c_uint16, "u32": ctypes.c_uint32,
            "u64": ctypes.c_uint64, "fp32": ctypes.c_float, "fp64": ctypes.c_double}


def _ctype(sig: str):
    if sig.startswith("*"):
        return ctypes.c_void_p
    try:
        return _SCALARS[sig]
    except KeyError:
        raise BuildError(f"C++ variants take pointers and {', '.join(_SCALARS)} arguments, not {sig!r}") from None


def _address(a) -> int:
    return a if isinstance(a, int) else a.data_ptr()


#: struct codes of kernel parameters; every parameter gets an 8-byte slot of the launch buffer
_PACK = {"i1": "b7x", "i8": "b7x", "i16": "h6x", "i32": "i4x", "i64": "q", "u8": "B7x", "u16": "H6x",
         "u32": "I4x", "u64": "Q", "fp32": "f4x", "fp64": "d"}


class DeviceKernel(Kernel):
    """A cubin/hsaco function launched through the driver API; block size from the config's
    ``block_x``/``block_y``/``block_z`` parameters.

    The parameters are packed with one ``struct.pack_into`` into a buffer of 8-byte slots that the
    driver's parameter array points at (the driver copies them at launch, so the buffer is reused,
    under a lock). Pointer arguments may be tensors or integer device addresses."""

    takes_addresses = True

    def __init__(self, entry, job, toolchain: Toolchain):
        super().__init__(entry, job)
        data = entry.file(toolchain.binary_name).read_bytes()
        fc = fastcall.module() if toolchain.kind == "cuda" else None
        try:
            if fc is not None:  # the CUDA driver alone (jitkern.fastcall): no Triton import
                import torch

                self._device = torch.cuda.current_device()
                self._stream = torch._C._cuda_getCurrentRawStream
                self._function, self.n_regs, self.n_spills, _ = fc.load_cubin(data, job.variant.kernel, 0,
                                                                              self._device)
            else:
                from triton.runtime.driver import driver

                dev = driver.active
                self._device = dev.get_current_device()
                self._stream = dev.get_current_stream
                _, self._function, self.n_regs, self.n_spills, _ = dev.utils.load_binary(
                    job.variant.kernel, data, 0, self._device)[:5]
        except Exception as e:
            raise LaunchError(f"could not load {self.name} from {entry.path}: {type(e).__name__}: {e}") from e
        p = job.config.p
        block = (int(p.get("block_x", 1)), int(p.get("block_y", 1)), int(p.get("block_z", 1)))
        self._bind([job.signature[a.name] for a in job.variant.args], block, _driver_launch(toolchain.kind))

    def _bind(self, sigs: list, block: tuple, api) -> None:
        """The launch of the loaded function: ``sigs`` the kernel's argument types, ``api`` the
        driver's launch function (a ctypes function of cuLaunchKernel's signature)."""
        import struct
        import threading

        for sig in sigs:
            _ctype(sig)  # rejects what C++ variants cannot take
        self._block = block
        self._ptr_idx = tuple(i for i, sig in enumerate(sigs) if sig.startswith("*"))
        self._struct = struct.Struct("<" + "".join("Q" if sig.startswith("*") else _PACK[sig] for sig in sigs))
        self._buf = ctypes.create_string_buffer(max(8, 8 * len(sigs)))
        base = ctypes.addressof(self._buf)
        self._params = (ctypes.c_void_p * max(1, len(sigs)))(*[base + 8 * i for i in range(len(sigs))])
        self._lock = threading.Lock()
        self._api = api
        types = "".join("P" if sig.startswith("*") else _PACK[sig][0] for sig in sigs)
        self.direct = DirectLaunch("driver", self._function, self._stream, self._device,
                                   (ctypes.cast(api, ctypes.c_void_p).value, block, 0, types, self._failed, (), None))

    def _failed(self, rc: int):
        raise LaunchError(f"launching {self.name} failed with driver error {rc}")

    def run(self, gx, gy, gz, *args):
        if gx <= 0 or gy <= 0 or gz <= 0:
            return
        a = addresses(args, self._ptr_idx)
        bx, by, bz = self._block
        stream = self._stream(self._device)
        with self._lock:
            self._struct.pack_into(self._buf, 0, *a)
            rc = self._api(self._function, gx, gy, gz, bx, by, bz, 0, stream, self._params, None)
        if rc != 0:
            self._failed(rc)

    def launch(self, grid3, *args):
        self.run(grid3[0], grid3[1], grid3[2], *args)


@functools.lru_cache(maxsize=None)
def _driver_launch(kind: str):
    if kind == "cuda":
        try:
            lib = ctypes.CDLL("libcuda.so.1")
        except OSError:
            from triton.backends.nvidia.driver import libcuda_dirs

            lib = ctypes.CDLL(os.path.join(libcuda_dirs()[0], "libcuda.so.1"))
        fn = lib.cuLaunchKernel
    else:
        fn = ctypes.CDLL("libamdhip64.so").hipModuleLaunchKernel
    u = ctypes.c_uint
    fn.argtypes = [ctypes.c_void_p, u, u, u, u, u, u, u, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


class HostKernel(Kernel):
    """``extern "C" int kernel(...)`` from the entry's shared library; non-zero return = failure."""

    def __init__(self, entry, job):
        super().__init__(entry, job)
        try:
            lib = ctypes.CDLL(str(entry.file(HOST.binary_name)))
            fn = getattr(lib, job.variant.kernel)
        except (OSError, AttributeError) as e:
            raise LaunchError(f"could not load {self.name} from {entry.path}: {e}") from e
        types = [_ctype(job.signature[a.name]) for a in job.variant.args]
        fn.argtypes = types
        fn.restype = ctypes.c_int
        self._fn = fn
        self._pointer = [t is ctypes.c_void_p for t in types]

    def launch(self, grid3, *args):
        rc = self._fn(*[_address(a) if ptr else a for ptr, a in zip(self._pointer, args)])
        if rc != 0:
            raise LaunchError(f"{self.name} returned error code {rc}")
