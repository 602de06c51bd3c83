"""qk_norm_rope: numerics against the PyTorch reference (Triton interpreter on CPU; GPU variants on a
GPU), the seed-002 fallback on a machine without hipcc/CK/GPU, cross-compiles of every variant
kind, and input errors."""
import logging
import shutil

import pytest
import torch

import jitkern
from jitkern import arch, counters, failures, logs, runtime
from jitkern.build import get_entry
from jitkern.plan import plan
from jitkern.cache import default_store
from jitkern.errors import DTypeError, RecordedBuildFailure, ShapeError
from jitkern.library import qk_norm_rope as qnr

from conftest import requires_gpu

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}


def make_inputs(tokens, hq, hkv, d, dtype, device="cpu", cache_dtype=torch.float32, pos_dtype=torch.int64,
                max_pos=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, generator=g).to(dtype).to(device)
    qw = (1 + 0.5 * torch.randn(d, generator=g)).to(dtype).to(device)
    kw = (1 + 0.5 * torch.randn(d, generator=g)).to(dtype).to(device)
    cs = qnr.cos_sin_table(max_pos, d, dtype=cache_dtype, device=device)
    pos = torch.randint(0, max_pos, (tokens,), generator=g).to(pos_dtype).to(device)
    return qkv, qw, kw, cs, pos


def check(tokens, hq, hkv, d, dtype, is_neox, **kw):
    qkv, qw, k_w, cs, pos = make_inputs(tokens, hq, hkv, d, dtype, **kw)
    want = qnr.reference(qkv.clone(), qw, k_w, cs, pos, hq, hkv, d, 1e-6, is_neox)
    v_before = qkv[:, (hq + hkv) * d:].clone()
    out = jitkern.ops.qk_norm_rope(qkv, qw, k_w, cs, pos, hq, hkv, d, eps=1e-6, is_neox=is_neox)
    assert out is qkv
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(qkv.float(), want.float(), atol=atol, rtol=rtol)
    assert torch.equal(qkv[:, (hq + hkv) * d:], v_before)  # v heads untouched


@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("tokens, hq, hkv, d, dtype", [
    (1, 1, 1, 64, torch.float32),  # a single token
    (5, 5, 3, 64, torch.bfloat16),  # head counts that are not powers of two
    (3, 7, 1, 96, torch.float32),  # head_dim/2 = 48 is not a power of two (masked lanes)
    (2, 40, 8, 32, torch.float16),  # more heads than one program holds: several head blocks per token
])
def test_matches_reference(tokens, hq, hkv, d, dtype, is_neox):
    check(tokens, hq, hkv, d, dtype, is_neox)


def test_int32_positions_and_cache_in_model_dtype():
    check(4, 3, 2, 64, torch.bfloat16, True, cache_dtype=torch.bfloat16, pos_dtype=torch.int32)


def test_reference_rotation_is_a_rotation():
    """The reference itself: with unit weights, each (pair) keeps the norm of the normalised head."""
    qkv, _, _, cs, pos = make_inputs(3, 2, 1, 16, torch.float64)
    ones = torch.ones(16, dtype=torch.float64)
    x = qkv[:, : 3 * 16].reshape(3, 3, 16)
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    out = qnr.reference(qkv.clone(), ones, ones, cs, pos, 2, 1, 16, 1e-6, True)[:, : 3 * 16].reshape(3, 3, 16)
    torch.testing.assert_close(out.norm(dim=-1), normed.norm(dim=-1))
    zero = torch.zeros(3, dtype=torch.int64)  # position 0: no rotation
    out0 = qnr.reference(qkv.clone(), ones, ones, cs, zero, 2, 1, 16, 1e-6, False)[:, : 3 * 16].reshape(3, 3, 16)
    torch.testing.assert_close(out0, normed)


def test_cpu_machine_falls_back_to_triton_with_one_warning(caplog):
    """Seed 002 on the CI machine: no hipcc, no CK, no GPU: hip and cuda are recorded as unavailable,
    the op runs through Triton, and says so once."""
    caplog.set_level(logging.WARNING, logger="jitkern")
    jitkern.reset()
    logs._seen.discard(("fallback", "qk_norm_rope"))  # earlier tests in this process already warned
    for is_neox in (True, False):
        for _ in range(2):
            check(2, 2, 1, 64, torch.float32, is_neox, seed=1)
    warns = [r.getMessage() for r in caplog.records if "qk_norm_rope falls back" in r.getMessage()]
    assert len(warns) == 1
    assert "'triton'" in warns[0] and "'hip'" in warns[0] and "'cuda'" in warns[0] and "build.log" in warns[0]
    assert "CK headers" in warns[0] or "AMD GPU" in warns[0]
    recs = failures.failures(default_store())
    assert sorted(r["variant"] for r in recs) == ["cuda", "cuda", "hip", "hip"]  # one per style
    assert all(r["arch"] == "cpu" for r in recs)


def test_cross_compile_variants(monkeypatch):
    """Triton for sm_90 and gfx942; the CUDA C++ variant with the real nvcc (recorded as unavailable with
    the reason when nvcc is missing); the CK-dependent HIP variant, with CK switched off, is unavailable
    for a real reason (tests/test_hip.py builds it with CK)."""
    monkeypatch.setenv("JITKERN_CK_DIR", "none")
    sm90, gfx942 = arch.get("sm_90"), arch.get("gfx942")
    store = default_store()
    for a, ext in ((sm90, "cubin"), (gfx942, "hsaco")):
        cfg = qnr.triton_config("bf16", "fp32", "i64", 128, True)
        entry, status = get_entry(plan(qnr.SPEC, cfg, a), store)
        assert status == "built" and entry.file(f"kernel.{ext}").stat().st_size > 0
        assert entry.meta["shared_bytes"] is not None
    cuda_cfg = qnr.cpp_config("cuda", 32, "bf16", "fp32", "i64", 128, False)
    job = plan(qnr.SPEC, cuda_cfg, sm90)
    if shutil.which("nvcc"):
        entry, status = get_entry(job, store, record_failures=True)
        assert status == "built"
        assert entry.file("kernel.cubin").read_bytes()[:4] == b"\x7fELF"
        assert "-arch=sm_90" in entry.file("build.log").read_text()
        assert entry.meta["key_parts"]["compiler"]["version"]  # nvcc --version is part of the key
    else:
        with pytest.raises(RecordedBuildFailure, match="nvcc not found"):
            get_entry(job, store, record_failures=True)
    hip_job = plan(qnr.SPEC, qnr.cpp_config("hip", 64, "bf16", "fp32", "i64", 128, True), gfx942)
    with pytest.raises(RecordedBuildFailure, match="no HIP compiler found|CK headers not found"):
        get_entry(hip_job, store, record_failures=True)
    runs = counters.snapshot()["compiler_runs"]
    with pytest.raises(RecordedBuildFailure, match="recorded earlier"):
        get_entry(hip_job, store, record_failures=True)
    assert counters.snapshot()["compiler_runs"] == runs


def test_a_named_nvcc_that_is_missing_makes_cuda_unavailable(monkeypatch, tmp_path):
    """JITKERN_NVCC names the one nvcc to use: when it is not an executable, CUDA variants are unavailable
    (and say why), never built by another nvcc found on PATH or in /usr/local/cuda."""
    from jitkern.builders import cpp

    monkeypatch.setenv("JITKERN_NVCC", str(tmp_path / "no-nvcc"))
    assert cpp.find_nvcc() is None
    why = cpp.CUDA.probe(arch.get("sm_90"))
    assert f"JITKERN_NVCC={tmp_path / 'no-nvcc'} is not an executable file" in why
    fake = tmp_path / "nvcc"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("JITKERN_NVCC", str(fake))
    assert cpp.find_nvcc() == str(fake)


def test_empty_batch_is_a_no_op():
    qkv, qw, kw, cs, pos = make_inputs(0, 2, 1, 64, torch.float32)
    assert jitkern.ops.qk_norm_rope(qkv, qw, kw, cs, pos, 2, 1, 64) is qkv


def test_input_errors():
    qkv, qw, kw, cs, pos = make_inputs(3, 2, 1, 64, torch.float32)
    with pytest.raises(ShapeError, match="qkv has shape"):
        jitkern.ops.qk_norm_rope(qkv, qw, kw, cs, pos, 3, 1, 64)
    with pytest.raises(ShapeError, match="even head_dim"):
        jitkern.ops.qk_norm_rope(qkv[:, :63 * 4], qw[:63], kw[:63], cs, pos, 2, 1, 63)
    with pytest.raises(DTypeError, match="positions"):
        jitkern.ops.qk_norm_rope(qkv, qw, kw, cs, pos.float(), 2, 1, 64)
    with pytest.raises(DTypeError, match="q_weight"):
        jitkern.ops.qk_norm_rope(qkv, qw.double(), kw, cs, pos, 2, 1, 64)
    with pytest.raises(ShapeError, match="cos_sin_cache"):
        jitkern.ops.qk_norm_rope(qkv, qw, kw, cs[:, :32], pos, 2, 1, 64)
    with pytest.raises(ShapeError, match="positions"):
        jitkern.ops.qk_norm_rope(qkv, qw, kw, cs, pos[:2], 2, 1, 64)


@requires_gpu
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
def test_gpu_variants_match_reference(is_neox):
    """On a GPU every variant that builds here (cuda on NVIDIA, hip where CK is, triton) matches the reference."""
    a = arch.current()
    qkv, qw, kw, cs, pos = make_inputs(257, 32, 8, 128, torch.bfloat16, device="cuda", max_pos=4096)
    want = qnr.reference(qkv.clone(), qw, kw, cs, pos, 32, 8, 128, 1e-6, is_neox)
    ran = []
    d = jitkern.dispatcher(qnr.SPEC)
    args = (qkv, qw, kw, cs, pos, 32, 8, 128, 1e-6, is_neox)
    for cand in d.candidates(args, a, qkv.device):
        try:
            kernels = [runtime.kernel(qnr.SPEC, la.config, qkv.device) for la in cand.launches]
        except jitkern.errors.BuildError:
            assert cand.variant != "triton" and not (cand.variant == "cuda" and shutil.which("nvcc"))
            continue
        x = qkv.clone()
        d.bind(cand, kernels)((x, *args[1:]))
        torch.cuda.synchronize()
        torch.testing.assert_close(x.float(), want.float(), atol=2e-2, rtol=2e-2)
        ran.append(cand.variant)
    assert "triton" in ran


@requires_gpu
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("tok, warps", [(1, 4), (4, 2), (8, 8)])
@pytest.mark.parametrize("d, dtype, cache_dtype", [(128, torch.bfloat16, torch.float32),
                                                   (64, torch.float16, torch.float16),
                                                   (256, torch.bfloat16, torch.bfloat16),
                                                   (128, torch.float32, torch.float32)])
def test_gpu_cuda_row_layout_matches_reference(monkeypatch, is_neox, tok, warps, d, dtype, cache_dtype):
    """The CUDA variant's 16-byte row layout (JITKERN_QK_NORM_ROPE_CUDA_TOK > 0): a token count that is
    not a multiple of ``tok``, 7 + 2 heads (a block's last warp half empty), int32 positions."""
    if not shutil.which("nvcc") or arch.current().vendor != "nvidia":
        pytest.skip("needs nvcc and an NVIDIA GPU")
    monkeypatch.setenv("JITKERN_QK_NORM_ROPE_CUDA_TOK", str(tok))
    monkeypatch.setenv("JITKERN_QK_NORM_ROPE_CUDA_WARPS", str(warps))
    jitkern.reset()
    qkv, qw, kw, cs, pos = make_inputs(203, 7, 2, d, dtype, device="cuda", cache_dtype=cache_dtype,
                                       pos_dtype=torch.int32, max_pos=512)
    want = qnr.reference(qkv.clone(), qw, kw, cs, pos, 7, 2, d, 1e-6, is_neox)
    d_ = jitkern.dispatcher(qnr.SPEC)
    args = (qkv, qw, kw, cs, pos, 7, 2, d, 1e-6, is_neox)
    (cand,) = [c for c in d_.candidates(args, arch.current(), qkv.device) if c.variant == "cuda"]
    assert cand.launches[0].config.p["tok"] == tok
    x = qkv.clone()
    d_.bind(cand, [runtime.kernel(qnr.SPEC, la.config, qkv.device) for la in cand.launches])((x, *args[1:]))
    torch.cuda.synchronize()
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(x.float(), want.float(), atol=atol, rtol=rtol)
