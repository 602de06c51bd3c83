"""The dispatcher's hot path in C, and the CUDA driver calls that load and launch a cached cubin.

``jitkern.dispatch`` decides a call signature once in Python; what a later call with that signature
does -- compute the signature, find its decision, read the tensors' addresses, check their
alignment and the per-call scalars, and launch -- runs in the small CPython extension
``fastcall.c`` beside this file, without a Python frame per step. The decisions stay in the
dispatcher's one memo (the C key is the Python key, tuple for tuple), and every error is still
raised by the Python code that raises it on the slow path: the C side calls back for it.

The same extension loads a cached CUDA binary and launches it with ``cuLaunchKernel`` itself
(``jitkern.launcher``), so a process whose kernels are all cached never imports Triton (about a
fifth of a second) nor builds Triton's per-signature launcher stubs.

The extension is compiled with the machine's C compiler (``cc``, ``gcc`` or ``clang``: what Triton
needs on a GPU machine too) against this Python's headers and kept in a cache layer's ``host/``
folder, named by a hash of the source and the Python ABI, so later processes only load it: from any
configured layer that holds it (``jitkern prebuild`` puts one into the layer it builds, so a
read-only container layer has it), else built into the writable layer, else into a private
directory under the system's temporary directory. Where signed entries are required
(``JITKERN_CACHE_VERIFY_KEY``), a host module is loaded only from the writable layer or built.
``JITKERN_FAST_CALL=0`` keeps the whole hot path in Python (and loading in Triton's driver); a
machine where the extension cannot be built does the same, with one warning.

A second, optional extension, ``torchsig.cpp``, lets the C path read a tensor's shape, strides,
dtype, device and address from its C++ ``TensorImpl`` (a few nanoseconds) instead of through five
Python attributes (about 0.3 us per tensor, most of a call's signature). It is compiled with the
machine's C++ compiler against the installed torch's headers, named by a hash of its source, the
Python ABI and the torch build, and kept beside the first one (``jitkern prebuild`` installs both).
Where it is not built yet, the first process that needs it builds it in a background thread (about
20 s of one core) and switches to it when it loads; until then, and where it cannot be built, the
Python attributes are read (the same facts; only slower). Under ``JITKERN_STRICT`` it is only loaded,
never compiled. Only exact ``torch.Tensor`` and
``torch.nn.Parameter`` objects are read this way: a subclass can change what Python sees.
"""
from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sysconfig
import tempfile
import threading
from pathlib import Path

from . import settings, strict
from .cache import default_store
from .logs import log, warn_once

SOURCE = Path(__file__).with_name("fastcall.c")
NAME = "jitkern_fastcall"
TORCH_SOURCE = Path(__file__).with_name("torchsig.cpp")
TORCH_NAME = "jitkern_torchsig"
SUBDIR = "host"
_lock = threading.Lock()
_module = None
_tried = False
_torch_state = None  # None: not asked yet; "building"; "ready"; "unavailable"
_torch_done = threading.Event()


def enabled() -> bool:
    """Whether the C hot path is wanted (``JITKERN_FAST_CALL``, default on)."""
    return settings.get("fast_call")


def module():
    """The compiled extension, or None where it is off or cannot be built (warned once; the Python
    hot path is used)."""
    global _module, _tried
    if not enabled():
        return None
    if _tried:
        return _module
    with _lock:
        if not _tried:
            try:
                _module = _load_or_build(artifact_name(), _build)
            except Exception as e:  # no C compiler or Python headers, no writable cache layer
                first = str(e).strip().splitlines()
                warn_once(("fastcall",), "jitkern: the C dispatch path could not be built (%s: %s); launching "
                          "through the Python path and Triton's launcher (a few microseconds more per call)",
                          type(e).__name__, first[-1] if first else "")
            _tried = True
    return _module


def artifact_name() -> str:
    """The file name of the built extension for this source and this Python."""
    return _artifact(NAME, SOURCE, b"")


def torch_artifact_name() -> str:
    """The file name of the built ``torchsig`` extension for its source, this Python and this torch."""
    import torch

    build = f"{torch.__version__}|{getattr(torch.version, 'git_version', '')}|{torch._C._GLIBCXX_USE_CXX11_ABI}"
    return _artifact(TORCH_NAME, TORCH_SOURCE, build.encode())


def _artifact(name: str, source: Path, extra: bytes) -> str:
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    digest = hashlib.sha256(source.read_bytes() + suffix.encode() + extra).hexdigest()[:20]
    return f"{name}-{digest}{suffix}"


def use_torch_signatures(wait: bool = False) -> bool:
    """Make the C path read tensors through ``torchsig`` (see the module doc): load it where it is
    built, else build it in a background thread (``wait``: until it is loaded or has failed).
    Returns whether it is in use now. Called by the dispatcher when an op first takes the C path."""
    global _torch_state
    fc = module()
    if fc is None:
        return False
    with _lock:
        start = _torch_state is None
        if start:
            _torch_state = "building"
            _torch_done.clear()
    if start:
        if wait:
            _torch_build(fc)
        else:
            threading.Thread(target=_torch_build, args=(fc,), name="jitkern-torchsig", daemon=True).start()
    elif wait:
        _torch_done.wait()
    return _torch_state == "ready"


def _torch_build(fc) -> None:
    global _torch_state
    try:
        build = _build_torch if strict.mode() is None else _not_in_strict_mode
        mod = _load_or_build(torch_artifact_name(), build)
        fc.use_torch(mod.api)
        _torch_state = "ready"
        log.debug("jitkern: the C hot path reads tensors through %s", TORCH_NAME)
    except Exception as e:  # noqa: BLE001  (no C++ compiler or torch headers: the Python attributes serve)
        _torch_state = "unavailable"
        first = str(e).strip().splitlines()
        warn_once(("torchsig",), "jitkern: the C hot path reads tensors through Python attributes (its C++ "
                  "reader could not be built: %s: %s; about 0.3 us more per tensor argument)", type(e).__name__,
                  first[-1] if first else "")
    finally:
        _torch_done.set()


def _load_or_build(name: str, build):
    """The extension file ``name`` loaded from the first configured layer that holds it, else
    obtained (``build``) into the writable layer or this user's private directory."""
    store = default_store()
    write = store.write_layer
    signed_only = bool(settings.get("cache_verify_key"))
    for layer in store.layers:
        if signed_only and layer is not write:
            continue
        path = layer.root / SUBDIR / name
        if path.is_file():
            try:
                layer.check_secure()
            except Exception as e:  # noqa: BLE001  (an insecure layer: not a source of code to load)
                log.debug("jitkern: %s not loaded (%s)", path, e)
                continue
            return _load(path)
    if write is not None:
        write.check_secure()
        path = write.root / SUBDIR / name
    else:  # no writable layer (a read-only container layer without one): built once per machine and user
        path = _private_dir() / name
    _obtain(path, build)
    return _load(path)


def install(layer) -> Path:
    """Build the extension into ``layer``'s ``host/`` folder (prebuild: a read-only layer made from it
    then carries it); returns its path. Raises where it cannot be built."""
    path = layer.root / SUBDIR / artifact_name()
    _obtain(path, _build)
    return path


def install_torch(layer) -> Path:
    """The same for the ``torchsig`` extension (this torch's build)."""
    path = layer.root / SUBDIR / torch_artifact_name()
    _obtain(path, _build_torch)
    return path


def _obtain(path: Path, build) -> None:
    """Put the built extension at ``path`` (if it is not there): a copy of this machine's build in
    the user's private directory (built there first if needed), so that cache layers and test
    caches do not compile it again. A complete file appears at once."""
    if path.is_file():
        return
    try:
        built = _private_dir() / path.name
    except OSError:  # no private temporary directory: built in place
        build(path)
        return
    if not built.is_file():
        build(built)
    if built != path:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".jitkern-host-", delete=False) as f:
            f.write(built.read_bytes())
        os.chmod(f.name, 0o644)
        os.replace(f.name, path)


def _private_dir() -> Path:
    d = Path(tempfile.gettempdir()) / f"jitkern-host-{os.getuid()}"
    d.mkdir(mode=0o700, exist_ok=True)
    st = d.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise PermissionError(f"{d} is not a private directory of this user")
    return d


def _load(path: Path):
    name = path.name.split("-", 1)[0]  # the module's own name (its PyInit_ function)
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def _compiler(names=("cc", "gcc", "clang")) -> str:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError(f"no compiler ({', '.join(names)}) on PATH")


def _build(path: Path) -> None:
    """Compile the extension into ``path`` (a complete file appears at once: built aside, renamed)."""
    include = sysconfig.get_paths()["include"]
    _compile(path, [_compiler(), "-O2", "-shared", "-fPIC", f"-I{include}", str(SOURCE), "-ldl"])


def _build_torch(path: Path) -> None:
    """Compile ``torchsig.cpp`` against the installed torch (its headers, C++ ABI and ``libc10``)."""
    import torch

    root = Path(torch.__file__).parent
    include, lib = root / "include", root / "lib"
    if not (include / "torch" / "csrc" / "autograd" / "python_variable.h").is_file():
        raise FileNotFoundError(f"this torch has no C++ headers under {include}")
    cmd = [_compiler(("c++", "g++", "clang++")), "-O2", "-shared", "-fPIC", "-w",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           f"-I{sysconfig.get_paths()['include']}", f"-I{include}", f"-I{include / 'torch/csrc/api/include'}",
           str(TORCH_SOURCE), f"-L{lib}", "-lc10", f"-Wl,-rpath,{lib}"]
    try:  # torch 2.10+ headers are C++20; older compilers know only C++17
        _compile(path, [*cmd, "-std=c++20"])
    except RuntimeError:
        _compile(path, [*cmd, "-std=c++17"])


def _not_in_strict_mode(path: Path) -> None:
    raise RuntimeError(f"JITKERN_STRICT is set, so {path.name} is not compiled at run time (jitkern prebuild "
                       f"puts it into the layer it builds)")


def _compile(path: Path, cmd: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="jitkern-host-", dir=path.parent) as d:
        out = Path(d) / path.name
        cmd = [*cmd, "-o", str(out)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr.strip()}")
        os.chmod(out, 0o644)
        os.replace(out, path)
    log.debug("jitkern: built %s", path)


__all__ = ["artifact_name", "enabled", "install", "install_torch", "module", "torch_artifact_name",
           "use_torch_signatures"]
