"""The same kernels, launched through Triton's own JIT: the "Triton-JIT time of the same kernel" that
the benchmarks print beside jitkern's.

``record(fn)`` calls ``fn`` once (an op as users call it) with every loaded jitkern Triton kernel's
launch entry points wrapped, and returns what was launched: (kernel, grid, args) per launch, in order.
``twin(launches)`` returns a function that replays those launches through ``@triton.jit`` functions
imported from the very source jitkern rendered for them (same num_warps / num_stages), so timing the
two measures jitkern's artifact and launch path against Triton's JIT on identical kernels and inputs.
Pointer arguments jitkern passed as integer addresses go to the JIT as small objects with
``data_ptr()`` and the pointer's dtype (what Triton's JIT reads from a tensor).
"""
from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64", "i8": "int8",
           "u8": "uint8", "i16": "int16", "i32": "int32", "i64": "int64"}


class _Ptr:
    """What Triton's JIT needs of a pointer argument: an address and a torch dtype."""

    def __init__(self, addr: int, dtype):
        self._addr, self.dtype = addr, dtype

    def data_ptr(self) -> int:
        return self._addr


def _loaded_kernels():
    from jitkern import runtime

    return [k for k in list(runtime._kernels.values()) if hasattr(k, "job") and k.job.arch.backend is not None
            and k.job.variant.kind == "triton"]


def record(fn):
    """Launches of jitkern Triton kernels made by one call of ``fn`` (call ``fn`` once before, so its
    kernels are loaded). Returns [(kernel, (gx, gy, gz), args)]."""
    launches = []
    patched = []
    for k in _loaded_kernels():
        run, launch = k.__dict__.get("run"), k.__dict__.get("launch")

        def make_run(k=k, inner=k.run):
            def rec_run(gx, gy, gz, *args):
                launches.append((k, (gx, gy, gz), args))
                return inner(gx, gy, gz, *args)
            return rec_run

        def make_launch(k=k, inner=k.launch):
            def rec_launch(grid3, *args):
                launches.append((k, tuple(grid3), args))
                return inner(grid3, *args)
            return rec_launch

        patched.append((k, run, launch))
        k.run, k.launch = make_run(), make_launch()
    from jitkern import dispatch, settings

    # the dispatcher binds a kernel's run when it decides: decide again, with these (patched) kernels
    dispatch.clear_memory(kernels=False)
    try:
        with settings.override(fast_call=False):  # the C hot path launches without run()/launch()
            fn()
    finally:
        for k, run, launch in patched:
            for name, old in (("run", run), ("launch", launch)):
                if old is None:
                    k.__dict__.pop(name, None)
                else:
                    setattr(k, name, old)
        dispatch.clear_memory(kernels=False)
    # a launch through kernel[grid] reaches launch() (and on the direct path run()): keep one of each
    out, last = [], None
    for item in launches:
        if last is not None and item[0] is last[0] and item[2] is last[2]:
            continue
        out.append(item)
        last = item
    return out


_modules: dict = {}


def _jit_function(kernel):
    key = kernel.job.key
    fn = _modules.get(key)
    if fn is None:
        path = Path(tempfile.mkdtemp(prefix="jk-twin-")) / f"twin_{key[:12]}.py"
        path.write_text(kernel.job.source)
        spec = importlib.util.spec_from_file_location(f"jk_twin_{key[:12]}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        fn = _modules[key] = getattr(mod, kernel.job.variant.kernel)
    return fn


def twin(launches):
    """A function replaying ``launches`` through Triton's JIT (compiles on first call)."""
    import torch

    calls = []
    for k, grid, args in launches:
        fn = _jit_function(k)
        sig = list(k.job.signature.values())
        conv = []
        for a, ty in zip(args, sig):
            if isinstance(ty, str) and ty.startswith("*") and isinstance(a, int):
                a = _Ptr(a, getattr(torch, _DTYPES[ty[1:]]))
            conv.append(a)
        calls.append((fn[grid], conv, k.job.config.compile_options()))

    def replay():
        for f, args, opts in calls:
            f(*args, **opts)
    return replay


def ensure_allocator():
    """Triton's JIT launches kernels needing global scratch (TMA descriptors made on the device) only
    with an allocator set: give it torch's (the twin only; jitkern allocates its own)."""
    import torch
    import triton

    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


def compare(fn, do_bench, **bench_kw) -> dict:
    """jitkern's ``fn`` and its Triton-JIT twin, timed the same way in the same run."""
    fn()
    launches = record(fn)
    if not launches:
        return {"twin": None}
    ensure_allocator()  # device-made TMA descriptors need one; a driver-loaded kernel does not say so
    rep = twin(launches)
    rep()
    import torch

    torch.cuda.synchronize()
    jk = do_bench(fn, **bench_kw)
    tj = do_bench(rep, **bench_kw)
    return {"jitkern_ms": jk, "triton_jit_ms": tj, "jit_over_jitkern": tj / jk, "kernels": len(launches)}
