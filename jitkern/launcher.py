"""Load a Triton GPU entry and launch it: through the CUDA driver alone, or through Triton's driver.

The binary goes to the driver straight from the bytes of jitkern's entry that the cache verified:
no recompile, no lookup in Triton's JIT cache, and no second read of the files. ``load_gpu`` picks
the way:

* ``DriverKernel`` (CUDA, the default where it applies): ``jitkern.fastcall`` loads the cubin with
  ``cuModuleLoadData`` and launches it with ``cuLaunchKernel``, packing the parameters as Triton's
  launcher does (the kernel's arguments, then Triton's global- and profile-scratch pointers). Nothing
  of Triton is imported and no launcher stub is built, so a process whose kernels are all cached
  starts without Triton. It applies to kernels of one CTA per program with no programmatic
  dependent launch, cooperative grid, profile scratch or tensor-descriptor arguments (global scratch,
  for device-made TMA descriptors, is allocated per launch), while no Triton load or launch hook is
  set (profilers); anything else goes to
* ``GPUKernel``: Triton's driver loads the binary and its generated C ``launch`` runs it, called
  directly with integer addresses (``JITKERN_DIRECT_LAUNCH=0``: through Triton's
  ``CompiledKernel`` instead).

Used by ``jitkern.builders.triton.load``; CPU entries (Triton's interpreter) are loaded there.
"""
from __future__ import annotations

import json
import sys
from collections import namedtuple
from dataclasses import replace
from types import SimpleNamespace

from . import fastcall, settings, triton_cache
from .binaries import METADATA_FILE, binary_name
from .builders.base import DirectLaunch, Kernel, addresses
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
        triton_cache.ensure_writable()  # Triton's driver builds (and caches) the kernel's C launcher stub
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


# ---- through the CUDA driver alone ----------------------------------------------------------------
#: Triton's scalar argument types -> jitkern.fastcall's pack codes (Triton's launcher's storage types)
PACK_CODES = {"i1": "b", "i8": "b", "i16": "h", "i32": "i", "i64": "q", "u1": "B", "u8": "B", "u16": "H",
              "u32": "I", "u64": "Q", "fp16": "e", "bf16": "g", "fp32": "f", "f32": "f", "fp64": "d"}
#: Triton 3.x appends two pointer parameters to every kernel: global scratch and profile scratch
TRITON_TRAILING = (0, 0)


def _triton_hooks_set() -> bool:
    """Whether a Triton load or launch hook is set (only possible once Triton is imported)."""
    if "triton" not in sys.modules:
        return False
    from triton import knobs

    rt = knobs.runtime
    return any(_hooked(getattr(rt, h, None)) for h in ("kernel_load_start_hook", "kernel_load_end_hook",
                                                       "launch_enter_hook", "launch_exit_hook"))


def driver_codes(job, fields: dict) -> str | None:
    """The pack codes of the kernel's parameters (Triton's trailing scratch pointers included) where
    the entry loads and launches through the CUDA driver alone; None where Triton's driver is needed."""
    if job.arch.backend != "cuda" or fields.get("num_ctas", 1) != 1 or fields.get("launch_pdl") \
            or fields.get("launch_cooperative_grid") or fields.get("profile_scratch_size") \
            or fields.get("tensordesc_meta") or fields.get("tmem_size"):
        return None
    codes = []
    for t in job.signature.values():
        code = "P" if t.startswith("*") else PACK_CODES.get(t)
        if code is None:
            return None
        codes.append(code)
    return "".join(codes) + "P" * len(TRITON_TRAILING)


class DriverKernel(Kernel):
    """A cubin loaded and launched through the CUDA driver by ``jitkern.fastcall`` (no Triton)."""

    takes_addresses = True

    def __init__(self, entry, job, fc, fields: dict, codes: str):
        super().__init__(entry, job)
        import torch

        self._fc = fc
        self._device = torch.cuda.current_device()
        self._stream = torch._C._cuda_getCurrentRawStream  # what Triton's driver uses: CUDA-graph capture aware
        shared, threads = int(fields["shared"]), int(fields["num_warps"]) * int(fields["target"]["warp_size"])
        try:
            self._function, self.n_regs, self.n_spills, max_threads = fc.load_cubin(
                entry.read_bytes(binary_name(job.arch)), fields["name"], shared, self._device)
            if threads > max_threads:
                raise ValueError(f"it needs {threads} threads per block; the device allows {max_threads}")
        except (RuntimeError, ValueError, OSError) as e:
            raise LaunchError(f"could not load {self.name} from {entry.path}: {e}") from e
        self.entry = replace(entry, verified={})  # the bytes are in the driver now
        self._ptr_idx = tuple(i for i, c in enumerate(codes[:-len(TRITON_TRAILING)]) if c == "P")
        self._launch_fn, self._block, self._shared, self._codes = fc.cu_launch_kernel(), (threads, 1, 1), shared, codes
        # global scratch (device-made TMA descriptors): grid size x bytes, made per launch from torch's
        # caching allocator on the launch's stream, as Triton's launcher sizes it
        per_program = int(fields.get("global_scratch_size") or 0) * int(fields.get("num_ctas", 1))
        self._scratch = None
        if per_program:
            dev = torch.device("cuda", self._device)
            empty, u8 = torch.empty, torch.uint8
            self._scratch = (per_program, lambda n: empty(n, dtype=u8, device=dev))
        self.direct = DirectLaunch("driver", self._function, self._stream, self._device,
                                   (self._launch_fn, self._block, shared, codes, self._failed, TRITON_TRAILING,
                                    self._scratch))

    def _failed(self, rc: int):
        raise LaunchError(f"launching {self.name} failed with CUDA error {rc}")

    def run(self, gx, gy, gz, *args):
        if gx <= 0 or gy <= 0 or gz <= 0:
            return
        a = addresses(args, self._ptr_idx)
        scratch = self._scratch[1](gx * gy * gz * self._scratch[0]) if self._scratch else None
        trailing = (scratch.data_ptr(), *TRITON_TRAILING[1:]) if scratch is not None else TRITON_TRAILING
        try:
            self._fc.launch(self._launch_fn, self._function, (gx, gy, gz), self._block, self._shared,
                            self._stream(self._device), self._codes, (*a, *trailing))
        except RuntimeError as e:
            raise LaunchError(f"launching {self.name} failed: {e}") from e

    def launch(self, grid3, *args):
        self.run(grid3[0], grid3[1], grid3[2], *args)


def load_gpu(entry, job) -> Kernel:
    """A loaded GPU kernel: ``DriverKernel`` where it applies (see the module doc), else ``GPUKernel``."""
    if job.arch.backend == "cuda" and direct_enabled() and not _triton_hooks_set():
        fc = fastcall.module()
        if fc is not None:
            fields = json.loads(entry.read_bytes(METADATA_FILE))
            codes = driver_codes(job, fields)
            if codes is not None:
                return DriverKernel(entry, job, fc, fields, codes)
    return GPUKernel(entry, job)
