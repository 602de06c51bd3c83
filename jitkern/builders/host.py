"""Host C++ variants (kind "cpp"): the system C++ compiler into a shared library called through ctypes on CPU tensors.

The machinery is shared by every C++ kind and lives in jitkern.builders.cpp.
"""
from .cpp import HOST as _toolchain
from .cpp import load as _load

kind = _toolchain.kind
fingerprint = _toolchain.fingerprint
probe = _toolchain.probe
build = _toolchain.build
load = _load
