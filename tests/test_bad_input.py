"""Bad input gets a specific error a user can act on, never a traceback from deep inside Triton;
good input of any shape and dtype matches the PyTorch reference (hypothesis, interpreter mode).
Covers rms_norm, the arch table, the cache and the registry; other ops' authors add theirs."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jitkern
from jitkern import arch, cache, locks, registry
from jitkern.errors import (
    ArgumentError, CacheError, ConfigError, DeviceError, DTypeError, InputError, JitkernError, LayoutError,
    ShapeError, SpecError, UnknownArchError, UnknownOpError,
)
from jitkern.library import rms_norm as rn

rms_norm = jitkern.ops.rms_norm
HYPO = settings(max_examples=12, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
TOL = {torch.float32: (1e-4, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


# ---- good input of any shape: matches the reference -------------------------------------------
@HYPO
@given(lead=st.lists(st.integers(0, 4), min_size=0, max_size=2), n=st.integers(1, 300),
       dtype=st.sampled_from(rn.DTYPES), with_residual=st.booleans(), eps=st.sampled_from([1e-6, 1e-2, 0.0]),
       seed=st.integers(0, 2**16))
def test_rms_norm_any_shape_and_dtype_matches_reference(lead, n, dtype, with_residual, eps, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*lead, n, generator=g) * 3).to(dtype)
    w = torch.randn(n, generator=g).to(dtype)
    r = torch.randn(*lead, n, generator=g).to(dtype) if with_residual else None
    r_ref = None if r is None else r.clone()
    y = rms_norm(x, w, eps, residual=r)
    want = rn.reference(x, w, eps, residual=r_ref)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(y, want, rtol=rtol, atol=atol)
    if r is not None:
        torch.testing.assert_close(r, r_ref, rtol=rtol, atol=atol)


@HYPO
@given(dtype=st.sampled_from([torch.float64, torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool,
                              torch.complex64, torch.float8_e4m3fn]),
       n=st.integers(1, 64))
def test_rms_norm_unsupported_dtypes_are_named(dtype, n):
    x = torch.zeros(2, n, dtype=dtype)
    with pytest.raises(DTypeError, match=r"x has dtype .*; expected one of: bfloat16, float16, float32"):
        rms_norm(x, torch.zeros(n, dtype=dtype))


@HYPO
@given(n=st.integers(2, 200), bad_n=st.integers(1, 200), wdim=st.integers(0, 3))
def test_rms_norm_mismatched_weight_shapes_are_named(n, bad_n, wdim):
    x = torch.randn(3, n)
    shape = (bad_n,) if wdim == 1 else (1,) * wdim + ((n,) if wdim else ())
    w = torch.randn(shape)
    if tuple(w.shape) == (n,):
        return
    with pytest.raises(ShapeError, match="rms_norm: weight"):
        rms_norm(x, w)


# ---- bad input: one specific error each --------------------------------------------------------
x64, w64 = torch.randn(4, 64), torch.randn(64)
BAD = {
    "x not a tensor": (lambda: rms_norm([[1.0]], w64), DTypeError, "x must be a torch.Tensor, got list"),
    "weight None": (lambda: rms_norm(x64, None), DTypeError, "weight must be a torch.Tensor"),
    "weight dtype differs": (lambda: rms_norm(x64, w64.half()), DTypeError, "weight has dtype float16 but x"),
    "scalar x": (lambda: rms_norm(torch.tensor(1.0), torch.randn(1)), ShapeError, "at least 1 dimension"),
    "weight 2-D": (lambda: rms_norm(x64, w64[None]), ShapeError, "weight must have 1 dimension"),
    "residual shape": (lambda: rms_norm(x64, w64, residual=torch.randn(4, 32)), ShapeError, "residual has shape"),
    "residual dtype": (lambda: rms_norm(x64, w64, residual=torch.randn(4, 64).half()), DTypeError, "residual"),
    "out shape": (lambda: rms_norm(x64, w64, out=torch.empty(3, 64)), ShapeError, "out has shape"),
    "out dtype": (lambda: rms_norm(x64, w64, out=torch.empty(4, 64).half()), DTypeError, "out has dtype"),
    "x strided last dim": (lambda: rms_norm(torch.randn(4, 128)[:, ::2], w64), LayoutError, r"x.contiguous\(\)"),
    "x rows not viewable": (lambda: rms_norm(torch.randn(4, 3, 64).transpose(0, 1), w64), LayoutError,
                            "cannot be viewed as rows"),
    "x misaligned": (lambda: rms_norm(torch.randn(4 * 64 + 1)[1:].view(4, 64), w64), LayoutError, "aligned"),
    "out transposed": (lambda: rms_norm(x64, w64, out=torch.empty(64, 4).t()), LayoutError, "out must be contiguous"),
    "weight strided": (lambda: rms_norm(x64, torch.randn(128)[::2]), LayoutError, "weight must be contiguous"),
    "sparse x": (lambda: rms_norm(x64.to_sparse(), w64), LayoutError, r"sparse_coo tensor.*to_dense"),
    "x on meta": (lambda: rms_norm(x64.to("meta"), w64.to("meta")), DeviceError, "'meta' device"),
    "weight on another device": (lambda: rms_norm(x64, w64.to("meta")), DeviceError, "weight is on meta"),
    "eps a string": (lambda: rms_norm(x64, w64, eps="abc"), ArgumentError, "eps must be a real number"),
    "eps None": (lambda: rms_norm(x64, w64, eps=None), ArgumentError, "eps must be a real number"),
    "eps negative": (lambda: rms_norm(x64, w64, eps=-1.0), ArgumentError, "at least 0"),
    "eps nan": (lambda: rms_norm(x64, w64, eps=float("nan")), ArgumentError, "finite"),
    "eps two elements": (lambda: rms_norm(x64, w64, eps=torch.tensor([1e-6, 1e-6])), ArgumentError, "eps"),
    "row longer than i32": (lambda: rms_norm(torch.empty(2, 2**31, device="meta"),
                                             torch.empty(2**31, device="meta")), ShapeError, "32-bit limit"),
    "more rows than i32": (lambda: rms_norm(torch.empty(2**31, 16, device="meta"),
                                            torch.empty(16, device="meta")), ShapeError, "number of rows"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_rms_norm_bad_input_is_a_specific_error(case):
    fn, kind, match = BAD[case]
    with pytest.raises(kind, match=match) as info:
        fn()
    assert isinstance(info.value, (InputError, DeviceError))
    assert "triton" not in type(info.value).__module__
    if case != "x misaligned":  # addresses are checked per call, after the kernel is planned
        assert jitkern.stats()["compiles"] == 0  # rejected before anything is built


def test_bad_eps_on_a_later_call_with_a_known_signature(monkeypatch):
    rms_norm(x64, w64)
    with pytest.raises(ArgumentError, match="eps must be a real number"):
        rms_norm(x64, w64, eps="1e-6x")


def test_cpu_tensors_without_interpreter_is_a_device_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(DeviceError, match="TRITON_INTERPRET=1"):
        rms_norm(x64, w64)


# ---- arch names --------------------------------------------------------------------------------
@HYPO
@given(name=st.text(min_size=0, max_size=12))
def test_any_arch_name_is_known_or_an_unknown_arch_error(name):
    try:
        a = arch.get(name)
    except UnknownArchError as e:
        assert "known arches: gfx942" in str(e)
    else:
        assert a.name in arch.ARCHES


@pytest.mark.parametrize("text", ["", " , ", "gfx942,bogus", "sm_9O", "gfx 942"])
def test_bad_arch_lists_are_errors(text):
    with pytest.raises(UnknownArchError):
        arch.parse_list(text)


def test_bad_jitkern_arch_env_is_named(monkeypatch):
    monkeypatch.setenv("JITKERN_ARCH", "gfx9999")
    with pytest.raises(UnknownArchError, match="gfx9999"):
        rms_norm(x64, w64)


# ---- registry ----------------------------------------------------------------------------------
def test_unknown_op_names_list_the_available_ones():
    with pytest.raises(UnknownOpError, match="available ops: .*rms_norm"):
        registry.get("rms_norn")
    with pytest.raises(AttributeError, match="rms_norm"):
        jitkern.ops.rms_norn  # noqa: B018
    with pytest.raises(SpecError, match="takes an OpSpec"):
        registry.register("rms_norm")
    with pytest.raises(SpecError, match="already registered"):
        registry.register(rn.SPEC.__class__(**{**rn.SPEC.__dict__}))


# ---- cache and environment ---------------------------------------------------------------------
@pytest.mark.parametrize("key", ["", "../" * 21 + "a", "G" * 64, "ab" * 32 + "\0", 12345, "AB" * 32])
def test_malformed_keys_never_reach_the_filesystem(key, cache_dir):
    with pytest.raises(CacheError, match="malformed cache key"):
        cache.Store([cache_dir]).lookup(key)
    assert not cache_dir.exists() or not any(cache_dir.rglob("*.lock"))


@pytest.mark.parametrize("raw", ["ten", "-5", "nan", "5x"])
def test_malformed_lock_timeout_is_a_config_error_on_first_build(raw, monkeypatch):
    monkeypatch.setenv("JITKERN_LOCK_TIMEOUT", raw)
    with pytest.raises(ConfigError, match=f"JITKERN_LOCK_TIMEOUT={raw!r}"):
        rms_norm(x64, w64)
    assert isinstance(ConfigError("x"), (JitkernError, ValueError))
    monkeypatch.delenv("JITKERN_LOCK_TIMEOUT")
    assert locks.lock_timeout() == locks.DEFAULT_TIMEOUT


def test_cache_dir_that_is_a_file_falls_back_to_memory(tmp_path, monkeypatch, caplog):
    f = tmp_path / "not-a-dir"
    f.write_text("")
    monkeypatch.setenv("JITKERN_CACHE_DIR", str(f))
    torch.testing.assert_close(rms_norm(x64, w64), rn.reference(x64, w64))
    assert "no writable jitkern cache layer" in caplog.text
    assert f.read_text() == ""
    assert os.path.isfile(f)


# ---- the seed ops: bad input is rejected by their plans, before anything is built ----------------
def _seed_bad_cases():
    from jitkern.library import gather_kv_cache as gkv
    from jitkern.library import moe_gemm_stage1 as moe
    from jitkern.library import paged_attention_decode as pa
    from jitkern.library import paged_mqa_logits as mqa

    cache = torch.randn(4, 16, 8).bfloat16()
    bt = torch.zeros(2, 2, dtype=torch.int32)
    cu = torch.tensor([0, 5, 9], dtype=torch.int32)
    cu_strided = torch.tensor([0, 0, 5, 0, 9, 0], dtype=torch.int32)[::2]
    q = torch.randn(2, 4, 64).bfloat16()
    kc = torch.randn(4, 16, 2, 64).bfloat16()
    lens = torch.tensor([5, 9], dtype=torch.int32)
    lens_strided = torch.tensor([5, 0, 9, 0], dtype=torch.int32)[::2]
    mq = torch.randn(2, 1, 16, 64).bfloat16()
    mkv = torch.randn(4, 16, 64).bfloat16()
    mw = torch.rand(2, 16)
    x = torch.randn(3, 64).bfloat16()
    w = torch.randn(4, 32, 64).bfloat16()
    ids, eids, npad = moe.moe_align(torch.tensor([[0, 1], [2, 3], [1, 2]], dtype=torch.int32), 4, 16)
    ids_strided = torch.stack([ids, ids], 1).reshape(-1)[::2]
    return {
        "gather: cu_seq_lens strided": (lambda: gkv.gather_kv_cache(cache, bt, cu_strided, 9), LayoutError,
                                        "cu_seq_lens must be contiguous"),
        "gather: empty kv_cache": (lambda: gkv.gather_kv_cache(cache[:0], bt, cu, 9), ShapeError, "no elements"),
        "gather: num_tokens 1.5": (lambda: gkv.gather_kv_cache(cache, bt, cu, 1.5), ArgumentError,
                                   "num_tokens must be an integer"),
        "gather: cu_seq_lens int64": (lambda: gkv.gather_kv_cache(cache, bt, cu.long(), 9), DTypeError, "cu_seq_lens"),
        "pa: seq_lens strided": (lambda: pa.paged_attention_decode(q, kc, kc, bt, lens_strided), LayoutError,
                                 "seq_lens must be contiguous"),
        "pa: empty k_cache": (lambda: pa.paged_attention_decode(q, kc[:0], kc[:0], bt, lens), ShapeError, "no elements"),
        "pa: max_context_len negative": (lambda: pa.paged_attention_decode(q, kc, kc, bt, lens, max_context_len=-1),
                                         ArgumentError, "at least 0"),
        "pa: max_context_len 1.5": (lambda: pa.paged_attention_decode(q, kc, kc, bt, lens, max_context_len=1.5),
                                    ArgumentError, "must be an integer"),
        "pa: scale nan": (lambda: pa.paged_attention_decode(q, kc, kc, bt, lens, scale=float("nan")), ArgumentError,
                          "scale"),
        "mqa: context_lens strided": (lambda: mqa.paged_mqa_logits(mq, mkv, mw, lens_strided, bt, 32), LayoutError,
                                      "context_lens must be contiguous"),
        "mqa: empty kv_cache": (lambda: mqa.paged_mqa_logits(mq, mkv[:0], mw, lens, bt, 32), ShapeError, "no elements"),
        "mqa: max_model_len 1.5": (lambda: mqa.paged_mqa_logits(mq, mkv, mw, lens, bt, 1.5), ArgumentError,
                                   "must be an integer"),
        "moe: sorted_token_ids strided": (lambda: moe.moe_gemm_stage1(x, w, ids_strided, eids, npad, 2), LayoutError,
                                          "sorted_token_ids must be contiguous"),
        "moe: empty w1": (lambda: moe.moe_gemm_stage1(x, w[:0], ids, eids, npad, 2), ShapeError, "no elements"),
        "moe: topk 1.5": (lambda: moe.moe_gemm_stage1(x, w, ids, eids, npad, 1.5), ArgumentError,
                          "topk must be an integer"),
        "moe: split_k 2.0": (lambda: moe.moe_gemm_stage1(x, w, ids, eids, npad, 2, split_k=2.0), ArgumentError,
                             "split_k must be an integer"),
        "moe: split_k over K // block_k": (lambda: moe.moe_gemm_stage1(x, w, ids, eids, npad, 2, split_k=3),
                                           ArgumentError, "K // block_k"),
        "moe: split_k over 64": (lambda: moe.moe_gemm_stage1(x, w, ids, eids, npad, 2, split_k=65), ArgumentError,
                                 "more than 64"),
        "moe: bad activation": (lambda: moe.moe_gemm_stage1(x, w, ids, eids, npad, 2, activation="relu"), ConfigError,
                                "activation"),
    }


SEED_BAD = list(_seed_bad_cases())


@pytest.mark.parametrize("case", SEED_BAD)
def test_seed_op_bad_input_is_a_specific_error(case):
    fn, kind, match = _seed_bad_cases()[case]
    with pytest.raises(kind, match=match):
        fn()
    assert jitkern.stats()["compiles"] == 0  # rejected before anything is built
