"""Load a Triton GPU entry with Triton's own driver, and launch it through Triton's C launcher.

The binary goes to the driver straight from the bytes of jitkern's entry that the cache verified:
no recompile, no lookup in Triton's JIT cache, and no second read of the files
(``JITKERN_DIRECT_LAUNCH=0``: through Triton's ``CompiledKernel`` instead). Used by
``jitkern.builders.triton.load``; CPU entries (Triton's interpreter) are loaded there.
"""
from __future__ import annotations

import json
from collections import namedtuple
from dataclasses import replace
from types import SimpleNamespace

from . import settings
from .binaries import METADATA_FILE, binary_name
from .builders.base import DirectLaunch, Kernel
from .errors import LaunchError
from .logs import warn_once


#: Triton launcher objects by what their generated C stub and Python wrapper depend on. Triton makes
#: one per CompiledKernel (generating the stub's source, hashing it, finding the built stub in its
#: cache and importing it); kernels with the same signature share one here.
_launchers: dict = {}
_LAUNCHER_FIELDS = ("num_ctas", "warp_size", "global_scratch_size", "global_scratch_align", "profile_scratch_size",
                    "profile_scratch_align", "launch_cooperative_grid", "launch_pdl", "tensordesc_meta")
#: Triton's metadata record type by field names, and its compiler backend by target (Triton makes a
#: new namedtuple class and backend object for every kernel it loads).
_metadata_types: dict = {}
_backends: dict = {}


def _hooked(hook) -> bool:
    """Whether a Triton hook is set: Triton 3.6 keeps an always-present ``HookChain`` (set when it has
    calls); older versions use None for unset."""
    return hook is not None and bool(getattr(hook, "calls", True))


def direct_enabled() -> bool:
    """Whether CUDA kernels load and launch through jitkern's direct path (the default): the binary
    and metadata jitkern verified go straight to Triton's driver, launchers are shared by kernels of
    one signature, and launches call Triton's C ``launch`` directly. ``JITKERN_DIRECT_LAUNCH=0``
    switches back to Triton's own ``CompiledKernel`` (for comparison, or if a Triton release changes
    its launcher). Read when a kernel is loaded, never per launch."""
    return settings.get("direct_launch")


def _load_direct(entry, job, src):
    """What Triton's ``CompiledKernel(...)`` and its ``_init_handles`` do, from the bytes the cache
    verified: ``(metadata, packed_metadata, launcher, function)``. The same resource checks as Triton
    (shared memory, tensor memory, threads per block) raise Triton's ``OutOfResources``."""
    from triton.compiler.compiler import max_shared_mem
    from triton.runtime.driver import driver
    from triton.runtime.errors import OutOfResources

    md, packed = metadata_of(entry)
    active = driver.active
    device = active.get_current_device()
    lkey = repr((md.target, sorted(src.signature.items()), [getattr(md, f, None) for f in _LAUNCHER_FIELDS]))
    run = _launchers.get(lkey)
    if run is None:
        run = _launchers[lkey] = active.launcher_cls(src, md)
    max_shared = max_shared_mem(device)
    if md.shared > max_shared:
        raise OutOfResources(md.shared, max_shared, "shared memory")
    if getattr(md, "tmem_size", None) is not None and md.tmem_size > 512:
        raise OutOfResources(md.tmem_size, 512, "tensor memory")
    _, function, _, _, max_threads = active.utils.load_binary(md.name, entry.read_bytes(binary_name(job.arch)),
                                                             md.shared, device)
    threads = md.num_warps * active.get_current_target().warp_size
    if threads > max_threads:
        raise OutOfResources(threads, max_threads, "threads")
    return md, packed, run, function


def metadata_of(entry) -> tuple:
    """``(metadata, packed_metadata)`` of a GPU entry, as Triton's ``CompiledKernel`` makes them from
    the entry's ``metadata.json`` (no GPU needed; ``tests/test_runtime.py`` compares the two)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    fields = json.loads(entry.read_bytes(METADATA_FILE))
    t = fields["target"]
    fields["target"] = GPUTarget(t["backend"], t["arch"], t["warp_size"])
    names = tuple(sorted(fields))
    record = _metadata_types.get(names)
    if record is None:
        record = _metadata_types[names] = namedtuple("KernelMetadata", names)
    md = record(**fields)
    backend = _backends.get(md.target)
    if backend is None:
        backend = _backends[md.target] = make_backend(md.target)
    return md, backend.pack_metadata(md)


def _load_with_triton(entry, job, src):
    """The same four things through Triton's own ``CompiledKernel`` (reads the entry's files itself)."""
    from triton.compiler.compiler import CompiledKernel

    group = {METADATA_FILE: str(entry.file(METADATA_FILE)),
             binary_name(job.arch): str(entry.file(binary_name(job.arch)))}
    ck = CompiledKernel(src, group, entry.key)
    ck._init_handles()
    return ck.metadata, ck.packed_metadata, ck.run, ck.function


def direct_launch(run, function, packed, stream, device):
    """``run_direct(gx, gy, gz, *kernel_args)``: what Triton's ``CudaLauncher.__call__`` does, without
    its Python layer: call the generated C ``launch`` with the constant arguments bound once. A grid
    with a zero dimension launches nothing. ``tests/test_runtime.py`` checks the arguments against
    Triton's own ``CudaLauncher.__call__``.

    Kernels that need global scratch (device-made TMA descriptors: 128 bytes per descriptor and
    program) get it from torch's caching allocator on the launch's stream, sized like Triton's
    (grid x num_ctas x size); Triton's path would need ``triton.set_allocator`` to have been called."""
    c_launch = run.launch
    # launch(gx, gy, gz, stream, function, cooperative, pdl, global_scratch, profile_scratch,
    #        packed_metadata, launch_metadata, enter_hook, exit_hook, *kernel_args)
    scratch = getattr(run, "global_scratch_size", 0) * getattr(run, "num_ctas", 1)
    if scratch:
        import torch

        coop, pdl, dev = run.launch_cooperative_grid, run.launch_pdl, torch.device("cuda", device)
        tail = (None, packed, None, None, None)

        def run_scratch(gx, gy, gz, *args):
            if gx > 0 and gy > 0 and gz > 0:
                buf = torch.empty(gx * gy * gz * scratch, dtype=torch.uint8, device=dev)
                c_launch(gx, gy, gz, stream(device), function, coop, pdl, buf.data_ptr(), *tail, *args)

        return run_scratch
    fixed = direct_fixed(run, packed)

    def run_direct(gx, gy, gz, *args):
        if gx > 0 and gy > 0 and gz > 0:
            c_launch(gx, gy, gz, stream(device), function, *fixed, *args)

    return run_direct


def direct_fixed(run, packed) -> tuple:
    """The arguments of Triton's C ``launch`` between the function and the kernel's own arguments,
    for a kernel without global or profile scratch."""
    return (run.launch_cooperative_grid, run.launch_pdl, None, None, packed, None, None, None)


class GPUKernel(Kernel):
    def __init__(self, entry, job):
        super().__init__(entry, job)
        from triton import knobs
        from triton.runtime.driver import driver

        names = [a.name for a in job.variant.args]
        src = SimpleNamespace(constants={}, signature=dict(job.signature), fn=SimpleNamespace(arg_names=names))
        rt = knobs.runtime
        # Triton's path where load hooks are set (profilers see every load) or direct loading is off
        direct = direct_enabled() and not (_hooked(rt.kernel_load_start_hook) or _hooked(rt.kernel_load_end_hook))
        try:  # load the module now: resource errors surface here, not mid-model
            if direct:
                try:
                    md, packed, run, function = _load_direct(entry, job, src)
                except (ImportError, AttributeError, KeyError) as e:  # a Triton whose internals differ
                    warn_once(("direct-load", type(e).__name__), "jitkern: loading kernels through Triton's "
                              "CompiledKernel; the direct path does not fit this Triton (%s: %s)", type(e).__name__, e)
                    direct = False
            if not direct:
                md, packed, run, function = _load_with_triton(entry, job, src)
        except Exception as e:
            raise LaunchError(f"could not load {self.name} from {entry.path}: {type(e).__name__}: {e}") from e
        self.entry = replace(entry, verified={})  # the bytes are in the driver now
        self._metadata = md
        self._run = run  # Triton's launcher object (its C stub is built by gcc once, kept in Triton's cache)
        self._function = function
        self._packed = packed
        dev = driver.active
        self._device = dev.get_current_device()
        self._stream = dev.get_current_stream  # torch._C._cuda_getCurrentRawStream: CUDA-graph capture aware
        fast = self._direct_launch() if direct else None
        if fast is not None:
            self.run = fast
            self.takes_addresses = True
            if getattr(md, "global_scratch_size", 0):  # Triton's own path would need triton.set_allocator
                self.launch = lambda grid3, *args: fast(grid3[0], grid3[1], grid3[2], *args)
            else:  # jitkern.fastcall's C hot path calls the same C launch
                self.direct = DirectLaunch("triton", function, self._stream, self._device,
                                           (run.launch, direct_fixed(run, packed)))

    def _direct_launch(self):
        """Triton's C ``launch`` with the constant arguments bound (see :func:`direct_launch`), where it
        applies: CUDA kernels needing no profile scratch, no launch hooks set (profilers) at load time.
        HIP keeps the general path (its stub takes another argument order; not verified on hardware)."""
        from triton import knobs

        run, md = self._run, self._metadata
        if (self.job.arch.backend != "cuda" or getattr(md, "profile_scratch_size", 0) or _hooked(knobs.runtime.launch_enter_hook)
                or _hooked(knobs.runtime.launch_exit_hook) or not hasattr(run, "launch")):
            return None
        return direct_launch(run, self._function, self._packed, self._stream, self._device)

    def launch(self, grid3, *args):
        self._run(grid3[0], grid3[1], grid3[2], self._stream(self._device), self._function, self._packed,
                  None, None, None, *args)
