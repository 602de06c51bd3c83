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

from . import settings
from .cache import default_store
from .logs import log, warn_once

SOURCE = Path(__file__).with_name("fastcall.c")
NAME = "jitkern_fastcall"
SUBDIR = "host"
_lock = threading.Lock()
_module = None
_tried = False


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
                _module = _load_or_build()
            except Exception as e:  # no C compiler or Python headers, no writable cache layer
                first = str(e).strip().splitlines()
                warn_once(("fastcall",), "jitkern: the C dispatch path could not be built (%s: %s); launching "
                          "through the Python path and Triton's launcher (a few microseconds more per call)",
                          type(e).__name__, first[-1] if first else "")
            _tried = True
    return _module


def artifact_name() -> str:
    """The file name of the built extension for this source and this Python."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    digest = hashlib.sha256(SOURCE.read_bytes() + suffix.encode()).hexdigest()[:20]
    return f"{NAME}-{digest}{suffix}"


def _load_or_build():
    store, name = default_store(), artifact_name()
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
    if not path.is_file():
        _build(path)
    return _load(path)


def install(layer) -> Path:
    """Build the extension into ``layer``'s ``host/`` folder (prebuild: a read-only layer made from it
    then carries it); returns its path. Raises where it cannot be built."""
    path = layer.root / SUBDIR / artifact_name()
    if not path.is_file():
        _build(path)
    return path


def _private_dir() -> Path:
    d = Path(tempfile.gettempdir()) / f"jitkern-host-{os.getuid()}"
    d.mkdir(mode=0o700, exist_ok=True)
    st = d.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise PermissionError(f"{d} is not a private directory of this user")
    return d


def _load(path: Path):
    loader = importlib.machinery.ExtensionFileLoader(NAME, str(path))
    spec = importlib.util.spec_from_file_location(NAME, str(path), loader=loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def _compiler() -> str:
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError("no C compiler (cc, gcc or clang) on PATH")


def _build(path: Path) -> None:
    """Compile the extension into ``path`` (a complete file appears at once: built aside, renamed)."""
    include = sysconfig.get_paths()["include"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="jitkern-fastcall-", dir=path.parent) as d:
        out = Path(d) / path.name
        cmd = [_compiler(), "-O2", "-shared", "-fPIC", f"-I{include}", str(SOURCE), "-o", str(out), "-ldl"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr.strip()}")
        os.chmod(out, 0o644)
        os.replace(out, path)
    log.debug("jitkern: built the C dispatch path into %s", path)


__all__ = ["artifact_name", "enabled", "install", "module"]
