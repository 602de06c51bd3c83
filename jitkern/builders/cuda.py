"""CUDA C++ variants (kind "cuda"): nvcc -cubin, loaded and launched through the CUDA driver.

The machinery is shared by every C++ kind and lives in jitkern.builders.cpp.
"""
from .cpp import CUDA as _toolchain
from .cpp import load as _load

kind = _toolchain.kind
fingerprint = _toolchain.fingerprint
probe = _toolchain.probe
build = _toolchain.build
load = _load
