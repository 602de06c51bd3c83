"""Composable Kernel (CK) headers: where they are, which version, and the two headers CK's build makes.

CK is a header library for HIP kernels. jitkern looks for it, first match wins:

1. ``JITKERN_CK_DIR``, then ``CK_DIR``: a CK source or install root (a directory with
   ``include/ck/ck.hpp``). ``JITKERN_CK_DIR=none`` means "no CK" (build as a CK-free install would;
   seed 002), whatever else is installed;
2. an installed ``amd-aiter`` package (its wheel carries CK under
   ``aiter_meta/3rdparty/composable_kernel``), found through its distribution metadata: nothing of
   it is imported;
3. a ROCm install (``$ROCM_PATH``, else ``/opt/rocm``) with ``include/ck/ck.hpp``.

A CK source tree (a git checkout, or the copy inside ``amd-aiter``) has ``ck/config.h.in`` and
``ck/version.h.in`` where an installed CK has ``config.h``/``version.h``: CMake writes them at
configure time. ``generate(ck, arch, dest)`` writes both into ``dest`` (a directory jitkern owns:
the build's temporary directory), with the settings CK's own CMakeLists chooses for that GPU target;
nothing is ever written into CK's directory or into site-packages.

Identity (part of every HIP key, through ``fingerprint``): the root, CK's version (``version.h``, or
``set(version ...)`` in the root ``CMakeLists.txt``), where it was found, and the number and total size
of its header files, so a different copy of the same version still changes the key.
"""
from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import settings

#: The distribution that ships CK's headers on PyPI, and where they lie inside it.
AITER_DIST = "amd-aiter"
AITER_CK = "aiter_meta/3rdparty/composable_kernel"
#: ``JITKERN_CK_DIR`` value that switches CK off.
OFF = "none"


def rocm_path() -> Path:
    """ROCm's install root: ``ROCM_PATH`` (ROCm's own variable, not jitkern's), else ``/opt/rocm``."""
    return Path(os.environ.get("ROCM_PATH", "").strip() or "/opt/rocm")


@dataclass(frozen=True)
class CK:
    root: Path
    version: str
    origin: str  # "JITKERN_CK_DIR", "CK_DIR", "amd-aiter 0.1.7...", "ROCm (/opt/rocm)"

    @property
    def include(self) -> Path:
        return self.root / "include"

    @property
    def needs_generated_headers(self) -> bool:
        ck = self.include / "ck"
        return not (ck / "config.h").is_file() or not (ck / "version.h").is_file()

    def describe(self) -> str:
        return f"CK {self.version} at {self.root} (from {self.origin})"


def _is_root(p: Path) -> bool:
    return (p / "include" / "ck" / "ck.hpp").is_file()


def find() -> tuple[CK | None, str]:
    """``(ck, "")`` where CK is found, else ``(None, why not)``: the reason a CK-dependent variant is
    unavailable, naming what was looked at and what to set."""
    ck_dir = os.environ.get("CK_DIR", "").strip()  # CK's own variable, not jitkern's
    for name, v in (("JITKERN_CK_DIR", settings.get("ck_dir") or ""), ("CK_DIR", ck_dir)):
        if not v:
            continue
        if v.lower() == OFF and name == "JITKERN_CK_DIR":
            return None, "CK headers not found: JITKERN_CK_DIR=none switches CK off"
        p = Path(v).expanduser()
        if not _is_root(p):
            return None, (f"CK headers not found: {name}={v} has no include/ck/ck.hpp (point it at a Composable "
                          f"Kernel root)")
        return _make(p.resolve(), name), ""
    aiter = _aiter_root()
    if aiter is not None:
        return aiter, ""
    rocm = rocm_path()
    if _is_root(rocm):
        return _make(rocm.resolve(), f"ROCm ({rocm})"), ""
    return None, ("CK headers not found (set JITKERN_CK_DIR or CK_DIR to a Composable Kernel root, or install "
                  "the amd-aiter wheel, which carries them; see docs/amd.md)")


def _aiter_root() -> CK | None:
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(AITER_DIST)
    except PackageNotFoundError:
        return None
    p = Path(str(dist.locate_file(AITER_CK)))
    if not _is_root(p):
        return None
    return _make(p.resolve(), f"{AITER_DIST} {dist.version}")


def _make(root: Path, origin: str) -> CK:
    return CK(root, version(root), origin)


def version(root: Path) -> str:
    """CK's version: ``CK_VERSION_MAJOR.MINOR.PATCH`` of ``ck/version.h``, else the root CMakeLists'
    ``set(version X.Y.Z)``, else ``unknown``."""
    vh = root / "include" / "ck" / "version.h"
    if vh.is_file():
        nums = dict(re.findall(r"#define\s+CK_VERSION_(MAJOR|MINOR|PATCH)\s+(\d+)", vh.read_text(errors="replace")))
        if nums:
            return ".".join(nums.get(k, "0") for k in ("MAJOR", "MINOR", "PATCH"))
    cml = root / "CMakeLists.txt"
    if cml.is_file():
        m = re.search(r"^\s*set\s*\(\s*version\s+([0-9][0-9A-Za-z.\-]*)\s*\)", cml.read_text(errors="replace"),
                      re.MULTILINE)
        if m:
            return m.group(1)
    return "unknown"


@functools.lru_cache(maxsize=None)
def _stamp(include: str, mtime_ns: int) -> tuple[int, int]:
    n = size = 0
    for dirpath, _, names in os.walk(Path(include) / "ck"):
        for name in names:
            try:
                size += os.stat(os.path.join(dirpath, name)).st_size
                n += 1
            except OSError:
                pass
    return n, size


def fingerprint(ck: CK | None) -> dict[str, Any] | None:
    """What identifies ``ck`` in a key (None: no CK)."""
    if ck is None:
        return None
    inc = ck.include / "ck"
    n, size = _stamp(str(ck.include), inc.stat().st_mtime_ns)
    return {"root": str(ck.root), "version": ck.version, "origin": ck.origin, "header_files": n,
            "header_bytes": size, "generated": ck.needs_generated_headers}


def needs_ck(source: str) -> bool:
    """A HIP source needs CK when it includes one of CK's headers."""
    return re.search(r"^\s*#\s*include\s*[<\"]ck(_tile)?/", source, re.MULTILINE) is not None


# ---- the headers CK's CMake would write -------------------------------------------------------------
def cmake_settings(arch_name: str) -> dict[str, str]:
    """The ``config.h`` settings CK's CMakeLists picks when ``arch_name`` is its only GPU target."""
    s = {"CK_ENABLE_ALL_DTYPES": "ON"}
    if arch_name.startswith(("gfx9", "gfx11", "gfx12")):
        s["CK_USE_XDL"] = "ON"
    if arch_name.startswith(("gfx94", "gfx95")):
        s["CK_USE_GFX94"] = "ON"
    if arch_name.startswith(("gfx90a", "gfx94")):
        s["CK_USE_FNUZ_FP8"] = "ON"
    if arch_name.startswith(("gfx950", "gfx12")):
        s["CK_USE_OCP_FP8"] = "ON"
    if arch_name.startswith("gfx950"):
        s["CK_USE_NATIVE_MX_SUPPORT"] = "ON"
    return s


def configure(template: str, values: dict[str, str]) -> str:
    """CMake's ``configure_file``: ``#cmakedefine VAR ...`` becomes ``#define VAR ...`` when ``VAR`` is set
    (else a comment), and ``@VAR@`` is replaced by its value (empty when unset)."""
    def cmakedefine(m):
        name, rest = m.group(1), m.group(2)
        if values.get(name, "") in ("", "OFF", "0", "FALSE"):
            return f"/* #undef {name} */"
        return f"#define {name}{rest}"

    text = re.sub(r"^#cmakedefine\s+(\w+)(.*)$", cmakedefine, template, flags=re.MULTILINE)
    return re.sub(r"@(\w+)@", lambda m: values.get(m.group(1), ""), text)


def generated_headers(ck: CK, arch_name: str) -> dict[str, str]:
    """``{"ck/config.h": text, "ck/version.h": text}`` for a CK source tree (empty for an installed CK)."""
    if not ck.needs_generated_headers:
        return {}
    parts = (ck.version.split(".") + ["0", "0", "0"])[:3]
    values = {**cmake_settings(arch_name), "CMAKE_PROJECT_VERSION": ck.version,
              "CMAKE_PROJECT_VERSION_MAJOR": parts[0], "CMAKE_PROJECT_VERSION_MINOR": parts[1],
              "CMAKE_PROJECT_VERSION_PATCH": parts[2], "COMMIT_ID": ""}
    out = {}
    for name in ("config.h", "version.h"):
        src = ck.include / "ck" / f"{name}.in"
        if src.is_file() and not (ck.include / "ck" / name).is_file():
            out[f"ck/{name}"] = configure(src.read_text(errors="replace"), values)
    return out


def generate(ck: CK, arch_name: str, dest: Path) -> list[Path]:
    """Write ``generated_headers`` under ``dest`` (put ``-I dest`` before CK's include directory)."""
    written = []
    for rel, text in generated_headers(ck, arch_name).items():
        p = dest / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        written.append(p)
    return written


__all__ = ["CK", "find", "version", "fingerprint", "needs_ck", "generate", "generated_headers", "cmake_settings"]
