"""The runtime fast path on the CPU: import cost, lazy lookup, per-signature plans that keep validation
on, empty grids, and the plan index that lets a warm process skip Jinja (real subprocesses)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import jitkern
from jitkern import plan as plan_mod, runtime
from jitkern.arch import ARCHES
from jitkern.errors import DTypeError, LayoutError, ShapeError
from jitkern.library import rms_norm as rn
from jitkern.spec import OpSpec

REPO = Path(__file__).resolve().parent.parent


def run_py(code: str, env_extra: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JITKERN_", "TRITON_INTERPRET"))}
    env.update(env_extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


# ---- import and lookup cost ------------------------------------------------------------------------
def test_import_jitkern_is_cheap_and_imports_no_torch(tmp_path):
    code = ("import sys, time, json\nt = time.perf_counter()\nimport jitkern\ndt = time.perf_counter() - t\n"
            "print(json.dumps({'s': dt, 'mods': sorted(m for m in ('torch', 'triton', 'jinja2', 'filelock') "
            "if m in sys.modules)}))")
    runs = []
    for _ in range(3):
        r = run_py(code, {"JITKERN_CACHE_DIR": str(tmp_path / "never")})
        assert r.returncode == 0, r.stderr
        runs.append(json.loads(r.stdout))
    assert all(x["mods"] == [] for x in runs), runs
    assert min(x["s"] for x in runs) < 0.050, runs
    assert not (tmp_path / "never").exists()


def test_op_lookup_compiles_nothing_and_touches_no_disk(tmp_path):
    cache = tmp_path / "cache"
    code = ("import jitkern, jitkern.ops, json\nf = jitkern.ops.rms_norm\nimport torch\n"
            "print(json.dumps({'stats': jitkern.stats(), 'name': f.__name__, "
            "'registered': hasattr(torch.ops.jitkern, 'rms_norm')}))")
    r = run_py(code, {"JITKERN_CACHE_DIR": str(cache), "TRITON_INTERPRET": "1"})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["stats"]["compiles"] == 0 and out["stats"]["disk_hits"] == 0
    assert out["name"] == "rms_norm" and out["registered"]
    assert not cache.exists()


# ---- per-signature plans ---------------------------------------------------------------------------
def test_plan_is_made_once_per_signature_and_results_match_reference():
    norm = jitkern.ops.rms_norm
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 96, generator=g)
    w = torch.randn(96, generator=g)
    d = jitkern.dispatcher(rn.SPEC)
    assert d.signatures == 0
    for _ in range(3):
        torch.testing.assert_close(norm(x, w), rn.reference(x, w), atol=1e-5, rtol=1e-5)
    assert d.signatures == 1 and jitkern.stats()["signatures"] == 1
    # a new signature (row stride 128, 3-D, residual): a new plan each, and still right
    wide = torch.randn(5, 128, generator=g)[:, :96]
    torch.testing.assert_close(norm(wide, w), rn.reference(wide, w), atol=1e-5, rtol=1e-5)
    x3 = torch.randn(2, 3, 96, generator=g)
    r3 = torch.randn(2, 3, 96, generator=g)
    r3_ref = r3.clone()
    torch.testing.assert_close(norm(x3, w, residual=r3), rn.reference(x3, w, residual=r3_ref), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r3, r3_ref)
    assert d.signatures == 3


def test_validation_stays_on_for_a_planned_signature():
    norm = jitkern.ops.rms_norm
    base = torch.randn(4 * 64 + 4)
    w = torch.randn(64)
    norm(base[:256].view(4, 64), w)
    with pytest.raises(LayoutError, match="aligned"):  # same shape, strides and dtype; 4 bytes off
        norm(base[1:257].view(4, 64), w)
    with pytest.raises(DTypeError):
        norm(base[:256].view(4, 64).double(), w)
    with pytest.raises(ShapeError):
        norm(base[:256].view(4, 64), torch.randn(32))
    with pytest.raises(DTypeError, match="torch.Tensor"):
        norm([1.0, 2.0], w)


def test_empty_input_and_zero_grid_launch_nothing(cache_dir):
    norm = jitkern.ops.rms_norm
    x = torch.empty(0, 64)
    out = norm(x, torch.randn(64))
    assert out.shape == (0, 64)
    assert jitkern.stats()["compiles"] == 0 and not any(cache_dir.rglob("entry.json"))
    k = runtime.kernel(rn.SPEC, rn.config("fp32", False, True, 256, True), torch.device("cpu"))
    k.run(0, 1, 1, "not", "even", "arguments")  # a zero grid is a no-op, never a launch
    assert k[(0,)]("anything") is None


# ---- plan index: warm processes skip Jinja -------------------------------------------------------------
WARM = ("import sys, json, torch, jitkern, jitkern.ops\n"
        "x = torch.arange(192, dtype=torch.float32).view(3, 64) / 100; w = torch.ones(64)\n"
        "y = jitkern.ops.rms_norm(x, w)\n"
        "torch.testing.assert_close(y, jitkern.get_op('rms_norm').reference(x, w))\n"
        "print(json.dumps({'stats': jitkern.stats(), 'jinja2': 'jinja2' in sys.modules}))")


def test_warm_process_loads_from_cache_without_rendering(cache_dir):
    env = {"JITKERN_CACHE_DIR": str(cache_dir), "TRITON_INTERPRET": "1"}
    cold = run_py(WARM, env)
    assert cold.returncode == 0, cold.stderr
    cold = json.loads(cold.stdout)
    assert cold["stats"]["compiles"] == 1 and cold["jinja2"]
    assert len(list(cache_dir.rglob("index/*/*.json"))) == 1
    warm = run_py(WARM, env)
    assert warm.returncode == 0, warm.stderr
    warm = json.loads(warm.stdout)
    assert warm["stats"]["compiles"] == 0 and warm["stats"]["disk_hits"] == 1
    assert not warm["jinja2"]


def _copied_spec(tmp_path) -> OpSpec:
    tdir = tmp_path / "templates"
    shutil.copytree(rn.SPEC.template_dir, tdir)
    return OpSpec(**{**{f: getattr(rn.SPEC, f) for f in rn.SPEC.__dataclass_fields__}, "template_dir": tdir})


def test_index_follows_template_changes_and_ignores_bad_records(tmp_path):
    from jitkern import counters

    def renders():
        return counters.snapshot()["renders"]

    spec = _copied_spec(tmp_path)
    cfg = rn.config("fp32", False, True, 256, True)
    cpu = ARCHES["cpu"]
    first = plan_mod.plan(spec, cfg, cpu)
    r0 = renders()
    assert plan_mod.plan(spec, cfg, cpu).key == first.key and renders() == r0 + 1  # no entry: the record is not trusted
    from jitkern.build import get_entry

    get_entry(first)
    r0 = renders()
    assert plan_mod.plan(spec, cfg, cpu).key == first.key and renders() == r0  # a hit never renders
    # a record whose source does not give its key is ignored: rendered again, re-recorded
    rec = next(Path(os.environ["JITKERN_CACHE_DIR"]).rglob("index/*/*.json"))
    data = json.loads(rec.read_text())
    rec.write_text(json.dumps({"key": data["key"], "source": data["source"] + "\n# tampered\n"}))
    assert plan_mod.plan(spec, cfg, cpu).key == first.key and renders() == r0 + 1
    rec.write_text("{not json")
    assert plan_mod.plan(spec, cfg, cpu).key == first.key and renders() == r0 + 2
    assert plan_mod.plan(spec, cfg, cpu).key == first.key and renders() == r0 + 2
    # editing the template changes what rendering gives: the old record no longer applies
    t = spec.template_dir / "triton.py.j2"
    t.write_text(t.read_text() + "\n# edited\n")
    changed = plan_mod.plan(spec, cfg, cpu)
    assert changed.key != first.key and changed.source.endswith("# edited\n") and renders() == r0 + 3
    get_entry(changed)
    assert plan_mod.plan(spec, cfg, cpu).key == changed.key and renders() == r0 + 3


# ---- the direct launch matches Triton's own launcher call ---------------------------------------------
def _recording_cuda_launcher(calls):
    from triton.backends.nvidia.driver import CudaLauncher

    launcher = CudaLauncher.__new__(CudaLauncher)  # no C stub: its `launch` records its arguments
    launcher.num_ctas = 1
    launcher.global_scratch_size = launcher.profile_scratch_size = 0
    launcher.global_scratch_align = launcher.profile_scratch_align = 1
    launcher.launch_cooperative_grid, launcher.launch_pdl = False, True
    launcher.launch = lambda *a: calls.append(a)
    return launcher


def test_direct_launch_passes_what_triton_launcher_passes():
    from jitkern.launcher import direct_launch

    calls = []
    launcher = _recording_cuda_launcher(calls)
    packed, function, stream_handle = (4, 1, 0), 0xF00, 0x5EA
    args = (0x7000, 0x7100, 4096, 12, 2.5)
    # Triton's path: CompiledKernel.run(gx, gy, gz, stream, function, packed, launch_md, enter, exit, *args)
    launcher(8, 2, 1, stream_handle, function, packed, None, None, None, *args)
    run = direct_launch(launcher, function, packed, lambda device: stream_handle if device == 3 else None, 3)
    run(8, 2, 1, *args)
    assert len(calls) == 2 and calls[0] == calls[1]
    run(0, 2, 1, *args)  # empty grid: no launch
    run(8, 0, 1, *args)
    assert len(calls) == 2


def test_triton_hooks_are_seen_as_set_only_with_calls(monkeypatch):
    from triton import knobs

    from jitkern import launcher

    assert not launcher._hooked(knobs.runtime.launch_enter_hook)  # an empty HookChain
    assert not launcher._hooked(None)
    monkeypatch.setattr(knobs.runtime.launch_enter_hook, "calls", [print])
    assert launcher._hooked(knobs.runtime.launch_enter_hook)
    monkeypatch.delenv("JITKERN_DIRECT_LAUNCH", raising=False)
    assert launcher.direct_enabled()  # the default
    monkeypatch.setenv("JITKERN_DIRECT_LAUNCH", "0")
    assert not launcher.direct_enabled()


# ---- the direct load makes what Triton's CompiledKernel makes ------------------------------------------
@pytest.mark.parametrize("arch_name", ["sm_90", "gfx942"])
def test_direct_load_metadata_matches_compiled_kernel(arch_name):
    """For a real cross-compiled entry: the metadata record and packed launch metadata the direct load
    hands to Triton's launcher equal those of Triton's own CompiledKernel, and the bytes the cache
    verified are the entry's files."""
    from triton.compiler.compiler import CompiledKernel

    from jitkern import arch
    from jitkern.build import get_entry
    from jitkern.plan import plan
    from jitkern.binaries import METADATA_FILE, binary_name
    from jitkern.launcher import metadata_of
    from jitkern.library import rms_norm as rn

    a = arch.get(arch_name)
    job = plan(rn.SPEC, rn.config("bf16", True, True, 1024, True), a)
    get_entry(job)  # build, then look it up again: a verified entry
    entry, how = get_entry(job)
    assert how == "cached"
    for name in (METADATA_FILE, binary_name(a)):
        assert entry.verified[name] == entry.file(name).read_bytes()
    md, packed = metadata_of(entry)
    ck = CompiledKernel(None, {METADATA_FILE: str(entry.file(METADATA_FILE)),
                               binary_name(a): str(entry.file(binary_name(a)))}, entry.key)
    assert md._fields == ck.metadata._fields and md == ck.metadata
    assert packed == ck.packed_metadata
    assert metadata_of(entry)[0].__class__ is md.__class__  # one record type per field set, not per kernel
