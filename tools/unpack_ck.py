"""Unpack Composable Kernel's headers from an ``amd-aiter`` wheel into a directory of your own.

The ``amd-aiter`` wheel on PyPI (py3-none-any) carries CK's source tree under
``aiter_meta/3rdparty/composable_kernel``. jitkern needs only its ``include/`` directory (plus the root
``CMakeLists.txt``, which states CK's version, and the licence), not aiter itself or its dependencies::

    python3 -m pip download --no-deps amd-aiter==0.1.7.post2.dev18 -d /tmp/aiter
    python3 tools/unpack_ck.py /tmp/aiter/amd_aiter-*.whl ~/.local/share/jitkern/ck
    export JITKERN_CK_DIR=~/.local/share/jitkern/ck

Nothing is generated here: jitkern writes ``ck/config.h``/``ck/version.h`` for each build into the
build's own directory (docs/amd.md).
"""
from __future__ import annotations

import sys
import zipfile
from pathlib import Path

PREFIX = "aiter_meta/3rdparty/composable_kernel/"
KEEP = ("include/", "CMakeLists.txt", "LICENSE")


def unpack(wheel: str, dest: str) -> int:
    out = Path(dest)
    n = 0
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            if not info.filename.startswith(PREFIX) or info.is_dir():
                continue
            rel = info.filename[len(PREFIX):]
            if not rel.startswith(KEEP) or ".." in Path(rel).parts:
                continue
            target = out / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(info))
            n += 1
    if not (out / "include" / "ck" / "ck.hpp").is_file():
        raise SystemExit(f"{wheel} holds no {PREFIX}include/ck/ck.hpp: not a wheel that carries CK")
    return n


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python3 tools/unpack_ck.py AMD_AITER_WHEEL DEST_DIR")
    print(f"unpacked {unpack(sys.argv[1], sys.argv[2])} CK files into {sys.argv[2]}")
