"""prefill_attention: packed variable-length causal/full attention with GQA, against per-sequence SDPA in
fp32 under Triton's interpreter (tiles of 16 there, so a few dozen tokens cover unmasked blocks, the
diagonal and partial last blocks); q/k/v as strided views of one fused QKV tensor; a given ``out``; bad
arguments and broken cu_seqlens tables are refused; a realistic bf16 case on a GPU."""
import math

import pytest
import torch

import jitkern
from conftest import requires_gpu
from jitkern.errors import ArgumentError, DTypeError, LayoutError, ShapeError, TableError
from jitkern.library import prefill_attention as pa


def _cu(lens, device="cpu"):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)


def _qkv(lens, hq, hkv, d, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    n = sum(lens)
    q, k, v = (torch.randn(n, h, d, generator=g).to(device, dtype) for h in (hq, hkv, hkv))
    return q, k, v, _cu(lens, device)


def _sdpa(q, k, v, cu, causal, scale):
    """An independent reference: an explicit fp32 masked softmax per sequence and head."""
    out = torch.zeros(q.shape, dtype=torch.float32)
    group = q.shape[1] // k.shape[1]
    b = cu.tolist()
    for s, e in zip(b[:-1], b[1:]):
        n = e - s
        mask = torch.ones(n, n, dtype=torch.bool).tril() if causal else torch.ones(n, n, dtype=torch.bool)
        for h in range(q.shape[1]):
            sc = q[s:e, h].float() @ k[s:e, h // group].float().T * scale
            p = torch.softmax(sc.masked_fill(~mask, float("-inf")), dim=-1)
            out[s:e, h] = p @ v[s:e, h // group].float()
    return out


def _tol(dtype):
    return dict(atol=2e-2, rtol=2e-2) if dtype != torch.float32 else dict(atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lens,hq,hkv,d,causal,dtype", [
    ([40], 2, 2, 16, True, torch.float32),                  # one sequence, several key blocks
    ([37, 1, 16, 5], 4, 1, 32, True, torch.float32),        # unequal lengths, length 1, partial blocks; GQA 4:1
    ([37, 1, 16, 5], 4, 1, 32, False, torch.float32),       # the same without the causal mask
    ([23, 48], 2, 2, 64, False, torch.bfloat16),            # hq == hkv
    ([33, 2, 17], 4, 2, 16, True, torch.bfloat16),
    ([19, 8], 2, 1, 16, True, torch.float16),
])
def test_matches_reference(lens, hq, hkv, d, causal, dtype):
    q, k, v, cu = _qkv(lens, hq, hkv, d, dtype)
    scale = 1.0 / math.sqrt(d)
    got = jitkern.ops.prefill_attention(q, k, v, cu, max(lens), scale, causal)
    assert got.shape == q.shape and got.dtype == dtype
    torch.testing.assert_close(got.float(), _sdpa(q, k, v, cu, causal, scale), **_tol(dtype))
    torch.testing.assert_close(got, pa.reference(q, k, v, cu, max(lens), scale, causal), **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_qkv_views_given_out_and_a_loose_max_seqlen(dtype):
    """q/k/v as views of one [tokens, (hq + 2 hkv) * d] projection (token stride (hq + 2 hkv) * d), read in
    place; the given ``out`` is filled and returned; a max_seqlen above the longest sequence is fine."""
    lens, hq, hkv, d = [21, 3, 34], 4, 2, 16
    n = sum(lens)
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(n, (hq + 2 * hkv) * d, generator=g).to(dtype)
    q = qkv[:, :hq * d].view(n, hq, d)
    k = qkv[:, hq * d:(hq + hkv) * d].view(n, hkv, d)
    v = qkv[:, (hq + hkv) * d:].view(n, hkv, d)
    assert q.stride(0) == (hq + 2 * hkv) * d and not q.is_contiguous()
    cu = _cu(lens)
    out = torch.full((n, hq, d), 7.0, dtype=dtype)
    got = jitkern.ops.prefill_attention(q, k, v, cu, 50, 0.3, True, out)
    assert got is out
    torch.testing.assert_close(out.float(), _sdpa(q, k, v, cu, True, 0.3), **_tol(dtype))
    # the same with contiguous copies (the unaligned-stride config is not needed for these views)
    again = jitkern.ops.prefill_attention(q.contiguous(), k.contiguous(), v.contiguous(), cu, 50, 0.3, True)
    torch.testing.assert_close(again, out, atol=0, rtol=0)


def test_unaligned_strides_and_empty_sequences():
    """Strides that are not multiples of 16 elements take the unaligned build; empty sequences
    (repeated offsets) and tokens past cu_seqlens[-1] are left alone."""
    lens, hq, hkv, d = [0, 18, 0, 5], 2, 1, 16
    n = sum(lens) + 3  # 3 tokens past the last sequence
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(n, h, d + 4, generator=g)[:, :, :d] for h in (hq, hkv, hkv))  # head stride 20
    assert q.stride(1) % 16 and k.stride(0) % 16
    cu = _cu(lens)
    out = torch.full((n, hq, d), 7.0)
    jitkern.ops.prefill_attention(q, k, v, cu, 18, 0.25, True, out)
    m = int(cu[-1])
    torch.testing.assert_close(out[:m], _sdpa(q, k, v, cu, True, 0.25)[:m], atol=1e-5, rtol=1e-5)
    assert bool((out[m:] == 7.0).all())


def test_scale_changes_per_call_without_a_new_plan():
    q, k, v, cu = _qkv([20], 2, 2, 16)
    for scale in (0.1, 1.0):
        got = jitkern.ops.prefill_attention(q, k, v, cu, 20, scale)
        torch.testing.assert_close(got, _sdpa(q, k, v, cu, True, scale), atol=1e-5, rtol=1e-5)


def test_tiles_per_arch_fit_their_class():
    assert pa.tiles("sm_90", "bf16", 128)["block_m"] == 128
    for arch in ("gfx942", "gfx950"):
        t = pa.tiles(arch, "bf16", 256)
        assert t["block_m"] * t["block_n"] <= 64 * 64 and t["num_warps"] <= 8
    assert pa.tiles("cpu", "fp32", 64)["block_m"] == 16
    names = {c.p["head_dim"] for c in pa.configs(jitkern.arch.get("gfx942"))}
    assert names == set(pa.HEAD_DIMS)


def test_bad_arguments_are_refused():
    q, k, v, cu = _qkv([8, 4], 4, 2, 16)
    f = jitkern.ops.prefill_attention
    with pytest.raises(DTypeError, match="k has dtype"):
        f(q, k.half(), v, cu, 8, 0.25)
    with pytest.raises(DTypeError, match="q has dtype"):
        f(q.double(), k.double(), v.double(), cu, 8, 0.25)
    with pytest.raises(ShapeError, match="multiple of num_kv_heads"):
        q3, k3, v3, _ = _qkv([8, 4], 3, 2, 16)
        f(q3, k3, v3, cu, 8, 0.25)
    with pytest.raises(ShapeError, match="head_dim 24"):
        q24, k24, v24, _ = _qkv([8, 4], 4, 2, 24)
        f(q24, k24, v24, cu, 8, 0.25)
    with pytest.raises(DTypeError, match="cu_seqlens"):
        f(q, k, v, cu.long(), 8, 0.25)
    with pytest.raises(ShapeError, match="k has shape"):
        f(q, k[:5], v[:5], cu, 8, 0.25)
    with pytest.raises(LayoutError, match="last dimension"):
        f(q.transpose(0, 2).contiguous().transpose(0, 2), k, v, cu, 8, 0.25)
    with pytest.raises(ArgumentError, match="max_seqlen"):
        f(q, k, v, cu, 8.0, 0.25)
    with pytest.raises(ArgumentError, match="causal"):
        f(q, k, v, cu, 8, 0.25, 1)
    with pytest.raises(ArgumentError, match="scale"):
        f(q, k, v, cu, 8, float("nan"))
    with pytest.raises(ShapeError, match="out has shape"):
        f(q, k, v, cu, 8, 0.25, True, torch.empty(12, 4, 8))


def test_broken_cu_seqlens_raise_under_debug_checks(monkeypatch):
    monkeypatch.setenv("JITKERN_DEBUG", "checks")
    jitkern.reset()
    q, k, v, cu = _qkv([8, 4], 2, 2, 16)
    jitkern.ops.prefill_attention(q, k, v, cu, 8, 0.25)  # a good table passes
    with pytest.raises(TableError, match="max_seqlen"):
        jitkern.ops.prefill_attention(q, k, v, cu, 4, 0.25)
    with pytest.raises(TableError, match="cu_seqlens"):
        jitkern.ops.prefill_attention(q, k, v, torch.tensor([0, 9, 8], dtype=torch.int32), 9, 0.25)
    with pytest.raises(TableError, match="token count"):
        jitkern.ops.prefill_attention(q, k, v, torch.tensor([0, 8, 13], dtype=torch.int32), 8, 0.25)


@requires_gpu
@pytest.mark.parametrize("causal", [True, False])
def test_realistic_size_on_gpu_against_sdpa(causal):
    lens, hq, hkv, d = [512, 77, 300, 129], 32, 8, 128
    q, k, v, cu = _qkv(lens, hq, hkv, d, torch.bfloat16, device="cuda")
    scale = d ** -0.5
    got = jitkern.ops.prefill_attention(q, k, v, cu, max(lens), scale, causal)
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        want = torch.nn.functional.scaled_dot_product_attention(
            q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1), is_causal=causal,
            scale=scale, enable_gqa=True).transpose(0, 1)
        torch.testing.assert_close(got[s:e], want, atol=2e-2, rtol=2e-2)
    # CUDA-graph capture: no host sync inside the op
    out = torch.empty_like(q)
    jitkern.ops.prefill_attention(q, k, v, cu, max(lens), scale, causal, out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        jitkern.ops.prefill_attention(q, k, v, cu, max(lens), scale, causal, out)
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, got, atol=0, rtol=0)
