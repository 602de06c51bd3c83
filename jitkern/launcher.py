"""Load a cache entry into something launchable, and launch it.

GPU entries are loaded with Triton's own ``CompiledKernel`` and driver, straight from the files of
jitkern's entry: no recompile and no lookup in Triton's JIT cache. CPU entries (Triton interpreter)
import the rendered module from the entry and call the kernel through the interpreter.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

from .builders.triton import METADATA_FILE, SOURCE_FILE, binary_name, import_source, kernel_function
from .errors import LaunchError


class Kernel:
    """A loaded kernel.

    ``kernel[grid](*args)`` launches it; ``kernel.run(gx, gy, gz, *args)`` is the same launch without
    building a grid tuple and a closure per call (op functions' hot path). A grid with a zero
    dimension is a no-op, never a launch. ``takes_addresses``: pointer arguments may be passed as
    integer device addresses (``t.data_ptr()``), which skips the driver's per-pointer query.
    """

    takes_addresses = False

    def __init__(self, entry, job):
        self.entry = entry
        self.job = job
        self.key = entry.key
        self.name = job.describe()

    def run(self, gx: int, gy: int, gz: int, *args):
        if gx > 0 and gy > 0 and gz > 0:
            self.launch((gx, gy, gz), *args)

    def __getitem__(self, grid):
        g = tuple(int(x) for x in grid) + (1,) * (3 - len(grid))
        if g[0] <= 0 or g[1] <= 0 or g[2] <= 0:
            return _no_launch
        return lambda *args: self.launch(g, *args)

    def launch(self, grid3, *args):  # pragma: no cover - overridden
        raise NotImplementedError


def _no_launch(*args):
    return None


#: Triton launcher objects by what their generated C stub and Python wrapper depend on. Triton makes
#: one per CompiledKernel (generating the stub's source, hashing it, finding the built stub in its
#: cache and importing it); kernels with the same signature share one here.
_launchers: dict = {}
_LAUNCHER_FIELDS = ("num_ctas", "warp_size", "global_scratch_size", "global_scratch_align", "profile_scratch_size",
                    "profile_scratch_align", "launch_cooperative_grid", "launch_pdl", "tensordesc_meta")


def _hooked(hook) -> bool:
    """Whether a Triton hook is set: Triton 3.6 keeps an always-present ``HookChain`` (set when it has
    calls); older versions use None for unset."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _load_handles(ck, src) -> None:
    """What ``CompiledKernel._init_handles`` does, with the launcher shared between kernels of one
    signature: load the binary with Triton's driver and check the same resource limits. Where Triton
    has load hooks set (profilers), or its internals are not what this expects, Triton's own
    ``_init_handles`` runs instead."""
    from triton import knobs
    from triton.runtime.driver import driver

    rt = knobs.runtime
    if not direct_enabled() or _hooked(rt.kernel_load_start_hook) or _hooked(rt.kernel_load_end_hook):
        ck._init_handles()
        return
    try:
        from triton.compiler.compiler import max_shared_mem
        from triton.runtime.errors import OutOfResources

        md = ck.metadata
        lkey = repr((md.target, sorted(src.signature.items()), [getattr(md, f, None) for f in _LAUNCHER_FIELDS]))
    except (ImportError, AttributeError):
        ck._init_handles()
        return
    active = driver.active
    device = active.get_current_device()
    run = _launchers.get(lkey)
    if run is None:
        run = _launchers[lkey] = active.launcher_cls(src, md)
    if md.shared > max_shared_mem(device):
        raise OutOfResources(md.shared, max_shared_mem(device), "shared memory")
    if getattr(md, "tmem_size", None) is not None and md.tmem_size > 512:
        raise OutOfResources(md.tmem_size, 512, "tensor memory")
    ck.module, ck.function, ck.n_regs, ck.n_spills, ck.n_max_threads = active.utils.load_binary(
        ck.name, ck.kernel, md.shared, device)
    if md.num_warps * active.get_current_target().warp_size > ck.n_max_threads:
        raise OutOfResources(md.num_warps * active.get_current_target().warp_size, ck.n_max_threads, "threads")
    ck._run = run


def direct_enabled() -> bool:
    """Whether CUDA kernels launch through Triton's C ``launch`` directly, with launchers shared by
    kernels of one signature (the default). ``JITKERN_DIRECT_LAUNCH=0`` switches back to Triton's
    own ``CompiledKernel`` path (for comparison, or if a Triton release changes its launcher). Read
    when a kernel is loaded, never per launch."""
    return os.environ.get("JITKERN_DIRECT_LAUNCH", "1").strip().lower() not in ("0", "false", "off", "no")


def direct_launch(run, function, packed, stream, device):
    """``run_direct(gx, gy, gz, *kernel_args)``: what Triton's ``CudaLauncher.__call__`` does for a
    kernel that needs no scratch memory, without its Python layer: call the generated C ``launch``
    with the constant arguments bound once. A grid with a zero dimension launches nothing.
    ``tests/test_runtime.py`` checks the arguments against Triton's own ``CudaLauncher.__call__``."""
    c_launch = run.launch
    # launch(gx, gy, gz, stream, function, cooperative, pdl, global_scratch, profile_scratch,
    #        packed_metadata, launch_metadata, enter_hook, exit_hook, *kernel_args)
    fixed = (run.launch_cooperative_grid, run.launch_pdl, None, None, packed, None, None, None)

    def run_direct(gx, gy, gz, *args):
        if gx > 0 and gy > 0 and gz > 0:
            c_launch(gx, gy, gz, stream(device), function, *fixed, *args)

    return run_direct


class GPUKernel(Kernel):
    def __init__(self, entry, job):
        super().__init__(entry, job)
        from triton.compiler.compiler import CompiledKernel
        from triton.runtime.driver import driver

        names = [a.name for a in job.variant.args]
        src = SimpleNamespace(constants={}, signature=dict(job.signature), fn=SimpleNamespace(arg_names=names))
        group = {METADATA_FILE: str(entry.file(METADATA_FILE)),
                 binary_name(job.arch): str(entry.file(binary_name(job.arch)))}
        try:
            ck = CompiledKernel(src, group, entry.key)
            _load_handles(ck, src)  # load the module now: resource errors surface here, not mid-model
        except Exception as e:
            raise LaunchError(f"could not load {self.name} from {entry.path}: {type(e).__name__}: {e}") from e
        self._ck = ck
        self._run = ck.run  # Triton's launcher object (its C stub is built by gcc once, kept in Triton's cache)
        self._function = ck.function
        self._packed = ck.packed_metadata
        dev = driver.active
        self._device = dev.get_current_device()
        self._stream = dev.get_current_stream  # torch._C._cuda_getCurrentRawStream: CUDA-graph capture aware
        direct = self._direct_launch()
        if direct is not None:
            self.run = direct
            self.takes_addresses = True

    def _direct_launch(self):
        """Triton's C ``launch`` with the constant arguments bound (see :func:`direct_launch`), where it
        applies: CUDA kernels needing no scratch memory, no launch hooks set (profilers) at load time.
        HIP keeps the general path (its stub takes another argument order; not verified on hardware)."""
        from triton import knobs

        run, md = self._run, self._ck.metadata
        if (not direct_enabled() or self.job.arch.backend != "cuda" or getattr(md, "global_scratch_size", 0)
                or getattr(md, "profile_scratch_size", 0) or _hooked(knobs.runtime.launch_enter_hook)
                or _hooked(knobs.runtime.launch_exit_hook) or not hasattr(run, "launch")):
            return None
        return direct_launch(run, self._function, self._packed, self._stream, self._device)

    def launch(self, grid3, *args):
        self._run(grid3[0], grid3[1], grid3[2], self._stream(self._device), self._function, self._packed,
                  None, None, None, *args)


class InterpretedKernel(Kernel):
    def __init__(self, entry, job):
        super().__init__(entry, job)
        module = import_source(entry.file(SOURCE_FILE), f"jitkern_kernels.k{entry.key[:16]}")
        self._fn = kernel_function(module, job.variant.kernel, entry.path)
        self._options = job.config.compile_options()

    def launch(self, grid3, *args):
        self._fn[grid3](*args, **self._options)


def load(entry, job) -> Kernel:
    return InterpretedKernel(entry, job) if job.arch.backend is None else GPUKernel(entry, job)
