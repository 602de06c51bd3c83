"""Buffer contracts: sizes come from the kernel's declaration and real capacities; a caller's
out=/workspace/scratch tensor is checked before launch with an error naming the buffer and sizes."""
import pytest
import torch

from jitkern import contracts, redzone
from jitkern.contracts import Buffer, Contract
from jitkern.errors import BufferError, SpecError
from jitkern.library import gather_kv_cache as gkv
from jitkern.library import moe_gemm_stage1 as moe
from jitkern.library import paged_attention_decode as pa
from jitkern.library import paged_mqa_logits as mqa

GiB = 1 << 30


def test_layout_and_nbytes_follow_dims():
    c = Contract("toy", (Buffer("out", lambda d: (d.m, d.n), lambda d: d.dtype),
                         Buffer("ws", lambda d: (d.m * 4,), torch.float32, role="workspace", init="zero")))
    assert c.layout(m=3, n=5, dtype=torch.bfloat16) == {"out": ((3, 5), torch.bfloat16), "ws": ((12,), torch.float32)}
    assert c.nbytes(m=3, n=5, dtype=torch.bfloat16) == {"out": 30, "ws": 48}


def test_malformed_contract_is_a_spec_error():
    with pytest.raises(SpecError, match="role"):
        Buffer("x", lambda d: (1,), torch.float32, role="input")
    with pytest.raises(SpecError, match="duplicate"):
        Contract("toy", (Buffer("x", lambda d: (1,), torch.float32), Buffer("x", lambda d: (1,), torch.float32)))
    c = Contract("toy", (Buffer("out", lambda d: (1,), torch.float32),))
    with pytest.raises(SpecError, match="no buffer 'outt'"):
        c.prepare("cpu", {}, outt=torch.empty(1))


def test_seed000_workspace_sized_by_kv_capacity_not_model_max():
    # SGLang/aiter: max context 131072 but the KV cache holds ~25K tokens; the workspace was sized
    # from 131072 (16 GiB, OOM). The contract uses min(max_context_len, KV-cache tokens).
    # (the seed's platform, gfx942: partitions of 512 tokens; sm_90 ships 2048-token partitions)
    args = dict(batch=256, num_heads=128, head_dim=128, arch="gfx942")
    assert pa.tiles("gfx942")["partition"] == 512
    real = pa.workspace_nbytes(**args, max_context_len=131072, kv_cache_tokens=25000)
    theoretical = pa.workspace_nbytes(**args, max_context_len=131072, kv_cache_tokens=131072)
    parts = -(-25000 // 512)
    assert real == 256 * 128 * parts * (128 + 2) * 4
    assert theoretical / real == pytest.approx(256 / parts, rel=1e-9)  # 256 partitions vs 49
    # the seed's 16 GiB -> 3 GiB is the same ratio as its 131K -> 25K tokens
    assert theoretical / real == pytest.approx(131072 / 25000, rel=0.02)


def test_seed004_splitk_scratch_sized_from_sorted_size():
    # aiter: Python allocated tmp_out as (tokens, topk, N); the kernel writes (sorted_size, N) x 2.
    tokens, topk, n, experts, align_m = 4, 8, 32, 64, 16
    sorted_size = -(-(tokens * topk + experts * (align_m - 1)) // align_m) * align_m
    lay = moe.CONTRACT.layout(num_pairs=tokens * topk, n=n, dtype=torch.bfloat16, split_k=2, sorted_size=sorted_size,
                              gated=True)
    assert lay["scratch"] == ((2, sorted_size, 2 * n), torch.float32)
    assert lay["out"] == ((tokens * topk, n), torch.bfloat16)
    # activation "none" (a plain grouped GEMM): one partial per output column
    plain = moe.CONTRACT.layout(num_pairs=tokens * topk, n=n, dtype=torch.bfloat16, split_k=2,
                                sorted_size=sorted_size, gated=False)
    assert plain["scratch"] == ((2, sorted_size, n), torch.float32) and plain["out"] == lay["out"]
    seed_way = torch.empty(tokens, topk, n, dtype=torch.float32)
    dims = dict(num_pairs=tokens * topk, n=n, dtype=torch.bfloat16, split_k=2, sorted_size=sorted_size, gated=True)
    with pytest.raises(BufferError) as e:
        moe.CONTRACT.prepare("cpu", dims, scratch=seed_way)
    msg = str(e.value)
    assert "'scratch'" in msg and "too small" in msg
    assert f"{tokens * topk * n} elements" in msg and f"{2 * sorted_size * 2 * n}" in msg
    assert sorted_size * 2 * 2 / (tokens * topk) >= 16  # the seed's 16x


def test_given_output_checked_before_launch(monkeypatch):
    dims = dict(num_tokens=5, entry=(2, 8), dtype=torch.bfloat16)
    with pytest.raises(BufferError, match=r"'out' has dtype float32; the kernel writes bfloat16"):
        gkv.CONTRACT.prepare("cpu", dims, out=torch.empty(5, 2, 8))
    with pytest.raises(BufferError, match=r"'out' has shape \(4, 2, 8\) \(too small\); expected \(5, 2, 8\)"):
        gkv.CONTRACT.prepare("cpu", dims, out=torch.empty(4, 2, 8, dtype=torch.bfloat16))
    with pytest.raises(BufferError, match="is on meta"):
        gkv.CONTRACT.prepare("cpu", dims, out=torch.empty(5, 2, 8, dtype=torch.bfloat16, device="meta"))
    with pytest.raises(BufferError, match="contiguous"):
        gkv.CONTRACT.prepare("cpu", dims, out=torch.empty(2, 8, 5, dtype=torch.bfloat16).permute(2, 0, 1))
    with pytest.raises(BufferError, match="torch.Tensor"):
        gkv.CONTRACT.prepare("cpu", dims, out=[0] * 80)


def test_a_passed_output_is_not_checked_again_and_every_other_still_is(monkeypatch):
    """Off redzone mode the verdict on a caller's output is remembered per (dims, device, shape, strides,
    dtype, tensor device): the same kind of tensor again skips check(); anything else is checked."""
    c = Contract("toy_memo", (Buffer("out", lambda d: (d.n, 8), torch.bfloat16),))
    calls = []
    real = contracts.check
    monkeypatch.setattr(contracts, "check", lambda *a: calls.append(a[2]) or real(*a))
    good = torch.empty(4, 8, dtype=torch.bfloat16)
    assert c.prepare("cpu", dict(n=4), out=good)["out"] is good
    other = torch.empty(4, 8, dtype=torch.bfloat16)
    assert c.prepare("cpu", dict(n=4), out=other).result("out") is other
    assert len(calls) == 1  # the second output has the first one's metadata
    for bad, why in ((torch.empty(4, 8), "dtype float32"), (torch.empty(8, 4, dtype=torch.bfloat16).t(), "contiguous"),
                     (torch.empty(3, 8, dtype=torch.bfloat16), "too small")):
        with pytest.raises(BufferError, match=why):
            c.prepare("cpu", dict(n=4), out=bad)
    with pytest.raises(BufferError, match="expected \\(5, 8\\)"):  # the dims are part of the verdict
        c.prepare("cpu", dict(n=5), out=good)
    assert len(calls) == 5


def test_op_rejects_bad_out_before_any_compile(cache_dir):
    from jitkern import counters

    before = counters.snapshot()["compiles"]
    q = torch.randn(2, 1, 16, 64, dtype=torch.bfloat16)
    kv = torch.randn(4, 16, 64, dtype=torch.bfloat16)
    bad = torch.empty(2, 31)  # max_model_len 32 rows of 32 needed
    with pytest.raises(BufferError, match="'out'.*expected \\(2, 32\\)"):
        mqa.paged_mqa_logits(q, kv, torch.rand(2, 16), torch.tensor([5, 9], dtype=torch.int32),
                             torch.arange(4, dtype=torch.int32).view(2, 2), 32, out=bad)
    assert counters.snapshot()["compiles"] == before


def test_larger_workspace_is_used_from_its_start_and_zeroed_when_declared():
    c = Contract("toy", (Buffer("ws", lambda d: (2, 3), torch.float32, role="workspace", init="zero"),))
    big = torch.full((10,), 7.0)
    bufs = c.prepare("cpu", {}, ws=big)
    assert bufs["ws"].shape == (2, 3) and bufs["ws"].data_ptr() == big.data_ptr()
    assert torch.equal(big[:6], torch.zeros(6)) and torch.equal(big[6:], torch.full((4,), 7.0))


def test_off_by_default_and_allocations_are_exact(monkeypatch):
    monkeypatch.delenv("JITKERN_DEBUG", raising=False)
    assert not redzone.enabled()
    bufs = mqa.CONTRACT.prepare("cpu", dict(rows=3, max_model_len=40))
    out = bufs["out"]
    assert out.is_contiguous() and out.untyped_storage().nbytes() == 3 * 40 * 4
    bufs.finish("anything")  # no-op
    assert bufs.result("out") is out
    monkeypatch.setenv("JITKERN_DEBUG", "checks, redzone")
    assert redzone.enabled()


def test_every_seed_op_declares_a_contract():
    for mod in (gkv, pa, moe, mqa):
        assert isinstance(mod.SPEC.extra["contract"], contracts.Contract)
        assert mod.SPEC.extra["contract"].op == mod.SPEC.name
