"""A cache shipped as a Python wheel: ``jitkern cache export --wheel DIST_NAME --version V FILE_OR_DIR``.

The wheel holds one package, ``<dist_name as an identifier>``, with a read-only cache layer under
``layer/v<N>/entries/`` (every sound entry of every configured layer, with its manifest and, when
signed, its ``signature.json``) and a function ``layer()`` returning that directory, advertised through
the ``jitkern.cache_layers`` entry-point group. Once installed, every jitkern process reads the layer
after the user's layers (``jitkern.cache.installed_layers``) and never writes, stamps or evicts it;
``jitkern doctor`` and ``jitkern cache stats`` list it. A layer that must be trusted can be checked
with ``JITKERN_CACHE_VERIFY_KEY``: export with ``--sign-key`` to sign every entry.

The wheel is built by the standard ``build`` frontend with the ``hatchling`` backend (``pip install
'jitkern[wheel]'``), from a generated project directory, without build isolation (nothing is
downloaded). It declares no dependencies: the layer is data, read by whatever jitkern is installed
(a layer of another cache format version is simply not found by it).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from . import __version__, signing
from .cache import ENTRY_POINT_GROUP, Store, read_meta, sound_entries
from .errors import ConfigError
from .key import FORMAT_VERSION

_DIST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")  # PEP 508 project names
_VERSION = re.compile(r"^\d+(\.\d+)*((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?(\+[A-Za-z0-9.]+)?$")  # PEP 440 (public)


def import_name(dist_name: str) -> str:
    """The package name a distribution's layer lives under (``my-cache.sm90`` -> ``my_cache_sm90``)."""
    name = re.sub(r"[^A-Za-z0-9]+", "_", dist_name).strip("_").lower()
    return name if name and not name[0].isdigit() else f"jitkern_cache_{name}"


def _pyproject(dist: str, version: str, pkg: str, summary: str) -> str:
    return f"""[build-system]
requires = ["hatchling>=1.18"]
build-backend = "hatchling.build"

[project]
name = {json.dumps(dist)}
version = {json.dumps(version)}
description = {json.dumps(summary)}
requires-python = ">=3.8"

[project.entry-points.{json.dumps(ENTRY_POINT_GROUP)}]
{pkg} = "{pkg}:layer"

[tool.hatch.build.targets.wheel]
packages = [{json.dumps(pkg)}]
"""


def _init_py(summary: str) -> str:
    return f'''"""{summary}

Made by ``jitkern cache export --wheel`` (jitkern {__version__}). jitkern finds this layer through the
``{ENTRY_POINT_GROUP}`` entry point, reads it after the user's cache layers and never writes it.
"""
import os


def layer():
    """The read-only jitkern cache layer this package installs."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "layer")
'''


def _builder(srcdir: Path):
    try:
        import build
    except ImportError:
        raise ConfigError("building a cache wheel needs the 'build' frontend and 'hatchling': "
                          "pip install 'jitkern[wheel]'") from None
    builder = build.ProjectBuilder(srcdir)
    missing = builder.check_dependencies("wheel")
    if missing:
        need = sorted(" ".join(sorted(x)) if not isinstance(x, str) else x for x in missing)
        raise ConfigError(f"building a cache wheel needs {', '.join(need)} installed: pip install 'jitkern[wheel]'")
    return builder


def export_wheel(store: Store, dist_name: str, version: str, out: str | os.PathLike, sign_key=None) -> dict[str, Any]:
    """Build a wheel of every sound entry of ``store`` (signed per entry with ``sign_key`` if given).
    ``out``: a directory (the wheel gets its standard name there) or a ``.whl`` path."""
    if not _DIST.match(dist_name or ""):
        raise ConfigError(f"--wheel {dist_name!r} is not a valid distribution name (letters, digits, '.', '-', "
                          "'_'; starting and ending with a letter or digit), e.g. my-kernels-cache-sm90")
    if not _VERSION.match(version or ""):
        raise ConfigError(f"--version {version!r} is not a PEP 440 version, e.g. 1.0 or 2026.12.1")
    pkg = import_name(dist_name)
    out = Path(out)
    skipped: list = []
    with tempfile.TemporaryDirectory(prefix="jitkern-wheel-") as tmp:
        src = Path(tmp) / "src"
        layer_root = src / pkg / "layer" / f"v{FORMAT_VERSION}" / "entries"
        n, arches, ops = 0, set(), set()
        for key, files in sound_entries(store, skipped, sign_key):
            d = layer_root / key[:2] / key
            d.mkdir(parents=True)
            for name, data in files.items():
                (d / name).write_bytes(data)
                os.chmod(d / name, 0o644)
            meta = read_meta(d)
            arches.add(str(meta.get("arch", "?")))
            ops.add(str(meta.get("op", "?")))
            n += 1
        if n == 0:
            raise ConfigError(f"nothing to export: no sound entries in {[str(x.base) for x in store.layers]}")
        summary = (f"jitkern kernel cache: {n} entries ({', '.join(sorted(ops))}) for {', '.join(sorted(arches))}, "
                   f"cache format v{FORMAT_VERSION}")
        (src / pkg / "__init__.py").write_text(_init_py(summary))
        (src / "pyproject.toml").write_text(_pyproject(dist_name, version, pkg, summary))
        built = Path(_builder(src).build("wheel", Path(tmp) / "dist"))
        if out.suffix == ".whl":
            out.parent.mkdir(parents=True, exist_ok=True)
            target = out
        else:
            out.mkdir(parents=True, exist_ok=True)
            target = out / built.name
        shutil.move(str(built), target)
    return {"file": str(target), "dist": dist_name, "version": version, "package": pkg, "entries": n,
            "arches": sorted(arches), "skipped_damaged": skipped,
            "signed_by": None if sign_key is None else signing.key_id(sign_key.public_key())}
