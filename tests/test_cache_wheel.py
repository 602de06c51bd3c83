"""A cache shipped as a wheel (jitkern cache export --wheel): built with the standard `build` frontend
and hatchling from a prebuilt cache, pip-installed into a fresh venv, read there automatically as a
read-only layer after the user's (entry point jitkern.cache_layers), listed, never written, and a
process there compiles nothing."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

from jitkern import cachewheel, signing
from jitkern.cache import Store

REPO = Path(__file__).resolve().parents[1]

PROBE = textwrap.dedent("""
    import json, jitkern
    from jitkern import arch, cache, registry
    from jitkern.build import get_entry
    from jitkern.plan import plan
    from jitkern.doctor import _doctor_cache
    spec, a = registry.get("rms_norm"), arch.get("sm_90")
    got = [get_entry(plan(spec, c, a)) for c in list(spec.configs(a))[:2]]
    print(json.dumps({"jitkern": jitkern.__file__, "how": [h for _, h in got], "paths": [str(e.path) for e, _ in got],
                      "stats": jitkern.stats(), "doctor": [[r["label"], r["text"]] for r in _doctor_cache()["rows"]],
                      "layers": [[str(x.base), x.installed_from, x is cache.default_store().write_layer]
                                 for x in cache.default_store().layers]}))
""")


def _run(cmd, **kw):
    """Run a command outside this checkout (so that ``python -c`` does not import jitkern from it)."""
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=kw.pop("cwd", "/"), **kw)
    assert r.returncode == 0, f"{cmd}: {r.stdout}\n{r.stderr}"
    return r.stdout


def _tree(root: Path) -> dict:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(root.rglob("*"))}


def test_cache_wheel_installs_a_read_only_layer_and_a_fresh_venv_compiles_nothing(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    built = tmp_path / "built"
    # a prebuilt cache: two small rms_norm artifacts for sm_90, cross-compiled on this CPU-only machine
    _run([sys.executable, "-m", "jitkern", "prebuild", "--arch", "sm_90", "--op", "rms_norm", "--limit", "2",
          "--jobs", "1", "--progress", "none", "--cache-dir", str(built)],
         env={**env, "PYTHONPATH": str(REPO), "TRITON_CACHE_DIR": str(tmp_path / "triton")})
    priv, pub = signing.keygen(tmp_path / "fleet")
    r = cachewheel.export_wheel(Store([built], installed=False), "acme-kernels-sm90", "1.0", tmp_path / "dist",
                                signing.load_private(priv))
    wheel = Path(r["file"])
    assert wheel.name == "acme_kernels_sm90-1.0-py3-none-any.whl" and r["entries"] == 2 and r["arches"] == ["sm_90"]
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        eps = z.read("acme_kernels_sm90-1.0.dist-info/entry_points.txt").decode()
    assert "[jitkern.cache_layers]" in eps and "acme_kernels_sm90 = acme_kernels_sm90:layer" in eps
    assert sum(n.endswith("/signature.json") for n in names) == 2 and "acme_kernels_sm90-1.0.dist-info/RECORD" in names

    # a fresh venv that sees the system's torch/triton; jitkern from this tree, then the cache wheel
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    src = tmp_path / "jitkern-src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "build", "dist",
                                                             ".pytest_cache", ".carry_*", "tools", "examples"))
    pip = [str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--disable-pip-version-check"]
    _run(pip + [str(src)], env=env)
    _run(pip + [str(wheel)], env=env)
    site = Path(_run([str(py), "-c", "import acme_kernels_sm90; print(acme_kernels_sm90.layer())"], env=env).strip())
    before = _tree(site)

    user = tmp_path / "user-cache"  # the user's own (empty) layer comes first
    out = json.loads(_run([str(py), "-c", PROBE], env={**env, "JITKERN_CACHE_DIR": str(user),
                                                       "JITKERN_CACHE_VERIFY_KEY": str(pub)}).splitlines()[-1])
    assert out["jitkern"].startswith(str(venv))  # the venv's jitkern, not this checkout
    assert out["how"] == ["cached", "cached"] and out["stats"]["compiles"] == 0, out
    assert all(Path(p).is_relative_to(site) for p in out["paths"])
    assert out["stats"]["signature_refused"] == 0
    assert out["layers"] == [[str(user), None, True], [str(site), "acme-kernels-sm90", False]]
    assert any("installed by acme-kernels-sm90" in row[1] and "2 entries" in row[1] for row in out["doctor"])
    stats = json.loads(_run([str(venv / "bin" / "jitkern"), "cache", "stats", "--json"],
                            env={**env, "JITKERN_CACHE_DIR": str(user)}))
    (mine, installed) = stats["layers"]
    assert installed["installed_from"] == "acme-kernels-sm90" and installed["entries"] == 2
    assert not installed["writable"] and mine["writable"]
    # never written: prune and clear act on the user's layer only
    _run([str(venv / "bin" / "jitkern"), "cache", "prune", "--max-size", "0"],
         env={**env, "JITKERN_CACHE_DIR": str(user)})
    _run([str(venv / "bin" / "jitkern"), "cache", "clear"], env={**env, "JITKERN_CACHE_DIR": str(user)})
    assert _tree(site) == before
