"""The seeds' kernels as ops: each against its PyTorch reference at the edge that broke it, empty
work without a launch, and (on the H100) at decode shapes. CPU runs use Triton's interpreter with
tiny shapes; one cross-compile per op checks the real compilers accept the templates."""
import pytest
import torch

from conftest import requires_gpu
import jitkern
from jitkern import arch, constraints, counters
from jitkern.build import get_entry
from jitkern.plan import plan
from jitkern.errors import ConfigError
from jitkern.library import gather_kv_cache as gkv
from jitkern.library import moe_gemm_stage1 as moe
from jitkern.library import paged_attention_decode as pa
from jitkern.library import paged_mqa_logits as mqa


def _paged(n_blocks, page, *tail, dtype=torch.bfloat16, device="cpu", seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(n_blocks, page, *tail, generator=g).to(dtype).to(device)


# ---- gather_kv_cache -----------------------------------------------------------------------------
def test_gather_kv_cache_matches_reference_with_empty_sequence():
    cache = _paged(12, 16, 2, 8)
    bt = torch.randperm(12, generator=torch.Generator().manual_seed(1)).int().view(3, 4)
    cu = torch.tensor([0, 20, 20, 53], dtype=torch.int32)  # middle sequence has no tokens
    y = gkv.gather_kv_cache(cache, bt, cu)
    assert y.shape == (53, 2, 8)
    assert torch.equal(y, gkv.reference(cache, bt, cu))
    assert [c.p.get("flat") for c in jitkern.dispatcher(gkv.SPEC).active_configs()] == [True]  # page runs


def test_gather_kv_cache_strided_token_rows_take_the_per_token_kernel():
    """Token rows with a stride larger than the entry (e.g. K of an interleaved K/V cache) cannot be
    copied as page runs: the per-token kernel gathers them; small tiles make programs loop."""
    cache = _paged(12, 16, 2, 24)[:, :, 0]  # [blocks, page, 24], token stride 48
    bt = torch.randperm(12, generator=torch.Generator().manual_seed(2)).int().view(3, 4)
    cu = torch.tensor([0, 33, 33, 80], dtype=torch.int32)
    y = gkv.gather_kv_cache(cache, bt, cu)
    assert torch.equal(y, gkv.reference(cache, bt, cu))
    assert [c.p.get("flat") for c in jitkern.dispatcher(gkv.SPEC).active_configs()] == [None]


def test_gather_kv_cache_zero_tokens_is_valid_and_launches_nothing(launches):
    cache = _paged(4, 16, 8)
    bt = torch.zeros(2, 2, dtype=torch.int32)
    before = counters.snapshot()["compiles"]
    y = gkv.gather_kv_cache(cache, bt, torch.zeros(3, dtype=torch.int32))
    assert y.shape == (0, 8) and y.dtype == cache.dtype
    out = torch.empty(0, 8, dtype=cache.dtype)
    assert gkv.gather_kv_cache(cache, bt, torch.zeros(3, dtype=torch.int32), out=out) is out
    assert launches == [] and counters.snapshot()["compiles"] == before


# ---- paged_attention_decode -----------------------------------------------------------------------
def _pa_inputs(lens, hq=4, hkv=2, d=64, page=16, n_blocks=12, max_blocks=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = len(lens)
    q = torch.randn(b, hq, d, generator=g).bfloat16()
    k = _paged(n_blocks, page, hkv, d, seed=seed + 1)
    v = _paged(n_blocks, page, hkv, d, seed=seed + 2)
    bt = torch.randint(0, n_blocks, (b, max_blocks), generator=g, dtype=torch.int32)
    return q, k, v, bt, torch.tensor(lens, dtype=torch.int32)


def test_paged_attention_decode_partitions_and_edges():
    # interpreter partitions are 32 tokens: 64 = exactly two, 33 = one token into the second,
    # 0 = empty sequence (zeros), 1 = a single token
    q, k, v, bt, lens = _pa_inputs([64, 0, 33, 1])
    y = pa.paged_attention_decode(q, k, v, bt, lens)
    ref = pa.reference(q.float(), k.float(), v.float(), bt, lens)
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)
    assert torch.equal(y[1], torch.zeros_like(y[1]))


def test_paged_attention_decode_workspace_from_capacity(monkeypatch):
    # the model's max context (131072) is far beyond what the KV cache holds (12 blocks x 16):
    # the workspace and the grid follow the cache, and a caller's workspace of exactly that size works
    q, k, v, bt, lens = _pa_inputs([50, 64], hq=8, hkv=2)  # GQA group of 4
    need = pa.workspace_nbytes(2, 8, 64, max_context_len=131072, kv_cache_tokens=12 * 16,
                               table_tokens=4 * 16, arch="cpu")
    assert need == 2 * 8 * 2 * (64 + 2) * 4  # 2 partitions: capacity min(131072, 192, 4 blocks * 16 = 64)
    ws = torch.empty(need // 4, dtype=torch.float32)
    out = torch.empty(2, 8, 64, dtype=torch.bfloat16)
    y = pa.paged_attention_decode(q, k, v, bt, lens, max_context_len=131072, out=out, workspace=ws)
    assert y is out
    ref = pa.reference(q.float(), k.float(), v.float(), bt, lens)
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)
    from jitkern.errors import BufferError

    with pytest.raises(BufferError, match="'workspace' is too small"):
        pa.paged_attention_decode(q, k, v, bt, lens, workspace=ws[:-1])


def test_paged_attention_decode_empty_batch_launches_nothing(launches):
    q, k, v, bt, lens = _pa_inputs([])
    y = pa.paged_attention_decode(q, k, v, bt, lens)
    assert y.shape == (0, 4, 64) and launches == []


# ---- moe_gemm_stage1 ------------------------------------------------------------------------------
def _moe_inputs(tokens=5, k=64, n=24, experts=6, topk=2, align_m=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g).bfloat16()
    w = (torch.randn(experts, 2 * n, k, generator=g) / 8).bfloat16()
    tid = torch.stack([torch.randperm(experts, generator=g)[:topk] for _ in range(tokens)]).int()
    return x, w, *moe.moe_align(tid, experts, align_m), topk


@pytest.mark.parametrize("split_k, activation", [(1, "silu"), (3, "silu"), (2, "gelu")])
def test_moe_gemm_stage1_matches_reference(split_k, activation):
    # K = 128 is 4 steps of the interpreter's block_k (32): split_k may be up to K // block_k
    x, w, ids, eids, npad, topk = _moe_inputs(k=128)
    assert (ids[: int(npad)] == x.shape[0] * topk).any()  # sentinel padding is present
    y = moe.moe_gemm_stage1(x, w, ids, eids, npad, topk, activation=activation, split_k=split_k)
    ref = moe.reference(x.float(), w.float(), ids, eids, npad, topk, activation=activation)
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=3e-2)


@pytest.mark.parametrize("split_k, activation", [(1, "silu"), (2, "silu"), (1, "none"), (2, "none"), (None, "gelu")])
def test_moe_swap_ab_tiles_match_reference(split_k, activation, monkeypatch, tmp_path):
    """swap_ab=1 (weights on the dot's M side, pairs on N; sm_90's decode tiles): the same products."""
    monkeypatch.setenv("JITKERN_MOE_GEMM_STAGE1_SWAP_AB", "1")
    monkeypatch.setenv("JITKERN_CACHE_DIR", str(tmp_path))  # rendered sources are checked below
    x, w, ids, eids, npad, topk = _moe_inputs(k=128)
    if activation == "none":
        w = w[:, : w.shape[1] // 2 + 1]  # [experts, 25, K]: an odd, unaligned N
    y = moe.moe_gemm_stage1(x, w, ids, eids, npad, topk, activation=activation, split_k=split_k)
    ref = moe.reference(x.float(), w.float(), ids, eids, npad, topk, activation=activation)
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=3e-2)
    assert moe.tiles("cpu", 16, "bf16", activation)["swap_ab"] == 1
    rendered = [p.read_text() for p in tmp_path.rglob("kernel.py")]
    assert rendered and all("tl.dot(bg, tl.trans(a), acc_g)" in src for src in rendered if "moe_stage1_kernel" in src)


def _per_pair(x, w, topk_ids, topk):
    """PyTorch, independent of the sorted tables: row ``p`` is ``x[p // topk] @ w[expert of p].T`` (fp32)."""
    experts = topk_ids.reshape(-1).long()
    return torch.stack([x[p // topk].float() @ w[experts[p]].float().t() for p in range(experts.numel())])


def _plain_inputs(tokens=5, k=128, n=24, experts=6, topk=2, align_m=16, seed=0):
    """``activation="none"`` inputs: w [experts, N, K] (no gate/up halves), and the router's choices."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g).bfloat16()
    w = (torch.randn(experts, n, k, generator=g) / 8).bfloat16()
    tid = torch.stack([torch.randperm(experts, generator=g)[:topk] for _ in range(tokens)]).int()
    return x, w, tid, moe.moe_align(tid, experts, align_m)


@pytest.mark.parametrize("topk, split_k, n", [(1, 1, 24), (1, 3, 24), (2, 1, 24), (2, 2, 24), (2, None, 25),
                                              (1, 4, 16)])
def test_moe_plain_grouped_gemm_matches_pytorch(topk, split_k, n):
    # activation "none": out[pair] = x[pair // topk] @ w[expert].T, N = w.shape[1] (25: odd, unaligned)
    x, w, tid, (ids, eids, npad) = _plain_inputs(n=n, topk=topk)
    assert (ids[: int(npad)] == x.shape[0] * topk).any()  # sentinel padding is present
    y = moe.moe_gemm_stage1(x, w, ids, eids, npad, topk, "none", split_k=split_k)
    assert y.shape == (x.shape[0] * topk, n) and y.dtype == x.dtype
    want = _per_pair(x, w, tid, topk)
    torch.testing.assert_close(y.float(), want, rtol=2e-2, atol=3e-2)
    ref = moe.reference(x.float(), w.float(), ids, eids, npad, topk, activation="none")
    torch.testing.assert_close(ref, want, rtol=1e-4, atol=1e-4)  # the op's reference agrees


@pytest.mark.parametrize("split_k", [1, 2])
def test_moe_two_stages_are_the_per_pair_mlp(split_k):
    """Stage 1 (silu, topk=2) then stage 2 = ``"none"`` with topk=1 over stage 1's rows and the same
    tables: each pair's own expert's down projection (what the example decoder's MoE layer does)."""
    tokens, hidden, n, experts, topk = 5, 64, 64, 6, 2  # K of both stages: 2 interpreter block_k steps
    g = torch.Generator().manual_seed(7)
    x = torch.randn(tokens, hidden, generator=g).bfloat16()
    w1 = (torch.randn(experts, 2 * n, hidden, generator=g) / 8).bfloat16()
    w2 = (torch.randn(experts, hidden, n, generator=g) / 6).bfloat16()
    tid = torch.stack([torch.randperm(experts, generator=g)[:topk] for _ in range(tokens)]).int()
    ids, eids, npad = moe.moe_align(tid, experts, 16)
    hmid = moe.moe_gemm_stage1(x, w1, ids, eids, npad, topk, "silu", split_k=split_k)
    y = moe.moe_gemm_stage1(hmid, w2, ids, eids, npad, 1, "none", split_k=split_k)
    assert y.shape == (tokens * topk, hidden)
    gu = _per_pair(x, w1, tid, topk)
    a = (torch.nn.functional.silu(gu[:, :n]) * gu[:, n:]).bfloat16()
    torch.testing.assert_close(y.float(), _per_pair(a, w2, tid, 1), rtol=3e-2, atol=3e-2)


def test_moe_plain_grouped_gemm_shapes_and_paths(caplog, launches, monkeypatch):
    """``"none"``: odd weight rows are fine (no halves), K must match; the contract gives [pairs, N]
    out and [split, sorted_size, N] scratch (redzone mode around it passes); the PyTorch path for a
    tensor subclass and the torch.library alloc agree."""
    from jitkern.errors import ShapeError

    x, w, tid, (ids, eids, npad) = _plain_inputs(tokens=3, k=64, n=17, topk=2)
    want = _per_pair(x, w, tid, 2)
    with pytest.raises(ShapeError, match=r"\[experts, N, 64\]"):
        moe.moe_gemm_stage1(x, w[:, :, :32], ids, eids, npad, 2, "none")
    assert moe.alloc(x, w, ids, eids, npad, 2, "none")["out"].shape == (6, 17)
    assert moe.alloc(x, w[:, :16], ids, eids, npad, 2, "silu")["out"].shape == (6, 8)

    class QuantizedLike(torch.Tensor):
        pass

    with caplog.at_level("WARNING", logger="jitkern"):
        y = moe.moe_gemm_stage1(x, w.as_subclass(QuantizedLike), ids, eids, npad, 2, "none")
    assert launches == [] and y.shape == (6, 17)
    torch.testing.assert_close(y.float(), want, rtol=2e-2, atol=3e-2)
    assert caplog.text.count("tensor subclasses") == 1
    # plain tensors reach the PyTorch path only when every kernel was ruled out (over budget, say),
    # which the framework reports itself: no claim about subclasses for them
    caplog.clear()
    y = torch.empty_like(y)
    with caplog.at_level("WARNING", logger="jitkern"):
        moe._torch_path(x, w, ids, eids, npad, 2, "none", None, y, None)
    assert "subclasses" not in caplog.text
    torch.testing.assert_close(y.float(), want, rtol=2e-2, atol=3e-2)
    monkeypatch.setenv("JITKERN_DEBUG", "redzone")
    y = moe.moe_gemm_stage1(x, w, ids, eids, npad, 2, "none", split_k=2)
    torch.testing.assert_close(y.float(), want, rtol=2e-2, atol=3e-2)
    assert len(launches) == 2  # split-K: the gemm and the reduce


def test_moe_splitk_scratch_is_exactly_what_the_kernel_writes(monkeypatch):
    # redzone mode around the contract's scratch (split, sorted_size, 2N): the split-K kernel writes
    # padding positions too; a contract sized from tokens * topk (seed 004) would be hit
    monkeypatch.setenv("JITKERN_DEBUG", "redzone")
    x, w, ids, eids, npad, topk = _moe_inputs(tokens=3, k=64, n=16)
    y = moe.moe_gemm_stage1(x, w, ids, eids, npad, topk, split_k=2)
    torch.testing.assert_close(y.float(), moe.reference(x.float(), w.float(), ids, eids, npad, topk),
                               rtol=2e-2, atol=3e-2)
    from jitkern.errors import RedzoneError

    from jitkern.contracts import Buffer, Contract

    seed_contract = Contract(moe.OP, (moe.CONTRACT.buffers[0],
                                      Buffer("scratch", lambda d: (d.split_k * d.num_pairs * d.n,), torch.float32,
                                             role="scratch")))
    monkeypatch.setattr(moe, "CONTRACT", seed_contract)
    # the kernel writes ~30x what that contract holds; widen the bands so every stray store lands in one
    monkeypatch.setenv("JITKERN_REDZONE_BYTES", str(64 * 1024))
    with pytest.raises(RedzoneError) as e:
        moe.moe_gemm_stage1(x, w, ids, eids, npad, topk, split_k=2)
    assert e.value.buffer == "scratch" and e.value.offset == 0


def test_moe_empty_prefill_launches_nothing(launches):
    # seed 003: an empty batch launched a grid of 0 blocks ("invalid configuration argument")
    x, w, ids, eids, npad, topk = _moe_inputs()
    y = moe.moe_gemm_stage1(x[:0], w, ids[:0], eids[:0], torch.zeros(1, dtype=torch.int32), topk)
    assert y.shape == (0, 24) and launches == []


def test_moe_cdna4_tile_caps():
    for cfg in moe.configs(arch.get("gfx950")):
        p = cfg.p
        assert p["block_m"] <= 64 and p["block_n"] <= 256
    assert moe.tiles("gfx950", 128)["block_m"] == 64  # a 128-aligned sort runs as 64-row blocks
    assert moe.tiles("sm_90", 128)["block_m"] == 64
    with pytest.raises(ConfigError, match="JITKERN_MOE_GEMM_STAGE1_BLOCK_M='128'.*gfx950"):
        constraints.apply("gfx950", moe.OP, [moe.tiles("sm_90", 128)], moe.TUNABLES,
                          environ={"JITKERN_MOE_GEMM_STAGE1_BLOCK_M": "128"})


# ---- paged_mqa_logits -----------------------------------------------------------------------------
@pytest.mark.parametrize("next_n, span", [(1, 1), (2, 1), (1, 2), (2, 4)])
def test_paged_mqa_logits_at_full_context(next_n, span, monkeypatch):
    # seed 001: context_len == max_model_len, with max_model_len not a multiple of the tile (16 here);
    # span > 1: the pipelined loop (sm_90's tiles: several tiles per program, heads along the dot's N)
    monkeypatch.setenv("JITKERN_PAGED_MQA_LOGITS_SPAN", str(span))
    g = torch.Generator().manual_seed(next_n)
    b, h, d, page, max_len = 2, 16, 64, 16, 40
    q = torch.randn(b, next_n, h, d, generator=g).bfloat16()
    kv = _paged(6, page, d, seed=next_n)
    w = torch.rand(b * next_n, h, generator=g)
    bt = torch.tensor([[5, 1, 3], [0, 2, 4]], dtype=torch.int32)
    lens = torch.tensor([max_len, 17], dtype=torch.int32)
    y = mqa.paged_mqa_logits(q, kv, w, lens, bt, max_len)
    ref = mqa.reference(q.float(), kv.float(), w, lens, bt, max_len)
    assert y.shape == (b * next_n, max_len)
    assert torch.equal(torch.isinf(y), torch.isinf(ref))
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-3)
    assert torch.isfinite(y[next_n - 1]).all()  # the last query of a full context sees every position


def test_paged_mqa_logits_empty(launches):
    q = torch.zeros(0, 1, 16, 64, dtype=torch.bfloat16)
    y = mqa.paged_mqa_logits(q, _paged(2, 16, 64), torch.zeros(0, 16), torch.zeros(0, dtype=torch.int32),
                             torch.zeros(0, 2, dtype=torch.int32), 32)
    assert y.shape == (0, 32) and launches == []


# ---- cross-compile: the real compilers accept every template ----------------------------------------
def test_cross_compile_one_config_per_op_for_gpus():
    jobs = [
        (gkv.SPEC, gkv.config("bf16", 16, True), "sm_90"),
        (pa.SPEC, pa.partition_config("bf16", 16, 128, 8, "gfx950"), "gfx950"),
        (pa.SPEC, pa.combine_config("bf16", 128, "gfx950"), "gfx950"),
        (moe.SPEC, moe.gemm_config("bf16", "silu", False, moe.tiles("gfx950", 64)), "gfx950"),
        (mqa.SPEC, mqa.config("bf16", 64, 64, 128, 2, "sm_90"), "sm_90"),
    ]
    # moe's plain grouped GEMM (activation "none", the MoE down projection): both kernels, split-K
    for a in ("sm_90", "gfx942"):
        params = moe.tiles(a, 16)
        jobs += [(moe.SPEC, moe.gemm_config("bf16", "none", False, params), a),
                 (moe.SPEC, moe.gemm_config("bf16", "none", True, params), a),
                 (moe.SPEC, moe.reduce_config("bf16", "none", params), a)]
    for spec, cfg, a in jobs:
        entry, status = get_entry(plan(spec, cfg, arch.get(a)))
        assert status == "built"
        assert 0 <= entry.meta["shared_bytes"] <= arch.get(a).shared_mem_per_block, (cfg, entry.meta["shared_bytes"])


# ---- H100 -------------------------------------------------------------------------------------------
@requires_gpu
def test_seed_ops_on_gpu_at_decode_shapes(launches):
    dev = "cuda"
    torch.manual_seed(0)
    # paged attention: batch 32, Llama-3-8B heads (32 q / 8 kv, d 128), contexts up to 4K
    b, hq, hkv, d, page = 32, 32, 8, 128, 16
    lens = torch.randint(1, 4096, (b,), dtype=torch.int32, device=dev)
    lens[0] = 4096
    nblk = 4096 // page
    k = torch.randn(b * nblk, page, hkv, d, dtype=torch.bfloat16, device=dev)
    v = torch.randn_like(k)
    bt = torch.randperm(b * nblk, device=dev).int().view(b, nblk)
    q = torch.randn(b, hq, d, dtype=torch.bfloat16, device=dev)
    torch.testing.assert_close(pa.paged_attention_decode(q, k, v, bt, lens),
                               pa.reference(q, k, v, bt, lens), rtol=2e-2, atol=2e-2)
    # gather
    cu = torch.zeros(b + 1, dtype=torch.int32, device=dev)
    cu[1:] = torch.cumsum(lens, 0)
    kc = k.view(b * nblk, page, hkv * d)
    assert torch.equal(gkv.gather_kv_cache(kc, bt, cu), gkv.reference(kc, bt, cu))
    assert gkv.gather_kv_cache(kc, bt, torch.zeros_like(cu)).shape == (0, hkv * d)
    # moe: 64 tokens, 256 experts, top 8, K 7168 -> N 256 (DeepSeek-V3 TP8)
    t, e, topk, kk, n = 64, 256, 8, 7168, 256
    x = torch.randn(t, kk, dtype=torch.bfloat16, device=dev)
    w = torch.randn(e, 2 * n, kk, dtype=torch.bfloat16, device=dev) / 64
    tid = torch.stack([torch.randperm(e, device=dev)[:topk] for _ in range(t)]).int()
    ids, eids, npad = moe.moe_align(tid, e, 16)
    ref = moe.reference(x, w, ids, eids, npad, topk)
    for split in (None, 1, 4):
        torch.testing.assert_close(moe.moe_gemm_stage1(x, w, ids, eids, npad, topk, split_k=split), ref,
                                   rtol=3e-2, atol=3e-2)
    # stage 2 as a plain grouped GEMM (activation "none", topk 1 over the pair rows): w2 [e, 7168, 256]
    w2 = torch.randn(e, kk, n, dtype=torch.bfloat16, device=dev) / 16
    ref2 = moe.reference(ref, w2, ids, eids, npad, 1, "none")
    for split in (None, 1, 2):
        torch.testing.assert_close(moe.moe_gemm_stage1(ref, w2, ids, eids, npad, 1, "none", split_k=split), ref2,
                                   rtol=3e-2, atol=3e-2)
    # logits at context_len == max_model_len (not a multiple of the 64-token tile)
    max_len = 4000
    q2 = torch.randn(8, 2, 64, 128, dtype=torch.bfloat16, device=dev)
    kv = torch.randn(8 * 63, 64, 128, dtype=torch.bfloat16, device=dev)
    bt2 = torch.arange(8 * 63, dtype=torch.int32, device=dev).view(8, 63)
    l2 = torch.full((8,), max_len, dtype=torch.int32, device=dev)
    w2 = torch.rand(16, 64, device=dev)
    y = mqa.paged_mqa_logits(q2, kv, w2, l2, bt2, max_len)
    r = mqa.reference(q2, kv, w2, l2, bt2, max_len)
    assert torch.equal(torch.isinf(y), torch.isinf(r))
    torch.testing.assert_close(y, r, rtol=3e-2, atol=5e-1)


def test_seed_ops_trace_under_torch_compile_without_graph_break():
    import jitkern.ops as ops

    cache = _paged(10, 16, 2, 8)
    bt = torch.randperm(10, generator=torch.Generator().manual_seed(3)).int().view(2, 5)
    cu = torch.tensor([0, 20, 53], dtype=torch.int32)
    f = torch.compile(lambda c, b, u: ops.gather_kv_cache(c, b, u, num_tokens=53) * 2, fullgraph=True,
                      backend="aot_eager")
    assert torch.equal(f(cache, bt, cu), gkv.reference(cache, bt, cu) * 2)


def test_moe_both_stages_trace_under_torch_compile_without_graph_break():
    """The torch.library path (alloc of out [pairs, N] for each activation) of stage 1 and the plain
    grouped GEMM of stage 2, as the example decoder chains them."""
    import jitkern.ops as ops

    x, w1, ids, eids, npad, topk = _moe_inputs(tokens=3, k=64, n=16)
    w2 = (torch.randn(w1.shape[0], 64, 16, generator=torch.Generator().manual_seed(4)) / 4).bfloat16()

    def mlp(x, ids, eids, npad):
        h = ops.moe_gemm_stage1(x, w1, ids, eids, npad, topk, "silu")
        return ops.moe_gemm_stage1(h, w2, ids, eids, npad, 1, "none")

    y = torch.compile(mlp, fullgraph=True, backend="aot_eager")(x, ids, eids, npad)
    h = moe.reference(x, w1, ids, eids, npad, topk)
    assert y.shape == (3 * topk, 64)
    torch.testing.assert_close(y.float(), moe.reference(h, w2, ids, eids, npad, 1, "none").float(),
                               rtol=2e-2, atol=3e-2)


def test_every_op_passes_redzone_mode_with_buffers_from_its_contract(monkeypatch):
    """The contracts are at least what the kernels write: each op under JITKERN_DEBUG=redzone at its
    edge inputs raises nothing and gives the same result as with the mode off."""
    q, k, v, bt, lens = _pa_inputs([64, 0, 33])
    x, w, ids, eids, npad, topk = _moe_inputs(tokens=3)
    cache = _paged(12, 16, 2, 8)
    cu = torch.tensor([0, 20, 20, 53], dtype=torch.int32)
    bt3 = torch.randperm(12, generator=torch.Generator().manual_seed(1)).int().view(3, 4)
    mq = torch.randn(2, 2, 16, 64, generator=torch.Generator().manual_seed(2)).bfloat16()
    mkv = _paged(6, 16, 64, seed=5)
    mw = torch.rand(4, 16, generator=torch.Generator().manual_seed(3))
    mlens = torch.tensor([40, 40], dtype=torch.int32)
    mbt = torch.tensor([[5, 1, 3], [0, 2, 4]], dtype=torch.int32)
    calls = [
        lambda: pa.paged_attention_decode(q, k, v, bt, lens),
        lambda: moe.moe_gemm_stage1(x, w, ids, eids, npad, topk, split_k=1),
        lambda: gkv.gather_kv_cache(cache, bt3, cu),
        lambda: mqa.paged_mqa_logits(mq, mkv, mw, mlens, mbt, 40),
    ]
    off = [c() for c in calls]
    monkeypatch.setenv("JITKERN_DEBUG", "redzone")
    for c, y in zip(calls, off):
        assert torch.equal(c(), y)


@pytest.mark.parametrize("a", sorted(arch.ARCHES))
def test_configs_enumerate_and_render_on_every_arch(a):
    """What prebuild builds: every op yields configs on every arch, and one of each variant renders."""
    for mod in (gkv, pa, moe, mqa):
        cfgs = list(mod.SPEC.configs(arch.get(a)))
        assert cfgs
        seen = {}
        for c in cfgs:
            seen.setdefault(c.variant, c)
        assert set(seen) == {v.name for v in mod.SPEC.variants}
        for c in seen.values():
            assert plan(mod.SPEC, c, arch.get(a)).source


def test_moe_tensor_subclass_weight_runs_the_pytorch_path(caplog, launches):
    """Seed 000: a fast path called on a tensor subclass (torchao quantized weight) it cannot read.
    The guard sends such calls to the PyTorch path, once with a warning, and launches nothing."""

    class QuantizedLike(torch.Tensor):
        pass

    x, w, ids, eids, npad, topk = _moe_inputs(tokens=2)
    before = counters.snapshot()["guard_refusals"]
    with caplog.at_level("WARNING", logger="jitkern"):
        y = moe.moe_gemm_stage1(x, w.as_subclass(QuantizedLike), ids, eids, npad, topk)
    torch.testing.assert_close(y.float(), moe.reference(x, w, ids, eids, npad, topk).float())
    assert launches == [] and counters.snapshot()["guard_refusals"] == before + 1
    assert "QuantizedLike" in caplog.text
    moe.moe_gemm_stage1(x, torch.nn.Parameter(w, requires_grad=False), ids, eids, npad, topk, split_k=1)
    assert len(launches) == 1  # a plain Parameter still takes the kernel


@pytest.mark.parametrize("a", ["sm_90", "gfx950", "gfx942", "cpu"])
def test_plans_pick_configs_that_prebuild_builds(a):
    """What each op's plan launches for typical signatures (meta tensors, no GPU) is in configs(arch),
    so a prebuilt cache covers the runtime's calls."""
    import jitkern

    target = arch.get(a)
    m = dict(device="meta")
    bf = dict(dtype=torch.bfloat16, **m)
    i32 = dict(dtype=torch.int32, **m)
    calls = [
        (gkv, (torch.empty(64, 16, 8, 128, **bf), torch.empty(4, 16, **i32), torch.empty(5, **i32), 300,
               torch.empty(300, 8, 128, **bf))),
        (pa, (torch.empty(4, 32, 128, **bf), torch.empty(256, 16, 8, 128, **bf), torch.empty(256, 16, 8, 128, **bf),
              torch.empty(4, 64, **i32), torch.empty(4, **i32), 0.1, None, torch.empty(4, 32, 128, **bf),
              torch.empty(4 * 32 * -(-1024 // pa.tiles(a)["partition"]) * 130, dtype=torch.float32, **m))),
        (mqa, (torch.empty(4, 2, 64, 128, **bf), torch.empty(64, 64, 128, **bf), torch.empty(8, 64, dtype=torch.float32,
                                                                                             **m),
               torch.empty(4, **i32), torch.empty(4, 16, **i32), 1000,
               torch.empty(8, 1000, dtype=torch.float32, **m))),
    ]
    for split in (1, 4):
        size = 16 * 64
        calls.append((moe, (torch.empty(8, 1024, **bf), torch.empty(16, 512, 1024, **bf), torch.empty(size, **i32),
                            torch.empty(size // 16, **i32), torch.empty(1, **i32), 2, "silu", split,
                            torch.empty(16, 256, **bf),
                            torch.empty(split, size, 512, dtype=torch.float32, **m) if split > 1 else None)))
        # a plain grouped GEMM (activation "none", topk 1: a stage 2 over the 16 pair rows), w [16, 512, 1024]
        calls.append((moe, (torch.empty(16, 1024, **bf), torch.empty(16, 512, 1024, **bf), torch.empty(size, **i32),
                            torch.empty(size // 16, **i32), torch.empty(1, **i32), 1, "none", split,
                            torch.empty(16, 512, **bf),
                            torch.empty(split, size, 512, dtype=torch.float32, **m) if split > 1 else None)))
    for mod, args in calls:
        built = set(mod.SPEC.configs(target))
        cands = jitkern.dispatcher(mod.SPEC).candidates(args, target, torch.device("meta"))
        launched = [la.config for c in cands for la in c.launches]
        assert launched, mod.OP
        for cfg in launched:
            assert cfg in built, (mod.OP, a, cfg.describe())


@pytest.mark.parametrize("tokens,align,activation", [(128, 32, "silu"), (32, 64, "none")])
def test_moe_plan_takes_its_buckets_shipped_tile_and_prebuild_builds_it(tokens, align, activation):
    # sm_90 at the example decoder's MoE shapes, meta tensors: the plan's tile is the shipped winner of
    # bucket a<align>_<gated|plain> (tools/sweep_membw.py --apply), and configs() holds what it launches
    from jitkern import arch as _arch
    from jitkern import tuning
    from jitkern.library import moe_align as ma

    sm90 = _arch.get("sm_90")
    experts, topk, k, n = 8, 2, 4096, 1536
    if activation == "none":
        tokens, topk, k, n = tokens * topk, 1, n, k  # stage 2: the pairs' rows against w2 [E, hidden, N]
    rows_w = n if activation == "none" else 2 * n
    size = ma.sorted_size(tokens * topk, experts, align)
    meta = dict(device="meta")
    args = (torch.empty(tokens, k, dtype=torch.bfloat16, **meta),
            torch.empty(experts, rows_w, k, dtype=torch.bfloat16, **meta),
            torch.empty(size, dtype=torch.int32, **meta), torch.empty(size // align, dtype=torch.int32, **meta),
            torch.empty(1, dtype=torch.int32, **meta), topk, activation, None,
            torch.empty(tokens * topk, n, dtype=torch.bfloat16, **meta), None)
    won = tuning.shipped("sm_90", moe.OP, "bf16", moe.bucket(align, activation))
    assert won and won["block_m"] == moe.bucket_block_m(moe.bucket(align, activation)) == align
    gemm_cfg = jitkern.dispatcher(moe.SPEC).candidates(args, sm90, torch.device("meta"))[0].launches[0].config
    assert {key: gemm_cfg.p[key] for key in won} == won
    built = set(moe.configs(sm90))
    assert gemm_cfg in built
