"""JITKERN_DEBUG=checks (implied by redzone): table contents — indices inside the KV cache,
``cu_seq_lens`` consistent with ``num_tokens``, pair ids below the sentinel — are the caller's contract
on the hot path; in this mode the dispatcher checks them on the host before every launch
(``OpSpec.debug_checks``), so a bad table raises ``TableError`` instead of faulting. Off, the check
is not even in the call path. Tiny shapes: numerics run in Triton's interpreter."""
from dataclasses import replace

import pytest
import torch

import jitkern
from jitkern import counters
from jitkern.dispatch import Dispatcher
from jitkern.errors import InputError, TableError
from jitkern.library import gather_kv_cache as gkv
from jitkern.library import moe_gemm_stage1 as moe
from jitkern.library import paged_attention_decode as pa
from jitkern.library import paged_mqa_logits as mqa
from jitkern.library import rms_norm as rn

BIG = 10**8


@pytest.fixture
def checks_on(monkeypatch):
    monkeypatch.setenv("JITKERN_DEBUG", "checks")
    jitkern.reset()


def _paged(n_blocks, page, *tail, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_blocks, page, *tail, generator=g).to(dtype)


def _raises(call, argument, index, value, launches, allowed=None):
    with pytest.raises(TableError) as ei:
        call()
    e = ei.value
    assert (e.argument, e.index, e.value) == (argument, index, value), str(e)
    where = "".join(f"[{i}]" for i in index)
    msg = str(e)
    assert f"{e.op}: {argument}{where} = {value}, expected " in msg and "caller's contract" in msg
    if allowed:
        assert allowed in msg, msg
    assert launches == []  # raised before anything was launched
    return e


# ---- gather_kv_cache -----------------------------------------------------------------------------
def _gkv():
    cache = _paged(12, 16, 2, 8)
    bt = torch.randperm(12, generator=torch.Generator().manual_seed(1)).int().view(3, 4)
    return cache, bt, torch.tensor([0, 20, 20, 53], dtype=torch.int32)


def test_gather_kv_cache_bad_tables_raise_before_launch(checks_on, launches):
    cache, bt, cu = _gkv()
    # cu_seq_lens[-1] = 53 past num_tokens = 40 (the rows of out): was a heap overflow and a segfault
    e = _raises(lambda: gkv.gather_kv_cache(cache, bt, cu, num_tokens=40), "cu_seq_lens", (3,), 53, launches,
                "num_tokens = 40")
    assert e.op == "gather_kv_cache" and isinstance(e, InputError) and isinstance(e, ValueError)
    bad = bt.clone()
    bad[0, 1] = BIG  # read by sequence 0 (20 tokens: blocks 0 and 1)
    _raises(lambda: gkv.gather_kv_cache(cache, bad, cu), "block_table", (0, 1), BIG, launches, "[0, 12)")
    bad[0, 1] = -1
    _raises(lambda: gkv.gather_kv_cache(cache, bad, cu), "block_table", (0, 1), -1, launches)
    _raises(lambda: gkv.gather_kv_cache(cache, bt, torch.tensor([0, 20, 10, 53], dtype=torch.int32)),
            "cu_seq_lens", (2,), 10, launches, "at least cu_seq_lens[1] = 20")
    _raises(lambda: gkv.gather_kv_cache(cache, bt, torch.tensor([3, 20, 20, 53], dtype=torch.int32), num_tokens=53),
            "cu_seq_lens", (0,), 3, launches)
    # sequence 2 is 70 tokens long: more than its 4 blocks x 16 tokens can address
    _raises(lambda: gkv.gather_kv_cache(cache, bt, torch.tensor([0, 20, 20, 90], dtype=torch.int32)),
            "cu_seq_lens", (3,), 90, launches, "block_table.shape[1] = 4 blocks of 16 tokens")
    assert counters.snapshot()["table_checks"] == 6


def test_gather_kv_cache_good_tables_match_reference(checks_on, launches):
    cache, bt, cu = _gkv()
    bt[1, :] = BIG  # sequence 1 is empty and block 3 of sequence 0 is past its length: never read
    bt[0, 3] = -BIG
    y = gkv.gather_kv_cache(cache, bt, cu)
    assert torch.equal(y, gkv.reference(cache, bt, cu))
    y = gkv.gather_kv_cache(cache, bt, cu)  # the settled fast path is checked too
    assert torch.equal(y, gkv.reference(cache, bt, cu))
    assert counters.snapshot()["table_checks"] == 2 and len(launches) == 2


# ---- paged_attention_decode ----------------------------------------------------------------------
def _pa(lens, n_blocks=12, max_blocks=4):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(len(lens), 4, 64, generator=g).bfloat16()
    k, v = _paged(n_blocks, 16, 2, 64, seed=1), _paged(n_blocks, 16, 2, 64, seed=2)
    bt = torch.randint(0, n_blocks, (len(lens), max_blocks), generator=g, dtype=torch.int32)
    return q, k, v, bt, torch.tensor(lens, dtype=torch.int32)


def test_paged_attention_decode_bad_tables_raise_before_launch(checks_on, launches):
    q, k, v, bt, lens = _pa([40, 5])
    bad = bt.clone()
    bad[1, 0] = BIG
    _raises(lambda: pa.paged_attention_decode(q, k, v, bad, lens), "block_tables", (1, 0), BIG, launches, "[0, 12)")
    bad[1, 0] = -7
    _raises(lambda: pa.paged_attention_decode(q, k, v, bad, lens), "block_tables", (1, 0), -7, launches)
    long = torch.tensor([40, 65], dtype=torch.int32)  # 4 blocks x 16 = 64 tokens addressable
    _raises(lambda: pa.paged_attention_decode(q, k, v, bt, long), "seq_lens", (1,), 65, launches, "[0, 64]")
    _raises(lambda: pa.paged_attention_decode(q, k, v, bt, lens, max_context_len=32), "seq_lens", (0,), 40,
            launches, "[0, 32]")
    _raises(lambda: pa.paged_attention_decode(q, k, v, bt, torch.tensor([-1, 5], dtype=torch.int32)),
            "seq_lens", (0,), -1, launches)


def test_paged_attention_decode_good_tables_match_reference(checks_on, launches):
    q, k, v, bt, lens = _pa([40, 5])
    bt[1, 1:] = BIG  # past sequence 1's single block: never read
    y = pa.paged_attention_decode(q, k, v, bt, lens)
    ref = pa.reference(q.float(), k.float(), v.float(), bt.clamp(max=11), lens)
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)
    assert counters.snapshot()["table_checks"] >= 1 and launches


# ---- paged_mqa_logits ----------------------------------------------------------------------------
def _mqa(lens, n_blocks=8, max_blocks=4):
    g = torch.Generator().manual_seed(3)
    b = len(lens)
    q = torch.randn(b, 1, 16, 64, generator=g).bfloat16()
    kv = _paged(n_blocks, 16, 64, seed=4)
    w = torch.randn(b, 16, generator=g)
    bt = torch.randint(0, n_blocks, (b, max_blocks), generator=g, dtype=torch.int32)
    return q, kv, w, torch.tensor(lens, dtype=torch.int32), bt


def test_paged_mqa_logits_bad_tables_raise_before_launch(checks_on, launches):
    q, kv, w, ctx, bt = _mqa([20, 64])
    bad = bt.clone()
    bad[0, 1] = BIG  # sequence 0 reads blocks 0 and 1
    _raises(lambda: mqa.paged_mqa_logits(q, kv, w, ctx, bad, 64), "block_tables", (0, 1), BIG, launches, "[0, 8)")
    _raises(lambda: mqa.paged_mqa_logits(q, kv, w, torch.tensor([20, 65], dtype=torch.int32), bt, 64),
            "context_lens", (1,), 65, launches, "[0, 64]")
    _raises(lambda: mqa.paged_mqa_logits(q, kv, w, torch.tensor([-3, 5], dtype=torch.int32), bt, 64),
            "context_lens", (0,), -3, launches)


def test_paged_mqa_logits_good_tables_match_reference(checks_on, launches):
    q, kv, w, ctx, bt = _mqa([20, 64])
    y = mqa.paged_mqa_logits(q, kv, w, ctx, bt, 64)
    torch.testing.assert_close(y, mqa.reference(q.float(), kv.float(), w, ctx, bt, 64), rtol=2e-2, atol=2e-2)
    assert counters.snapshot()["table_checks"] == 1 and launches


# ---- moe_gemm_stage1 -----------------------------------------------------------------------------
def _moe(tokens=3, k=64, n=16, experts=4, topk=2, align_m=16):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(tokens, k, generator=g).bfloat16()
    w = (torch.randn(experts, 2 * n, k, generator=g) / 8).bfloat16()
    tid = torch.stack([torch.randperm(experts, generator=g)[:topk] for _ in range(tokens)]).int()
    return x, w, *moe.moe_align(tid, experts, align_m), topk


def test_moe_gemm_stage1_bad_tables_raise_before_launch(checks_on, launches):
    x, w, ids, eids, npad, topk = _moe()
    pairs = x.shape[0] * topk
    bad = eids.clone()
    bad[0] = BIG
    _raises(lambda: moe.moe_gemm_stage1(x, w, ids, bad, npad, topk, split_k=1), "expert_ids", (0,), BIG, launches,
            "[0, 4)")
    bad = ids.clone()
    bad[1] = -5  # a negative pair id is "valid" to the kernel: rows x[-5 // topk], out[-5]
    _raises(lambda: moe.moe_gemm_stage1(x, w, bad, eids, npad, topk, split_k=1), "sorted_token_ids", (1,), -5,
            launches, f"padding sentinel tokens * topk = {pairs}")
    bad[1] = pairs + 1  # neither a pair id nor the sentinel
    _raises(lambda: moe.moe_gemm_stage1(x, w, bad, eids, npad, topk, split_k=1), "sorted_token_ids", (1,), pairs + 1,
            launches, f"[0, {pairs}]")
    _raises(lambda: moe.moe_gemm_stage1(x, w, ids, eids, torch.tensor([ids.shape[0] + 16], dtype=torch.int32), topk,
                                        split_k=1), "num_tokens_post_padded", (0,), ids.shape[0] + 16, launches)


def test_moe_gemm_stage1_good_tables_match_reference(checks_on, launches):
    x, w, ids, eids, npad, topk = _moe()
    used = int(npad)
    assert (ids[:used] == x.shape[0] * topk).any()  # the sentinel is accepted
    ids[used:] = -BIG  # past num_tokens_post_padded: never read
    eids[used // 16:] = BIG
    y = moe.moe_gemm_stage1(x, w, ids, eids, npad, topk, split_k=1)
    ref = moe.reference(x.float(), w.float(), ids, eids, npad, topk)
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=3e-2)
    assert counters.snapshot()["table_checks"] == 1 and launches


# ---- the mode: off costs nothing, redzone implies it, read when a signature is decided -------------
def test_off_the_check_is_not_in_the_call_path(monkeypatch, launches):
    monkeypatch.delenv("JITKERN_DEBUG", raising=False)
    jitkern.reset()
    x, w, ids, eids, npad, topk = _moe()
    bad = ids.clone()
    lost = int(ids[1])
    bad[1] = x.shape[0] * topk + 7  # past the sentinel: the kernel takes it for padding (no fault, one row unwritten)
    y = moe.moe_gemm_stage1(x, w, bad, eids, npad, topk, split_k=1)
    keep = torch.arange(y.shape[0]) != lost
    torch.testing.assert_close(y.float()[keep], moe.reference(x.float(), w.float(), bad, eids, npad, topk)[keep],
                               rtol=2e-2, atol=3e-2)
    assert counters.snapshot()["table_checks"] == 0 and launches
    monkeypatch.setenv("JITKERN_DEBUG", "checks")
    jitkern.reset()
    with pytest.raises(TableError, match=r"sorted_token_ids\[1\]"):
        moe.moe_gemm_stage1(x, w, bad, eids, npad, topk, split_k=1)


def test_the_hook_runs_on_every_call_in_the_mode_and_never_off(monkeypatch):
    """Framework level: OpSpec.debug_checks gets a Call on every call (slow and settled fast path)
    with the mode on; off, the memo holds the route's own fast path, nothing in front of it."""
    seen = []

    def hook(call):
        seen.append((call.spec.name, call["eps"], call.arch.name))
    d = Dispatcher(replace(rn.SPEC, debug_checks=hook))
    x, wt = torch.randn(2, 64), torch.ones(64)
    args = lambda eps=1e-6: (x, wt, eps, None, torch.empty_like(x))  # noqa: E731

    monkeypatch.delenv("JITKERN_DEBUG", raising=False)
    for _ in range(3):
        d(*args())
    key = d.key(args())
    assert seen == [] and d._memo[key] is d._routes[key].fast is not None

    monkeypatch.setenv("JITKERN_DEBUG", "checks")
    d = Dispatcher(replace(rn.SPEC, debug_checks=hook))  # a signature decided in the mode
    for eps in (1e-6, 1e-5, 1e-4):
        d(*args(eps))
    assert seen == [("rms_norm", 1e-6, "cpu"), ("rms_norm", 1e-5, "cpu"), ("rms_norm", 1e-4, "cpu")]
    assert d._memo[key] is not d._routes[key].fast and counters.snapshot()["table_checks"] == 3

    def refuse(call):
        raise TableError("rms_norm: refused")
    d = Dispatcher(replace(rn.SPEC, debug_checks=refuse))
    with pytest.raises(TableError, match="refused"):
        d(*args())


def test_redzone_implies_checks(monkeypatch, launches):
    monkeypatch.setenv("JITKERN_DEBUG", "redzone")
    jitkern.reset()
    cache, bt, cu = _gkv()
    _raises(lambda: gkv.gather_kv_cache(cache, bt, cu, num_tokens=40), "cu_seq_lens", (3,), 53, launches)


def test_the_mode_is_read_when_a_signature_is_decided(monkeypatch, launches):
    """Turning the mode on applies to signatures decided afterwards; jitkern.reset() re-decides."""
    monkeypatch.delenv("JITKERN_DEBUG", raising=False)
    jitkern.reset()
    x, w, ids, eids, npad, topk = _moe()
    moe.moe_gemm_stage1(x, w, ids, eids, npad, topk, split_k=1)
    monkeypatch.setenv("JITKERN_DEBUG", "checks")
    moe.moe_gemm_stage1(x, w, ids, eids, npad, topk, split_k=1)
    assert counters.snapshot()["table_checks"] == 0
    jitkern.reset()
    moe.moe_gemm_stage1(x, w, ids, eids, npad, topk, split_k=1)
    assert counters.snapshot()["table_checks"] == 1
