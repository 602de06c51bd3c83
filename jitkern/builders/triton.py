"""Triton builder: import the rendered module and compile its kernel for an explicit GPUTarget.

``triton.compile`` with ``target=GPUTarget(...)`` needs no GPU, so gfx942/gfx950/sm_90 artifacts
build on any machine. For the CPU interpreter arch there is nothing to compile: the entry holds the
rendered module, which the launcher imports and runs through Triton's interpreter.

The compile step (``compile_source``) takes and returns plain data, so it can run in this process
or in a worker process. A process with ``TRITON_INTERPRET=1`` cannot generate GPU code (Triton's
code generator behaves differently once the interpreter is on), so there it always runs in a clean
worker.
"""
from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ..arch import interpreter_enabled
from ..binaries import METADATA_FILE, SOURCE_FILE, binary_name
from ..errors import BuildError, is_transient
from ..key import triton_fingerprint
from ..triton_import import ensure_imported
from ..launcher import load_gpu
from .base import Kernel


def fingerprint(arch) -> dict[str, Any]:
    return triton_fingerprint()


def import_source(path: Path, module_name: str):
    """Import a rendered kernel module from a file (so ``inspect`` and tracebacks see the source)."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise BuildError(f"rendered kernel module {path} failed to import: {type(e).__name__}: {e}",
                         transient=is_transient(e)) from e
    return module


def module_from_source(source: bytes | str, filename: str | os.PathLike, module_name: str):
    """A module executed from ``source`` in memory (the cache's verified bytes), never imported from a
    path: Python neither reads a ``__pycache__`` (a planted .pyc cannot run) nor writes one into the
    entry. The source is registered with ``linecache`` under ``filename`` so tracebacks and
    ``inspect.getsource`` (which Triton uses) see exactly these bytes."""
    import linecache
    import types

    text = source.decode() if isinstance(source, (bytes, bytearray)) else source
    filename = os.fspath(filename)
    linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)  # mtime None: never re-read
    module = types.ModuleType(module_name)
    module.__file__ = filename
    try:
        exec(compile(text, filename, "exec", dont_inherit=True), module.__dict__)  # noqa: S102 (verified source)
    except Exception as e:
        raise BuildError(f"kernel module {filename} failed to load: {type(e).__name__}: {e}",
                         transient=is_transient(e)) from e
    return module


def kernel_function(module, name: str, where):
    fn = getattr(module, name, None)
    if fn is None:
        raise BuildError(f"rendered module {where} defines no kernel {name!r}")
    return fn


def attrs_for(job) -> dict:
    """Specialisation attributes: pointers 16-byte aligned, flagged integers multiples of 16."""
    attrs = {}
    params = job.config.p
    for i, a in enumerate(job.variant.args):
        if a.is_pointer or (a.divisible_if and params.get(a.divisible_if)):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def _summary(e: Exception) -> str:
    """Triton's messages put the source excerpt first and the error last: keep both ends."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return ""
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


def compile_source(source: str, kernel: str, signature: dict, attrs: dict, target: tuple, options: dict,
                   what: str) -> tuple[bytes, dict]:
    """Compile ``kernel`` from rendered ``source`` for ``target`` = (backend, arch, warp_size).

    Returns (binary, Triton metadata as a JSON-able dict). Plain data in and out.
    """
    triton = ensure_imported()  # without its entry-point scan where that finds only in-tree backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    with tempfile.TemporaryDirectory(prefix="jitkern-build-") as d:
        path = Path(d) / SOURCE_FILE
        path.write_text(source)
        fn = kernel_function(import_source(path, f"jitkern_build_{abs(hash(source))}"), kernel, what)
        if not isinstance(fn, JITFunction):  # defensive: an InterpretedFunction wraps the raw function
            fn = JITFunction(fn.fn)
        gpu_target = GPUTarget(*target)
        try:
            ck = triton.compile(ASTSource(fn, signature, {}, attrs), target=gpu_target, options=options)
        except Exception as e:
            # transient (e.g. ENOSPC from Triton's cache) is decided here: the cause does not cross processes
            raise BuildError(f"Triton failed to compile {what}: {type(e).__name__}: {_summary(e)}",
                             transient=is_transient(e)) from None
    md = ck.metadata._asdict()
    md["target"] = {"backend": gpu_target.backend, "arch": gpu_target.arch, "warp_size": gpu_target.warp_size}
    binary = ck.asm["hsaco" if gpu_target.backend == "hip" else "cubin"]
    return binary, json.loads(json.dumps(md, default=vars))


def _clean_worker_init():
    os.environ.pop("TRITON_INTERPRET", None)


def compile_in_clean_process(*args):
    """Run ``compile_source`` in a fresh process without ``TRITON_INTERPRET``."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from concurrent.futures.process import BrokenProcessPool

    ctx = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=_clean_worker_init) as pool:
            return pool.submit(compile_source, *args).result()
    except BrokenProcessPool:
        raise BuildError(
            f"the clean worker process compiling {args[-1]} died before returning. A 'spawn' worker re-imports "
            f"the main script: if the script calls jitkern at module level, put that code under "
            f"'if __name__ == \"__main__\":' (the worker's own error is printed above)", transient=True) from None


def build(job) -> tuple[dict[str, bytes], dict[str, Any]]:
    files = {SOURCE_FILE: job.source.encode()}
    if job.arch.backend is None:  # interpreter: the module is the artifact; check that it imports
        with tempfile.TemporaryDirectory(prefix="jitkern-build-") as d:
            path = Path(d) / SOURCE_FILE
            path.write_text(job.source)
            kernel_function(import_source(path, f"jitkern_check_{job.key[:16]}"), job.variant.kernel, job.describe())
        return files, {}
    args = (job.source, job.variant.kernel, job.signature, attrs_for(job),
            (job.arch.backend, job.arch.triton_arch, job.arch.warp_size), job.config.compile_options(),
            job.describe())
    binary, md = compile_in_clean_process(*args) if interpreter_enabled() else compile_source(*args)
    files[binary_name(job.arch)] = binary
    files[METADATA_FILE] = json.dumps(md, sort_keys=True).encode()
    meta = {
        "kernel_name": md["name"],
        "shared_bytes": md.get("shared", 0),
        "num_warps": md.get("num_warps"),
        "num_stages": md.get("num_stages"),
    }
    return files, meta


class InterpretedKernel(Kernel):
    """A CPU entry: the rendered module, run through Triton's interpreter."""

    def __init__(self, entry, job):
        super().__init__(entry, job)
        module = module_from_source(entry.read_bytes(SOURCE_FILE), entry.file(SOURCE_FILE),
                                    f"jitkern_kernels.k{entry.key[:16]}")  # the verified bytes, never a path
        self._fn = kernel_function(module, job.variant.kernel, entry.path)
        self._options = job.config.compile_options()

    def launch(self, grid3, *args):
        self._fn[grid3](*args, **self._options)


def load(entry, job) -> Kernel:
    if job.arch.backend is None:
        return InterpretedKernel(entry, job)
    return load_gpu(entry, job)
