"""Load a cache entry into something launchable, and launch it.

GPU entries are loaded with Triton's own ``CompiledKernel`` and driver, straight from the files of
jitkern's entry: no recompile and no lookup in Triton's JIT cache. CPU entries (Triton interpreter)
import the rendered module from the entry and call the kernel through the interpreter.
"""
from __future__ import annotations

from types import SimpleNamespace

from .builders.triton import METADATA_FILE, SOURCE_FILE, binary_name, import_source, kernel_function
from .errors import LaunchError


class Kernel:
    """A loaded kernel. ``kernel[grid](*args)`` launches it; a grid with a zero dimension is a no-op."""

    def __init__(self, entry, job):
        self.entry = entry
        self.job = job
        self.key = entry.key
        self.name = job.describe()

    def __getitem__(self, grid):
        g = tuple(int(x) for x in grid) + (1,) * (3 - len(grid))
        if g[0] <= 0 or g[1] <= 0 or g[2] <= 0:
            return _no_launch
        return lambda *args: self.launch(g, *args)

    def launch(self, grid3, *args):  # pragma: no cover - overridden
        raise NotImplementedError


def _no_launch(*args):
    return None


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
            ck._init_handles()  # load the module now: resource errors surface here, not mid-model
        except Exception as e:
            raise LaunchError(f"could not load {self.name} from {entry.path}: {type(e).__name__}: {e}") from e
        self._ck = ck
        self._run = ck.run
        self._function = ck.function
        self._packed = ck.packed_metadata
        dev = driver.active
        self._device = dev.get_current_device()
        self._stream = dev.get_current_stream

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
