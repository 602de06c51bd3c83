"""Foundation: import hygiene, arch table, template rendering, rms_norm numerics, cross-compiles,
and a third-party op declared through the ``jitkern.ops`` entry-point group."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import jitkern
from jitkern import arch, registry
from jitkern.build import get_entry
from jitkern.plan import plan
from jitkern.errors import (DTypeError, LayoutError, NoDeviceError, ShapeError, TemplateError,
                            UnknownArchError, UnknownOpError)
from jitkern.spec import Arg, Config, OpSpec, Variant

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_PKG = REPO / "tests" / "example_pkg"


def run_py(code: str, env_extra=None, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=300)


# ---- import hygiene --------------------------------------------------------------------------------
def test_import_has_no_side_effects(tmp_path):
    cache = tmp_path / "never-created"
    code = (
        "import sys, jitkern, jitkern.ops\n"
        "names = jitkern.registry.names() if hasattr(jitkern, 'registry') else None\n"
        "assert 'torch' not in sys.modules, 'import jitkern imported torch'\n"
        "assert 'triton' not in sys.modules, 'import jitkern imported triton'\n"
        "print('ok')\n"
    )
    r = run_py(code, {"JITKERN_CACHE_DIR": str(cache), "HOME": str(tmp_path / "nohome")})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"
    assert not cache.exists()
    assert not (tmp_path / "nohome").exists()


# ---- arch ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spelling, canonical", [
    ("gfx942:sramecc+:xnack-", "gfx942"), ("GFX950", "gfx950"), ("sm90", "sm_90"), ("sm_90a", "sm_90"),
    ("sm_80", "sm_80"), ("sm_100", "sm_100"),
])
def test_arch_spellings(spelling, canonical):
    assert arch.get(spelling).name == canonical


def test_arch_table_facts():
    assert arch.get("gfx942").shared_mem_per_block == 64 * 1024
    assert arch.get("gfx950").shared_mem_per_block == 160 * 1024
    assert arch.get("sm_90").shared_mem_per_block == 227 * 1024
    assert arch.get("gfx942").warp_size == 64 and arch.get("sm_90").warp_size == 32
    assert arch.get("gfx950").target().arch == "gfx950"
    assert arch.get("sm_90").target().arch == 90


def test_unknown_arch_lists_known(monkeypatch):
    with pytest.raises(UnknownArchError, match="gfx942.*sm_90"):
        arch.get("gfx1100")
    monkeypatch.setenv("JITKERN_ARCH", "sm_75")
    with pytest.raises(UnknownArchError, match="sm_75"):
        arch.current()
    with pytest.raises(UnknownArchError):
        arch.parse_list(" , ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_no_gpu_no_override_is_clear_error(monkeypatch):
    monkeypatch.delenv("JITKERN_ARCH", raising=False)
    with pytest.raises(NoDeviceError, match="JITKERN_ARCH"):
        arch.current()


# ---- templates -------------------------------------------------------------------------------------
def _toy_spec(tmp_path, text):
    d = tmp_path / "tpl"
    d.mkdir(exist_ok=True)
    (d / "k.py.j2").write_text(text)
    return OpSpec(name="toy", variants=(Variant("triton", "k.py.j2", "k", (Arg("x", "*fp32"),)),),
                  template_dir=d, fn=lambda: None, reference=lambda: None, configs=lambda a: [])


def test_undefined_template_variable_is_named(tmp_path):
    spec = _toy_spec(tmp_path, "BLOCK = {{ block_size }}\n")
    with pytest.raises(TemplateError, match=r"k\.py\.j2.*'block_size' is undefined"):
        plan(spec, Config.make("triton", block=4), arch.get("sm_90"))


def test_template_syntax_error_names_line(tmp_path):
    spec = _toy_spec(tmp_path, "ok\n{% if %}\n")
    with pytest.raises(TemplateError, match="line 2"):
        plan(spec, Config.make("triton"), arch.get("sm_90"))


def test_key_changes_with_each_part():
    spec = registry.get("rms_norm")
    cfgs = list(spec.configs(arch.get("sm_90")))
    k1 = plan(spec, cfgs[0], arch.get("sm_90")).key
    assert plan(spec, cfgs[0], arch.get("sm_90")).key == k1  # deterministic
    assert plan(spec, cfgs[1], arch.get("sm_90")).key != k1  # params
    assert plan(spec, cfgs[0], arch.get("sm_80")).key != k1  # arch
    os.environ["TRITON_DEFAULT_FP_FUSION"] = "0"
    try:
        assert plan(spec, cfgs[0], arch.get("sm_90")).key != k1  # compiler environment
    finally:
        del os.environ["TRITON_DEFAULT_FP_FUSION"]


# ---- rms_norm numerics (interpreter) ---------------------------------------------------------------
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 1000), (4, 4096), (2, 9000)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(dtype, shape, with_residual):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype)
    w = torch.randn(shape[-1], generator=g).to(dtype)
    r = torch.randn(shape, generator=g).to(dtype) if with_residual else None
    r_ref = r.clone() if with_residual else None
    y = jitkern.ops.rms_norm(x, w, eps=1e-6, residual=r)
    y_ref = registry.get("rms_norm").reference(x, w, eps=1e-6, residual=r_ref)
    torch.testing.assert_close(y.float(), y_ref.float(), atol=TOL[dtype] * 4, rtol=TOL[dtype])
    if with_residual:
        torch.testing.assert_close(r.float(), r_ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


def test_rms_norm_3d_and_strided_rows_and_out():
    x_big = torch.randn(4, 6, 48)
    x = x_big[:, :, :40]  # rows with a stride of 48
    w = torch.randn(40)
    out = torch.empty(4, 6, 40)
    y = jitkern.ops.rms_norm(x, w, out=out)
    assert y is out
    torch.testing.assert_close(y, registry.get("rms_norm").reference(x, w), atol=1e-5, rtol=1e-5)


def test_rms_norm_empty_input_launches_nothing():
    before = jitkern.stats()["compiles"]
    y = jitkern.ops.rms_norm(torch.empty(0, 64), torch.ones(64))
    assert y.shape == (0, 64) and jitkern.stats()["compiles"] == before


def test_rms_norm_bad_inputs():
    x = torch.randn(2, 8)
    with pytest.raises(DTypeError, match="x has dtype int32"):
        jitkern.ops.rms_norm(x.int(), torch.ones(8))
    with pytest.raises(DTypeError, match="weight has dtype float16 but x has float32"):
        jitkern.ops.rms_norm(x, torch.ones(8, dtype=torch.float16))
    with pytest.raises(ShapeError, match=r"weight has shape \(7,\); expected \(8,\)"):
        jitkern.ops.rms_norm(x, torch.ones(7))
    with pytest.raises(ShapeError, match="residual"):
        jitkern.ops.rms_norm(x, torch.ones(8), residual=torch.randn(3, 8))
    with pytest.raises(LayoutError, match="contiguous in its last dimension"):
        jitkern.ops.rms_norm(torch.randn(8, 2).t(), torch.ones(8))
    with pytest.raises(DTypeError, match="torch.Tensor"):
        jitkern.ops.rms_norm([1.0, 2.0], torch.ones(2))
    with pytest.raises(ShapeError, match="scalar"):
        jitkern.ops.rms_norm(torch.tensor(1.0), torch.ones(1))


def test_cpu_tensor_without_interpreter_is_device_error():
    r = run_py("import torch, jitkern\n"
               "try:\n    jitkern.ops.rms_norm(torch.randn(2, 8), torch.ones(8))\n"
               "except jitkern.DeviceError as e:\n    print('DeviceError', e)\n",
               {"TRITON_INTERPRET": "0"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("DeviceError") and "TRITON_INTERPRET=1" in r.stdout


def test_unknown_op():
    with pytest.raises(AttributeError, match="unknown op 'no_such_op'.*rms_norm"):
        jitkern.ops.no_such_op
    with pytest.raises(UnknownOpError):
        registry.get("no_such_op")


# ---- real cross-compiles ---------------------------------------------------------------------------
ELF_MAGIC = b"\x7fELF"


def test_cross_compile_rms_norm_for_each_arch(cache_dir):
    spec = registry.get("rms_norm")
    for name, ext in (("gfx942", "hsaco"), ("gfx950", "hsaco"), ("sm_90", "cubin")):
        a = arch.get(name)
        job = plan(spec, next(iter(spec.configs(a))), a)
        entry, status = get_entry(job)
        assert status == "built"
        binary = entry.file(f"kernel.{ext}").read_bytes()
        assert binary[:4] == ELF_MAGIC and len(binary) > 1000
        md = json.loads(entry.file("metadata.json").read_text())
        assert md["target"]["arch"] == a.triton_arch and md["name"] == "rms_norm_kernel"
        assert entry.meta["arch"] == name and entry.meta["shared_bytes"] == md["shared"]
        assert entry.path.is_relative_to(cache_dir)
        # the same job again comes from the cache
        assert get_entry(job)[1] == "cached"
    assert jitkern.stats()["compiles"] == 3


# ---- a third-party op through the entry-point group ------------------------------------------------
@pytest.fixture(scope="module")
def example_site(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(site), str(EXAMPLE_PKG)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return site


def test_third_party_op_via_entry_point(example_site, cache_dir):
    code = (
        "import torch, jitkern\n"
        "assert 'scale_add' in jitkern.registry.names()\n"
        "x, y = torch.randn(3000), torch.randn(3000)\n"
        "out = jitkern.ops.scale_add(x, y, alpha=0.5)\n"
        "ref = jitkern.get_op('scale_add').reference(x, y, alpha=0.5)\n"
        "torch.testing.assert_close(out, ref)\n"
        "assert hasattr(torch.ops.jitkern, 'scale_add')  # registered with torch.library from its spec\n"
        "print(jitkern.stats()['compiles'])\n"
    )
    env = {"PYTHONPATH": os.pathsep.join([str(example_site), str(REPO)]), "JITKERN_CACHE_DIR": str(cache_dir),
           "TRITON_INTERPRET": "1"}
    r = run_py("import jitkern.registry\n" + code, env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "1"
    assert "scale_add" not in r.stderr, r.stderr  # declared completely: no warning about the op
    r2 = run_py("import jitkern.registry\n" + code, env)  # second process: from the cache
    assert r2.returncode == 0, r2.stderr
    assert r2.stdout.strip() == "0"
