"""HIP C++ variants (kind "hip"): hipcc --genco (with CK headers when the source includes them), launched through HIP.

The machinery is shared by every C++ kind and lives in jitkern.builders.cpp.
"""
from .cpp import HIP as _toolchain
from .cpp import load as _load

kind = _toolchain.kind
fingerprint = _toolchain.fingerprint
probe = _toolchain.probe
build = _toolchain.build
load = _load
