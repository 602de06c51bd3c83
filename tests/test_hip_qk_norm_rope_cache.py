"""qk_norm_rope_cache (seed 002's fused step): numerics against the PyTorch reference under Triton's
interpreter (bf16/fp32 caches and fp8 with per-tensor scales), the CK-based HIP variant compiled and
budget-checked for gfx942/gfx950, CUDA compiled with nvcc for sm_90 where nvcc is, CK absent -> Triton
with one warning, and input errors."""
import logging
import os
import shutil

import pytest
import torch

import jitkern
from jitkern import arch, binaries, budget, ck
from jitkern.build import get_entry
from jitkern.builders import hip
from jitkern.cache import Store
from jitkern.errors import DTypeError, RecordedBuildFailure, ShapeError
from jitkern.library import qk_norm_rope_cache as qc
from jitkern.library.qk_norm_rope import cos_sin_table
from jitkern.plan import plan

IN_CI = bool(os.environ.get("CI"))
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def make(tokens, hq, hkv, d, dtype, kv_dtype, seed=0, num_blocks=6, block_size=4, max_pos=32):
    g = torch.Generator().manual_seed(seed)
    qkv = (3 * torch.randn(tokens, (hq + 2 * hkv) * d, generator=g)).to(dtype)
    qw = (1 + 0.5 * torch.randn(d, generator=g)).to(dtype)
    kw = (1 + 0.5 * torch.randn(d, generator=g)).to(dtype)
    cs = cos_sin_table(max_pos, d)
    pos = torch.randint(0, max_pos, (tokens,), generator=g)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens]
    if tokens:
        pos[-1] = max_pos + 3  # out of range: not rotated (zeros), still cached
        slots[0] = -1  # a padding token: not cached
    kc = torch.zeros(num_blocks, block_size, hkv, d, dtype=torch.float32).to(kv_dtype)
    return qkv, qw, kw, cs, pos, slots, kc, kc.clone()


def fp8_bits(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale).clamp(-qc.FP8_MAX, qc.FP8_MAX).to(qc.FP8).view(torch.uint8)


@pytest.mark.parametrize("dtype,kv", [(torch.bfloat16, None), (torch.float32, None), (torch.bfloat16, qc.FP8),
                                      (torch.float16, qc.FP8)])
@pytest.mark.parametrize("is_neox", [True, False])
def test_numerics_match_the_reference(dtype, kv, is_neox):
    hq, hkv, d, t = 4, 2, 64, 6
    qkv, qw, kw, cs, pos, slots, kc, vc = make(t, hq, hkv, d, dtype, kv or dtype)
    scales = (torch.tensor([0.03]), torch.tensor([0.011])) if kv else (None, None)
    want = [qkv.clone(), kc.clone(), vc.clone()]
    qc.reference(want[0], qw, kw, cs, pos, slots, want[1], want[2], hq, hkv, d, 1e-6, is_neox, *scales)
    out = jitkern.ops.qk_norm_rope_cache(qkv, qw, kw, cs, pos, slots, kc, vc, hq, hkv, d, 1e-6, is_neox, *scales)
    assert out is qkv
    tol = TOL[dtype]
    torch.testing.assert_close(qkv.float(), want[0].float(), atol=tol, rtol=tol)
    k = qkv[:, hq * d:(hq + hkv) * d].reshape(t, hkv, d)
    v = qkv[:, (hq + hkv) * d:].reshape(t, hkv, d)
    cached = slots >= 0
    if kv is None:
        assert torch.equal(kc.view(-1, hkv, d)[slots[cached]], k[cached])  # k exactly as stored in qkv
        assert torch.equal(vc, want[2])
    else:
        kb, vb = kc.view(torch.uint8).view(-1, hkv, d), vc.view(torch.uint8).view(-1, hkv, d)
        assert torch.equal(kb[slots[cached]], fp8_bits(k[cached], scales[0]))  # fp8 of the stored k, bit for bit
        assert torch.equal(vb, want[2].view(torch.uint8).view(-1, hkv, d))  # v untouched: same bits as torch
        torch.testing.assert_close(kc.float(), want[1].float(), atol=0.0, rtol=0.13)  # within one e4m3 step
    untouched = torch.ones(kc.view(-1, hkv, d).shape[0], dtype=torch.bool)
    untouched[slots[cached]] = False
    assert not kc.view(-1, hkv, d)[untouched].float().any()  # only the tokens' slots were written


def test_fp8_encoding_is_bit_exact_on_edge_values():
    """The Triton variant's integer e4m3 encoder against torch's cast: ties, subnormals, saturation, -0."""
    hq, hkv, d = 1, 1, 64
    edges = torch.tensor([0.0, -0.0, 448.0, 449.0, 464.0, -1e9, 1e-9, 2.0 ** -9, 2.0 ** -10, 1.5 * 2.0 ** -9,
                          2.0 ** -6, 0.9375 * 2.0 ** -6, 120.0, 124.0, 125.0, 126.0, 127.5, 130.0, 3.3, -17.25])
    v = torch.cat([edges, torch.linspace(-500, 500, d * 2 - len(edges))])[: d].reshape(1, d)
    qkv = torch.cat([torch.ones(1, 2 * d), v], dim=1).contiguous()
    slots = torch.tensor([0])
    kc = torch.zeros(1, 1, hkv, d).to(qc.FP8)
    vc = kc.clone()
    one = torch.ones(1)
    jitkern.ops.qk_norm_rope_cache(qkv, torch.ones(d), torch.ones(d), cos_sin_table(4, d), torch.tensor([0]), slots,
                                   kc, vc, hq, hkv, d, 1e-6, True, one, one)
    assert torch.equal(vc.view(torch.uint8).reshape(d), fp8_bits(v.reshape(d), one))


def test_input_errors():
    qkv, qw, kw, cs, pos, slots, kc, vc = make(3, 2, 1, 64, torch.float32, torch.float32)
    with pytest.raises(ShapeError, match="k_cache has shape"):
        jitkern.ops.qk_norm_rope_cache(qkv, qw, kw, cs, pos, slots, kc[..., :32], vc[..., :32], 2, 1, 64)
    with pytest.raises(DTypeError, match="uint8"):
        jitkern.ops.qk_norm_rope_cache(qkv, qw, kw, cs, pos, slots, kc.to(torch.uint8), vc.to(torch.uint8), 2, 1, 64)
    with pytest.raises(DTypeError, match="one cache dtype"):
        jitkern.ops.qk_norm_rope_cache(qkv, qw, kw, cs, pos, slots, kc.to(qc.FP8), vc, 2, 1, 64)
    empty = make(0, 2, 1, 64, torch.float32, torch.float32)
    assert jitkern.ops.qk_norm_rope_cache(*empty, 2, 1, 64) is empty[0]


# ---- compiled for real, offline --------------------------------------------------------------------
def _hip_ready() -> bool:
    reason = hip.HIP.probe(arch.get("gfx942"))
    found, why = ck.find()
    if reason is None and found is not None:
        return True
    assert not IN_CI, f"CI installs the HIP toolchain and CK (.ci/run): {reason or why}"
    return False


@pytest.fixture(scope="session")
def fused_store(tmp_path_factory):
    return Store([tmp_path_factory.mktemp("fused-session")])


@pytest.mark.parametrize("name,kv,is_neox", [("gfx942", "fp8e4m3", False), ("gfx950", "bf16", True)])
def test_hip_variant_compiles_for_gfx942_gfx950_within_budget(name, kv, is_neox, fused_store):
    a = arch.get(name)
    job = plan(qc.SPEC, qc.cpp_config("hip", 64, "bf16", "fp32", "i64", kv, 128, is_neox), a)
    if not _hip_ready():
        with pytest.raises(Exception, match="no HIP compiler found|CK headers not found|device libraries"):
            get_entry(job, fused_store)
        return
    entry, how = get_entry(job, fused_store)
    data = entry.file("kernel.hsaco").read_bytes()
    assert binaries.matches(a, data)
    res = entry.meta["resources"]
    assert entry.meta["status"] == budget.OK and res["lds_bytes"] == 0 and res["scratch_bytes"] == 0
    assert 0 < res["vgprs"] <= res["regs_limit"] and res["spills"] == 0
    assert "ck/utility/type_convert.hpp" in entry.file("kernel.hip.cpp").read_text()


def test_cuda_variant_compiles_with_nvcc_for_sm90(fused_store):
    sm90 = arch.get("sm_90")
    job = plan(qc.SPEC, qc.cpp_config("cuda", 32, "bf16", "fp32", "i64", "fp8e4m3", 128, True), sm90)
    if shutil.which("nvcc") is None:
        with pytest.raises(Exception, match="nvcc not found"):
            get_entry(job, fused_store)
        return
    entry, how = get_entry(job, fused_store)
    assert binaries.matches(sm90, entry.file("kernel.cubin").read_bytes())
    assert entry.meta["status"] == budget.OK and entry.meta["resources"]["regs"] > 0


def test_ck_absent_routes_to_triton_with_one_warning(monkeypatch, caplog):
    """Seed 002 for the fused op: with CK switched off, the hip variant for gfx942 is unavailable because
    CK is missing (recorded once), and a call routes to Triton with one warning naming that reason."""
    monkeypatch.setenv("JITKERN_CK_DIR", "none")
    gfx942 = arch.get("gfx942")
    job = plan(qc.SPEC, qc.cpp_config("hip", 64, "bf16", "fp32", "i64", "bf16", 64, True), gfx942)
    with pytest.raises(RecordedBuildFailure, match="CK headers not found"):
        get_entry(job, record_failures=True)
    with pytest.raises(RecordedBuildFailure, match="recorded earlier"):
        get_entry(job, record_failures=True)
    monkeypatch.setenv("JITKERN_ARCH", "gfx942")
    caplog.set_level(logging.WARNING, logger="jitkern")
    jitkern.reset()
    for seed in (1, 2):
        qkv, qw, kw, cs, pos, slots, kc, vc = make(4, 2, 1, 64, torch.float32, torch.float32, seed=seed)
        want = [qkv.clone(), kc.clone(), vc.clone()]
        qc.reference(want[0], qw, kw, cs, pos, slots, want[1], want[2], 2, 1, 64)
        jitkern.ops.qk_norm_rope_cache(qkv, qw, kw, cs, pos, slots, kc, vc, 2, 1, 64)
        torch.testing.assert_close(qkv, want[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(kc, want[1], atol=1e-5, rtol=1e-5)
    warns = [r.getMessage() for r in caplog.records if f"{qc.OP} falls back" in r.getMessage()]
    assert len(warns) == 1 and "'triton'" in warns[0] and "CK headers not found" in warns[0]
