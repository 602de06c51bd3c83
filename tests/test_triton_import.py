"""jitkern.triton_import: Triton imported without its entry-point scan only where that scan could find
nothing but Triton's in-tree backends; anything else is left to Triton."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from jitkern import dists, triton_import

REPO = Path(__file__).resolve().parent.parent


def _dist(site: Path, name: str, text: str) -> None:
    d = site / f"{name}-1.0.dist-info"
    d.mkdir(parents=True)
    (d / "entry_points.txt").write_text(text)


def test_declared_backends_reads_every_distribution(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    _dist(a, "triton", "[console_scripts]\nproton = x:y\n\n[triton.backends]\namd = triton.backends.amd\n"
                       "nvidia = triton.backends.nvidia\n")
    _dist(b, "other", "# comment\n[jitkern.ops]\nfoo = bar:SPEC\n")
    (b / "not-a-dist").mkdir()
    monkeypatch.setattr(sys, "path", [str(a), str(b), str(tmp_path / "missing")])
    dists.forget()
    assert triton_import.declared_backends() == {"amd": "triton.backends.amd", "nvidia": "triton.backends.nvidia"}
    _dist(b, "plugin", "[triton.backends]\nmychip = mychip_backend\n")
    assert triton_import.declared_backends() == {"amd": "triton.backends.amd", "nvidia": "triton.backends.nvidia"}
    dists.forget()  # read once per sys.path: a package installed meanwhile is seen after forget()
    assert triton_import.declared_backends()["mychip"] == "mychip_backend"
    _dist(tmp_path / "c", "triton", "[triton.backends]\namd = elsewhere.amd\n")  # a second, differing triton
    monkeypatch.setattr(sys, "path", [str(a), str(tmp_path / "c")])
    assert triton_import.declared_backends() is None
    zipped = tmp_path / "z.zip"
    zipped.write_bytes(b"PK")
    monkeypatch.setattr(sys, "path", [str(a), str(zipped)])
    assert triton_import.declared_backends() is None  # a zip: only importlib.metadata can tell


def test_installed_triton_declares_exactly_its_in_tree_backends():
    assert triton_import.in_tree_backends_suffice()


CHILD = r"""
import json, os, sys
from jitkern import dists, triton_import
fast = triton_import.in_tree_backends_suffice()
try:
    triton = triton_import.ensure_imported()
except Exception as e:
    print(json.dumps({"fast": fast, "error": f"{type(e).__name__}: {e}"}))
    raise SystemExit(0)
import triton.backends
print(json.dumps({"fast": fast, "backends": sorted(triton.backends.backends), "env": os.environ.get("TRITON_BACKENDS_IN_TREE"),
                  "again": triton_import.ensure_imported() is triton}))
"""


def _child(extra_path=None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_BACKENDS_IN_TREE"}
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (REPO, extra_path) if p)
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_import_finds_the_same_backends_and_leaves_the_environment_alone():
    import triton.backends

    out = _child()
    assert out["fast"] is True and out["again"] is True
    assert out["backends"] == sorted(triton.backends.backends)  # what this process's own discovery found
    assert out["env"] is None


def test_an_out_of_tree_backend_is_left_to_tritons_discovery(tmp_path):
    """A plugin declaring a backend: Triton's own entry-point discovery runs and finds it (here it
    cannot be imported, so Triton's import fails exactly as a plain ``import triton`` does)."""
    _dist(tmp_path, "mychip_plugin", "[triton.backends]\nmychip = mychip_backend\n")
    out = _child(tmp_path)
    assert out["fast"] is False
    assert "mychip_backend" in out["error"]


THREADS_CHILD = r"""
import threading, time
from jitkern import triton_import
errors = []

def worker(delay):
    time.sleep(delay)  # arrivals spread over the first import (about 0.2 s), as a pool's workers start
    try:
        triton_import.ensure_imported()
        from triton.backends.compiler import GPUTarget  # what a build worker does next
        from triton.compiler import ASTSource
    except Exception as e:
        errors.append(f"{type(e).__name__}: {e}")

ts = [threading.Thread(target=worker, args=(i * 0.01,)) for i in range(24)]
for t in ts:
    t.start()
for t in ts:
    t.join()
print(errors or "ok")
"""


def test_threads_importing_triton_at_once_each_get_the_whole_module():
    """Build workers (threads) that import Triton at the same time in a process that has not imported
    it yet: none may see the partly initialised module (tune_gemm's parallel precompile did)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_BACKENDS_IN_TREE"}
    env["PYTHONPATH"] = str(REPO)
    for _ in range(3):
        r = subprocess.run([sys.executable, "-c", THREADS_CHILD], capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "ok"
