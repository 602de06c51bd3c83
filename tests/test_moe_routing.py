"""moe_topk_softmax and moe_combine: a MoE layer's routing (softmax + top-k + renormalise) and its
weighted sum over the top-k expert outputs, each one Triton kernel, against the torch references
under Triton's interpreter; routes chain into moe_align; bad arguments are refused."""
import pytest
import torch

import jitkern
from conftest import requires_gpu
from jitkern.errors import ArgumentError, DTypeError, LayoutError, ShapeError
from jitkern.library import moe_align as ma
from jitkern.library import moe_combine as mc
from jitkern.library import moe_topk_softmax as ts


def _logits(tokens, experts, dtype=torch.float32, seed=0, device="cpu"):
    """Random logits without ties (torch.topk orders ties as it likes): fp32 normal, 16-bit ones a
    permutation per row of distinct multiples of 1/16, exact in bf16 and fp16 for up to 512 experts."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.float32:
        x = torch.randn(tokens, experts, generator=g) * 2
    else:
        x = torch.stack([torch.randperm(experts, generator=g) for _ in range(tokens)]).reshape(tokens, experts)
        x = (x - experts // 2) / 16
    return x.to(dtype).to(device)


def _check_routes(got, want, topk, tokens):
    (w, i), (rw, ri) = got, want
    assert w.shape == (tokens, topk) and w.dtype == torch.float32 and w.is_contiguous()
    assert i.shape == (tokens, topk) and i.is_contiguous()
    assert torch.equal(i.long(), ri.long()), (i, ri)
    torch.testing.assert_close(w, rw, rtol=2e-6, atol=1e-7)


# ---- moe_topk_softmax ---------------------------------------------------------------------------
@pytest.mark.parametrize("tokens,experts,topk", [
    (37, 8, 2), (1, 8, 2),
    (37, 5, 3),   # experts not a power of two: padded columns are never picked
    (37, 64, 6),
    (1, 256, 8), (37, 256, 8),
    (20, 512, 16),  # the largest block and topk
    (4, 3, 3),    # topk == experts
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("renormalize", [True, False])
def test_topk_softmax_matches_reference(tokens, experts, topk, dtype, renormalize):
    x = _logits(tokens, experts, dtype, seed=tokens + experts)
    got = jitkern.ops.moe_topk_softmax(x, topk, renormalize)
    assert got[1].dtype == torch.int32
    _check_routes(got, ts.reference(x, topk, renormalize), topk, tokens)
    if renormalize:
        torch.testing.assert_close(got[0].sum(-1), torch.ones(tokens), rtol=1e-6, atol=1e-6)


def test_topk_softmax_ties_go_to_the_lower_expert():
    x = torch.tensor([[1.0, 3.0, 1.0, 3.0, 0.5, 3.0], [0.0] * 6], dtype=torch.bfloat16)
    w, i = jitkern.ops.moe_topk_softmax(x, 4, False)
    assert i.tolist() == [[1, 3, 5, 0], [0, 1, 2, 3]]
    p = torch.softmax(x.float(), -1)
    torch.testing.assert_close(w, torch.gather(p, 1, i.long()), rtol=1e-6, atol=0)


def test_topk_softmax_fp16_and_strided_logits():
    base = _logits(19, 80, torch.float16, seed=3)
    x = base[:, 8:72]  # 64 experts, row stride 80: a view, not a copy
    assert x.stride() == (80, 1)
    _check_routes(jitkern.ops.moe_topk_softmax(x, 4), ts.reference(x, 4), 4, 19)


def test_topk_softmax_zero_tokens_launches_nothing(launches):
    x = torch.empty(0, 8)
    w, i = jitkern.ops.moe_topk_softmax(x, 2)
    assert w.shape == (0, 2) and i.shape == (0, 2) and launches == []


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_topk_softmax_fills_given_outputs(id_dtype):
    x = _logits(23, 16, torch.bfloat16, seed=7)
    w, i = torch.full((23, 3), -5.0), torch.full((23, 3), -5, dtype=id_dtype)
    got = jitkern.ops.moe_topk_softmax(x, 3, False, topk_weights=w, topk_ids=i)
    assert got[0] is w and got[1] is i and i.dtype == id_dtype
    _check_routes(got, ts.reference(x, 3, False), 3, 23)
    w2, i2 = jitkern.ops.moe_topk_softmax(x, 3, topk_ids=torch.empty(23, 3, dtype=id_dtype))  # weights allocated
    assert i2.dtype == id_dtype
    _check_routes((w2, i2), ts.reference(x, 3), 3, 23)


def test_topk_softmax_bad_arguments_are_refused():
    x = _logits(4, 8)
    with pytest.raises(ArgumentError, match="topk=9"):
        jitkern.ops.moe_topk_softmax(x, 9)
    with pytest.raises(ArgumentError, match="topk=17"):
        jitkern.ops.moe_topk_softmax(_logits(4, 32), 17)
    with pytest.raises(ArgumentError, match="at least 1"):
        jitkern.ops.moe_topk_softmax(x, 0)
    with pytest.raises(ArgumentError, match="integer"):
        jitkern.ops.moe_topk_softmax(x, 2.0)
    with pytest.raises(DTypeError, match="logits"):
        jitkern.ops.moe_topk_softmax(x.to(torch.int32), 2)
    with pytest.raises(ShapeError, match="dimension"):
        jitkern.ops.moe_topk_softmax(x[0], 2)
    with pytest.raises(ShapeError, match="513 experts"):
        jitkern.ops.moe_topk_softmax(_logits(2, 513), 2)
    with pytest.raises(LayoutError, match="logits"):
        jitkern.ops.moe_topk_softmax(_logits(8, 4).t(), 2)
    with pytest.raises(DTypeError, match="topk_weights"):
        jitkern.ops.moe_topk_softmax(x, 2, topk_weights=torch.empty(4, 2, dtype=torch.bfloat16))
    with pytest.raises(DTypeError, match="topk_ids"):
        jitkern.ops.moe_topk_softmax(x, 2, topk_ids=torch.empty(4, 2, dtype=torch.int16))
    with pytest.raises(ShapeError, match="topk_ids"):
        jitkern.ops.moe_topk_softmax(x, 2, topk_ids=torch.empty(4, 3, dtype=torch.int32))
    with pytest.raises(LayoutError, match="topk_weights"):
        jitkern.ops.moe_topk_softmax(x, 2, topk_weights=torch.empty(2, 4).t())


# ---- moe_combine --------------------------------------------------------------------------------
def _pairs(tokens, topk, hidden, dtype, w_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(tokens * topk, hidden, generator=g).to(dtype)
    w = torch.softmax(torch.randn(tokens, topk, generator=g), -1).to(w_dtype)
    return y, w


@pytest.mark.parametrize("tokens,topk,hidden", [
    (7, 1, 64), (7, 2, 1000),  # hidden not a multiple of the block (nor of 16)
    (5, 8, 1040),              # aligned rows, a partial last block
    (3, 2, 4096), (1, 8, 300),
    (2, 20, 96),               # topk beyond one 16-row step
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_combine_matches_reference(tokens, topk, hidden, dtype):
    y, w = _pairs(tokens, topk, hidden, dtype, seed=hidden)
    out = jitkern.ops.moe_combine(y, w)
    assert out.shape == (tokens, hidden) and out.dtype == dtype
    tol = {} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(out, mc.reference(y, w), **tol)


def test_combine_weights_in_y_dtype_strided_y_and_given_out():
    base, w = _pairs(6, 2, 160, torch.bfloat16, w_dtype=torch.bfloat16, seed=4)
    y = base[:, :128]  # row stride 160
    out = torch.full((6, 128), 7.0, dtype=torch.bfloat16)
    assert jitkern.ops.moe_combine(y, w, out) is out
    torch.testing.assert_close(out, mc.reference(y, w))


def test_combine_zero_tokens_is_a_no_op(launches):
    out = jitkern.ops.moe_combine(torch.empty(0, 64, dtype=torch.bfloat16), torch.empty(0, 2))
    assert out.shape == (0, 64) and out.dtype == torch.bfloat16 and launches == []


def test_combine_bad_arguments_are_refused():
    y, w = _pairs(4, 2, 64, torch.bfloat16)
    with pytest.raises(ShapeError, match="tokens \\* topk"):
        jitkern.ops.moe_combine(y[:7], w)
    with pytest.raises(DTypeError, match="topk_weights"):
        jitkern.ops.moe_combine(y, w.half())
    with pytest.raises(DTypeError, match="y"):
        jitkern.ops.moe_combine(y.to(torch.int32), w)
    with pytest.raises(DTypeError, match="out"):
        jitkern.ops.moe_combine(y, w, torch.empty(4, 64))
    with pytest.raises(ShapeError, match="out"):
        jitkern.ops.moe_combine(y, w, torch.empty(4, 32, dtype=torch.bfloat16))
    with pytest.raises(LayoutError, match="topk_weights"):
        jitkern.ops.moe_combine(y, torch.empty(2, 4).t())
    with pytest.raises(ShapeError, match="dimension"):
        jitkern.ops.moe_combine(y.view(4, 2, 64), w)


# ---- chained: route, sort, combine --------------------------------------------------------------
def test_routes_feed_moe_align_and_combine_like_the_references():
    tokens, experts, topk, hidden = 29, 8, 2, 96
    x = _logits(tokens, experts, torch.bfloat16, seed=11)
    w, ids = jitkern.ops.moe_topk_softmax(x, topk)
    rw, rids = ts.reference(x, topk)
    tables = jitkern.ops.moe_align(ids, experts, 16)
    for a, b in zip(tables, ma.reference(rids, experts, 16)):
        assert torch.equal(a, b)
    ids64 = jitkern.ops.moe_topk_softmax(x, topk, topk_ids=torch.empty(tokens, topk, dtype=torch.int64))[1]
    assert all(torch.equal(a, b) for a, b in zip(jitkern.ops.moe_align(ids64, experts, 16), tables))
    y = torch.randn(tokens * topk, hidden).to(torch.bfloat16)  # per pair: its expert's output
    torch.testing.assert_close(jitkern.ops.moe_combine(y, w), mc.reference(y, rw))


# ---- GPU, realistic sizes -----------------------------------------------------------------------
@requires_gpu
def test_topk_softmax_on_gpu_at_prefill_size():
    for experts, topk in ((8, 2), (128, 8)):
        for dtype in (torch.bfloat16, torch.float32):
            x = _logits(4096, experts, dtype, seed=experts, device="cuda")
            for renormalize in (True, False):
                _check_routes(jitkern.ops.moe_topk_softmax(x, topk, renormalize),
                              ts.reference(x, topk, renormalize), topk, 4096)


@requires_gpu
def test_combine_on_gpu_at_prefill_size():
    y, w = _pairs(128, 2, 4096, torch.bfloat16)
    y, w = y.cuda(), w.cuda()
    torch.testing.assert_close(jitkern.ops.moe_combine(y, w), mc.reference(y, w))
