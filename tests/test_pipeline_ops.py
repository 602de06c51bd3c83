"""Third-party ops get every guarantee from the pipeline (real cross-compiles for gfx942/sm_90):
arch rules and env overrides, over-budget tiles skipped, a C++ config through the one kernel entry
point; prebuilt layers serve without compiling or rendering; a planted wrong-arch entry is caught."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import jitkern
from jitkern import constraints
from jitkern.cache import MANIFEST, Layer
from jitkern.status import REJECTED

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))
import tut_ops  # noqa: E402


def test_third_party_op_gets_rules_overrides_and_budget_fallback(monkeypatch, cache_dir):
    """Selected as for gfx942 (64 KiB LDS), run in the interpreter: a rule caps block_m at 64, an
    override sets block_n=64, and the 64x64x256 fp32 tile (over gfx942's LDS) is compiled for gfx942,
    rejected and skipped; the 32x64 tile runs and matches torch."""
    monkeypatch.setattr(constraints, "RULES", list(constraints.RULES))
    constraints.add_rules(constraints.Rule("*", "tut_matmul", "block_m", "test cap", max=64))
    monkeypatch.setenv("JITKERN_ARCH", "gfx942")
    monkeypatch.setenv("JITKERN_TUT_MATMUL_BLOCK_N", "64")
    a, b = torch.randn(40, 48), torch.randn(48, 70)
    out = tut_ops.tut_matmul(a, b)
    torch.testing.assert_close(out, a @ b, atol=1e-4, rtol=1e-4)
    route = jitkern.dispatcher(tut_ops.MATMUL).route_for(a, b, out)
    chosen = [c for c in route.candidates if c.name == route.active]
    assert route.active == "triton" and len(route.candidates) == 3  # 128-row tile dropped by the rule
    tiles = [c.launches[0].config.p for c in route.candidates]
    assert all(t["block_n"] == 64 and t["block_m"] <= 64 for t in tiles)
    metas = [json.loads(p.read_text()) for p in cache_dir.rglob("entry.json")]
    rejected = [m for m in metas if m.get("status") == REJECTED]
    assert [(m["arch"], m["params"]["block_k"]) for m in rejected] == [("gfx942", 256)]
    assert rejected[0]["resources"]["shared_bytes"] > 64 * 1024
    # the route skipped the rejected candidate and ran the first that fits: 32x64x32
    slots = route._slots
    assert slots[0].error is not None and isinstance(slots[0].error, jitkern.OverBudgetError)
    assert slots[1].proven and slots[1].cand.launches[0].config.p["block_m"] == 32
    assert chosen


def test_override_for_an_op_that_does_not_choose_tiles_through_the_framework_is_loud(monkeypatch):
    monkeypatch.setenv("JITKERN_RMS_NORM_NUM_WARPS", "3")
    with pytest.raises(jitkern.ConfigError, match="JITKERN_RMS_NORM_NUM_WARPS"):
        jitkern.ops.rms_norm(torch.randn(2, 64), torch.ones(64))


def test_cpp_config_through_the_one_kernel_entry_point(cache_dir):
    x = torch.linspace(-3, 3, 300)
    want = x * 2 + 1
    tut_ops.tut_cpp_scale(x)
    assert torch.equal(x, want)
    k = jitkern.runtime.kernel(tut_ops.CPP_SCALE, jitkern.Config.make("good", block=128, tag="tut"), x.device)
    assert k is jitkern.runtime.kernel(tut_ops.CPP_SCALE, jitkern.Config.make("good", block=128, tag="tut"), x.device)
    assert jitkern.stats()["compiler_runs"] == 1


def _cli(*args, cache, **env):
    full = {**os.environ, "JITKERN_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, "-m", "jitkern", *args], env=full, capture_output=True, text=True,
                          timeout=600)


def _plant(entry: Path, name: str, data: bytes):
    """Replace an entry's file and rewrite its manifest so the checksums agree (what a copied or
    hand-edited entry looks like)."""
    for p in (entry, *entry.iterdir()):
        p.chmod(p.stat().st_mode | 0o200)
    (entry / name).write_bytes(data)
    man = json.loads((entry / MANIFEST).read_text())
    man["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (entry / MANIFEST).write_text(json.dumps(man))


def test_planted_wrong_arch_binary_is_reported_by_verify_and_rebuilt_by_prebuild(tmp_path):
    sm90, amd = tmp_path / "sm90", tmp_path / "amd"
    for arch, where in (("sm_90", sm90), ("gfx942", amd)):
        r = _cli("prebuild", "--arch", arch, "--op", "rms_norm", "--limit", "1", cache=where)
        assert r.returncode == 0, r.stderr
    victim = next((Layer(sm90).root / "entries").glob("*/*"))
    hsaco = next((Layer(amd).root / "entries").glob("*/*/kernel.hsaco")).read_bytes()
    _plant(victim, "kernel.cubin", hsaco)
    r = _cli("cache", "verify", cache=sm90)
    assert r.returncode != 0 and victim.name[:12] in r.stdout + r.stderr and "gfx942" in r.stdout + r.stderr
    _plant(victim, "kernel.cubin", hsaco)  # verify may have reported it only; plant again to be sure
    r = _cli("prebuild", "--arch", "sm_90", "--op", "rms_norm", "--limit", "1", cache=sm90)
    assert r.returncode == 0, r.stderr
    assert "1 built" in r.stdout, r.stdout  # not "cached": the planted entry was discarded and rebuilt
    cubin = (Layer(sm90).entry_dir(victim.name) / "kernel.cubin").read_bytes()
    assert cubin[18] == 190  # EM_CUDA again


PREBUILT_RUN = """
import json, torch, jitkern
x = torch.randn(3, 256, dtype=torch.bfloat16)
y = jitkern.ops.rms_norm(x, torch.ones(256, dtype=torch.bfloat16))
torch.testing.assert_close(y, jitkern.get_op("rms_norm").reference(x, torch.ones(256, dtype=torch.bfloat16)))
print(json.dumps(jitkern.stats()))
"""


def test_prebuilt_read_only_layer_compiles_and_renders_nothing(tmp_path):
    built, fresh = tmp_path / "image-layer", tmp_path / "user"
    r = _cli("prebuild", "--arch", "cpu", "--op", "rms_norm", "--limit", "1", cache=built)
    assert r.returncode == 0, r.stderr
    assert list((Layer(built).root / "index").glob("*/*.json")), "prebuild wrote no plan index"
    subprocess.run(["chmod", "-R", "a-w", str(built)], check=True)
    try:
        env = {**os.environ, "JITKERN_CACHE_DIR": os.pathsep.join([str(fresh), str(built)]), "PYTHONPATH": str(REPO),
               "TRITON_INTERPRET": "1"}
        run = subprocess.run([sys.executable, "-c", PREBUILT_RUN], env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        stats = json.loads(run.stdout.strip().splitlines()[-1])
        assert stats["compiles"] == 0 and stats["renders"] == 0 and stats["disk_hits"] == 1, stats
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(built)], check=True)
        shutil.rmtree(built, ignore_errors=True)
