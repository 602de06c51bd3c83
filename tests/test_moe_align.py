"""moe_align: the sorted pair tables of moe_gemm_stage1, built by one Triton program, against the torch
reference (bincount + stable argsort) under Triton's interpreter; the tables feed moe_gemm_stage1 to
the same result as the reference's; bad arguments and out-of-range expert ids are refused."""
import pytest
import torch

import jitkern
from conftest import requires_gpu
from jitkern.errors import ArgumentError, DTypeError, ShapeError, TableError
from jitkern.library import moe_align as ma
from jitkern.library import moe_gemm_stage1 as moe


def _routes(tokens, experts, topk, seed=0, dtype=torch.int64, skew=False):
    g = torch.Generator().manual_seed(seed)
    if skew:  # most pairs on one expert: runs of several blocks, and experts with none
        ids = torch.stack([torch.cat([torch.tensor([0]), 1 + torch.randperm(experts - 1, generator=g)[:topk - 1]])
                           for _ in range(tokens)])
    else:
        ids = torch.stack([torch.randperm(experts, generator=g)[:topk] for _ in range(tokens)])
    return ids.to(dtype).reshape(tokens, topk)


@pytest.mark.parametrize("tokens,experts,topk,align,dtype,skew", [
    (1, 8, 2, 16, torch.int64, False),
    (37, 8, 2, 16, torch.int32, False),
    (128, 8, 2, 32, torch.int64, False),   # 256 pairs: one step of the kernel's loops (512 a step for 8 bins)
    (300, 8, 2, 32, torch.int32, True),    # two steps, the running counts carried from the first
    (100, 32, 4, 16, torch.int64, False),  # 32 bins: 128 pairs a step, four steps
    (100, 5, 3, 16, torch.int64, True),    # experts not a power of two; a run of many blocks
    (70, 256, 8, 64, torch.int32, False),  # DeepSeek-sized expert count
    (3, 4, 1, 1, torch.int64, False),      # no padding at all
    (0, 8, 2, 16, torch.int64, False),     # an empty step: every position is padding, nothing used
])
def test_tables_match_reference(tokens, experts, topk, align, dtype, skew):
    tid = _routes(tokens, experts, topk, dtype=dtype, skew=skew) if tokens else torch.empty(0, topk, dtype=dtype)
    got = jitkern.ops.moe_align(tid, experts, align)
    want = ma.reference(tid, experts, align)
    assert got[0].shape == (ma.sorted_size(tokens * topk, experts, align),)
    for a, b, name in zip(got, want, ("sorted_token_ids", "expert_ids", "num_tokens_post_padded")):
        assert a.dtype == torch.int32 and torch.equal(a, b), (name, a, b)


def test_given_outputs_are_filled_and_returned():
    tid = _routes(20, 8, 2)
    want = ma.reference(tid, 8, 16)
    outs = tuple(torch.full_like(w, -7) for w in want)
    got = jitkern.ops.moe_align(tid, 8, 16, *outs)
    assert all(g is o for g, o in zip(got, outs))
    assert all(torch.equal(o, w) for o, w in zip(outs, want))


def test_tables_drive_moe_gemm_stage1_like_the_reference():
    tokens, experts, topk, hidden, n = 24, 4, 2, 64, 32
    g = torch.Generator().manual_seed(5)
    x = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16)
    w1 = (torch.randn(experts, 2 * n, hidden, generator=g) / 8).to(torch.bfloat16)
    tid = _routes(tokens, experts, topk, seed=5)
    tables = jitkern.ops.moe_align(tid, experts, 16)
    y = jitkern.ops.moe_gemm_stage1(x, w1, *tables, topk)
    ref = moe.reference(x, w1, *ma.reference(tid, experts, 16), topk)
    torch.testing.assert_close(y.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_bad_arguments_are_refused():
    tid = _routes(4, 8, 2)
    with pytest.raises(DTypeError):
        jitkern.ops.moe_align(tid.float(), 8, 16)
    with pytest.raises(ArgumentError, match="512"):
        jitkern.ops.moe_align(tid, 1000, 16)
    with pytest.raises(ArgumentError):
        jitkern.ops.moe_align(tid, 8, 0)
    size = ma.sorted_size(8, 8, 16)
    with pytest.raises(ShapeError, match="sorted_token_ids"):
        jitkern.ops.moe_align(tid, 8, 16, torch.empty(size - 1, dtype=torch.int32))


def test_out_of_range_expert_ids_raise_under_debug_checks(monkeypatch):
    monkeypatch.setenv("JITKERN_DEBUG", "checks")
    jitkern.reset()
    tid = _routes(4, 8, 2)
    tid[2, 1] = 8
    with pytest.raises(TableError, match=r"topk_ids\[2\]\[1\] = 8"):
        jitkern.ops.moe_align(tid, 8, 16)


@requires_gpu
def test_tables_match_reference_on_gpu_at_prefill_and_decode_sizes():
    for tokens, experts, topk, align in ((1, 8, 2, 16), (128, 8, 2, 32), (8192, 256, 8, 64), (4096, 128, 8, 16)):
        tid = _routes(tokens, experts, topk, seed=tokens).cuda()
        got = jitkern.ops.moe_align(tid, experts, align)
        for a, b in zip(got, ma.reference(tid, experts, align)):
            assert torch.equal(a, b), (tokens, experts, topk, align)
