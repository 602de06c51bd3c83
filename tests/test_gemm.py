"""gemm: numerics against PyTorch (Triton's interpreter on CPU tensors), input validation, and the
per-arch choice of tile with real cross-compiles for gfx942 / gfx950 / sm_90 and the resource check.
"""
import logging

import pytest
import torch

import jitkern
from jitkern import arch, budget, counters
from jitkern.build import get_entry, report
from jitkern.plan import plan
from jitkern.errors import DTypeError, LayoutError, OverBudgetError, ShapeError
from jitkern.library import gemm

from conftest import requires_gpu


def _check(c, a, b):
    ref = a.float() @ b.float()
    tol = 2e-2 * max(1.0, ref.abs().max().item())  # output rounding to 16 bits; fp32 accumulation
    assert c.dtype == a.dtype and c.shape == ref.shape
    assert (c.float() - ref).abs().max().item() <= tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (1, 37, 19), (33, 65, 70), (16, 64, 64), (100, 48, 128), (130, 17, 64)])
def test_numerics_row_major_b(m, n, k, dtype):
    torch.manual_seed(m * 1000 + n + k)
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    _check(jitkern.ops.gemm(a, b), a, b)


@pytest.mark.parametrize("m,n,k", [(1, 64, 64), (17, 33, 80), (64, 128, 48)])
def test_numerics_transposed_weight(m, n, k):
    """x @ w.t() with a row-major weight w [N, K]: B has unit stride along K."""
    a, w = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(n, k, dtype=torch.bfloat16)
    _check(jitkern.ops.gemm(a, w.t()), a, w.t())


@pytest.mark.parametrize("hopper", [dict(persistent=1), dict(persistent=0, epi_split=2), dict(warp_spec=1)],
                         ids=["persistent", "tile-per-program-split-epilogue", "warp-specialised"])
def test_hopper_tma_kernel_numerics(hopper, monkeypatch):
    """The sm_90 path (TMA descriptors; persistent grid of at most one program per SM, 4 on the CPU):
    chosen as on an H200 (JITKERN_ARCH=sm_90), run in Triton's interpreter. Aligned shapes take the
    TMA kernel (tails of M and N zero-filled / clipped by the descriptors), the unaligned one the
    pointer kernel; both layouts of B, both 16-bit dtypes; outputs poisoned first."""
    monkeypatch.setenv("JITKERN_ARCH", "sm_90")
    monkeypatch.setenv("JITKERN_GEMM_TMA", "1")
    for k_, v in hopper.items():
        monkeypatch.setenv(f"JITKERN_GEMM_{k_.upper()}", str(v))
    seen = set()
    bf16, fp16 = torch.bfloat16, torch.float16
    # (70, 320): 2 x 5 tiles of 64x64 over 4 persistent programs, so programs stride over tiles
    for m, n, k, b_trans, dtype in ((1, 48, 256, False, bf16), (1, 48, 256, True, fp16), (70, 320, 128, True, bf16),
                                    (70, 320, 128, False, fp16), (5, 33, 40, True, bf16)):
        torch.manual_seed(m + n + k)
        a = torch.randn(m, k, dtype=dtype)
        b = torch.randn(n, k, dtype=dtype).t() if b_trans else torch.randn(k, n, dtype=dtype)
        out = torch.full((m, n), float("nan"), dtype=dtype)
        _check(jitkern.ops.gemm(a, b, out=out), a, b)
    used = jitkern.dispatcher(gemm.SPEC).active_configs()
    for cfg in used:
        assert cfg.p["tma"] == 1 and all(cfg.p[k_] == v for k_, v in hopper.items())
        seen.add(cfg.p["aligned"])
    assert seen == {True, False}
    src = plan(gemm.SPEC, next(c for c in used if c.p["aligned"]), arch.get("cpu")).source
    assert "tl.make_tensor_descriptor" in src and ("tl.num_programs(0)" in src) == bool(hopper.get("persistent"))


def test_hopper_tiles_only_on_sm90_and_compile_to_wgmma_and_tma():
    """Arch rules keep TMA tiles off every other arch (gfx942/gfx950 candidate lists unchanged); for
    sm_90 the first large-shape candidate cross-compiles with the copy engine and global scratch."""
    for name in ("gfx942", "gfx950", "sm_80", "cpu"):
        for b, _ in gemm.BUCKETS:
            assert not any(t.get("tma") for t in gemm.candidates(name, "bf16", b, tuned=False))
    first = gemm.candidates("sm_90", "bf16", "large", tuned=False)[0]
    assert first["tma"] == 1 and first["persistent"] == 1
    entry, _ = get_entry(plan(gemm.SPEC, gemm.config("bf16", True, True, first), arch.get("sm_90")))
    assert entry.meta["status"] == budget.OK
    import json
    md = json.loads(entry.read_bytes("metadata.json"))
    assert md["global_scratch_size"] >= 3 * 128  # three device-made descriptors per program
    assert gemm._grid(dict(first, aligned=True), 4096, 4096, None) == 4  # persistent: capped (CPU: 4)
    assert gemm._grid(dict(first, aligned=False), 4096, 4096, None) == 32 * 16  # pointer kernel: a tile each


@pytest.mark.parametrize("split,tma", [(2, 0), (3, 1)], ids=["split2-pointer-kernel", "split3-tma-kernel"])
def test_split_k_numerics_deterministic_and_counters_left_zeroed(split, tma, monkeypatch):
    """Split-K as on an H200 (JITKERN_ARCH=sm_90), interpreted: one launch of (tiles x slices)
    programs; the last arriving program of each tile sums the fp32 partials in slice order. M, N, K
    off the tiles, K shorter than split * block_k (empty slices), both B layouts, both 16-bit dtypes;
    outputs poisoned first; a second call (same kept counter buffer) gives the same bits, and every
    counter is back to 0 after each call."""
    from jitkern import dispatch

    monkeypatch.setenv("JITKERN_ARCH", "sm_90")
    monkeypatch.setenv("JITKERN_GEMM_SPLIT_K", str(split))
    monkeypatch.setenv("JITKERN_GEMM_TMA", str(tma))
    bf16, fp16 = torch.bfloat16, torch.float16
    cases = ((5, 33, 40, True, bf16), (1, 48, 256, False, fp16), (70, 320, 128, True, fp16),
             (17, 100, 700, False, bf16), (3, 64, 512, True, bf16))
    aligned_seen = set()
    for m, n, k, b_trans, dtype in cases:
        torch.manual_seed(m + n + k)
        a = torch.randn(m, k, dtype=dtype)
        b = torch.randn(n, k, dtype=dtype).t() if b_trans else torch.randn(k, n, dtype=dtype)
        results = []
        for _ in range(2):
            out = torch.full((m, n), float("nan"), dtype=dtype)
            _check(jitkern.ops.gemm(a, b, out=out), a, b)
            results.append(out)
            kept = [buf for key, (buf, _) in dispatch._zeroed.items() if key[0] == "gemm"]
            assert kept and all(int(buf.abs().sum()) == 0 for buf in kept)
        assert torch.equal(results[0], results[1])  # fixed summation order: the same bits
        route = jitkern.dispatcher(gemm.SPEC).route_for(a, b, out)
        (launch,) = route.active_candidate.launches
        cfg = launch.config
        assert cfg.variant == "triton_split_k" and cfg.p["split_k"] == split and cfg.p.get("tma", 0) == tma
        assert launch.grid[0] == gemm.output_tiles(cfg.p, m, n) * split
        aligned_seen.add(cfg.p["aligned"])
    assert aligned_seen == {True, False}
    # the counters are kept per (signature's buffer shape, device, stream): no new one per call
    before = dispatch.zeroed_buffers()
    a, w = torch.randn(5, 40, dtype=bf16), torch.randn(33, 40, dtype=bf16)
    jitkern.ops.gemm(a, w.t())
    assert dispatch.zeroed_buffers() == before


def test_split_k_tiles_only_on_sm90_decode_and_compile_within_budget():
    """Split-K tiles are sm_90 decode-bucket candidates only (SPLIT_RULES): gfx942/gfx950 keep their
    lists and prebuild lists; real sm_90 cross-compiles of the TMA and pointer split-K kernels fit."""
    for name in ("gfx942", "gfx950", "sm_80", "cpu"):
        for b, _ in gemm.BUCKETS:
            for b_trans in (False, True):
                assert not any(gemm.split_of(t) > 1 for t in gemm.candidates(name, "bf16", b, b_trans=b_trans))
        assert not any(c.variant == "triton_split_k" for c in gemm.configs(arch.get(name)))
    for b in ("m16", "m64", "m128"):
        assert any(gemm.split_of(t) > 1 for t in gemm.candidates("sm_90", "bf16", b, tuned=False))
    assert not any(gemm.split_of(t) > 1 for t in gemm.candidates("sm_90", "bf16", "large", tuned=False))
    sm90 = arch.get("sm_90")
    tile = gemm.SPLIT_CANDIDATES["m128"][0]
    for aligned in (True, False):
        entry, _ = get_entry(plan(gemm.SPEC, gemm.config("bf16", True, aligned, tile), sm90))
        res = entry.meta["resources"]
        assert entry.meta["status"] == budget.OK and 0 < res["shared_bytes"] <= sm90.shared_mem_per_block
    src = plan(gemm.SPEC, gemm.config("bf16", True, True, tile), sm90).source
    assert "tl.atomic_add(cnt_ptr + tile, 1, sem=\"acq_rel\", scope=\"gpu\")" in src and "tl.debug_barrier()" in src
    # a tile without split-K renders and keys exactly as before (no split_k parameter)
    assert "split_k" not in gemm.config("bf16", True, True, gemm.HOPPER_CANDIDATES["m128"][0]).p


def test_decode_buckets_tuned_apart_by_weight_size(monkeypatch):
    """N=K=4096 and N=K=8192 look up different tuning records (size class _w8k), falling back to the
    size-free name, then the row-major one."""
    assert gemm.tuning_buckets("m64", True, gemm.big_weight(4096, 4096)) == ("m64_nk", "m64")
    assert gemm.tuning_buckets("m64", True, gemm.big_weight(8192, 8192)) == ("m64_w8k_nk", "m64_nk", "m64")
    assert gemm.tuning_buckets("large", True, True) == ("large_nk", "large")
    assert gemm.SPEC.extra["tuning_bucket"]((128, 8192, 8192), False) == "m128_w8k"
    from jitkern import tuning
    won = dict(gemm.SPLIT_CANDIDATES["m64"][1])
    real = tuning.lookup
    monkeypatch.setattr(tuning, "lookup", lambda a, op, dt, b: won if b == "m64_w8k_nk" else real(a, op, dt, b))
    assert gemm.candidates("sm_90", "bf16", "m64", b_trans=True, big=True)[0] == gemm.tile_of(won)
    assert gemm.candidates("sm_90", "bf16", "m64", b_trans=True, big=False)[0] != gemm.tile_of(won)
    cfg, _ = gemm.choose(arch.get("sm_90"), "bf16", 64, 8192, 8192, True)
    assert cfg.variant == "triton_split_k" and gemm.tile_of(cfg.p) == gemm.tile_of(won)
    assert cfg in set(gemm.configs(arch.get("sm_90")))  # prebuild covers the size class's winner


def test_a_weight_shape_record_comes_first_and_prebuild_covers_shipped_ones(monkeypatch):
    """A model's own weight shapes (tune_gemm.py --per-weight) have records of their own, looked up
    before the size class; prebuild compiles the shipped ones' winners."""
    assert gemm.record_bucket((128, 6144, 4096), True, exact=True) == "m128_n6144k4096_nk"
    assert gemm.record_bucket((128, 6144, 4096), True) == "m128_nk"
    assert gemm.tuning_buckets("m128", True, True, (24576, 4096)) == ("m128_n24576k4096_nk", "m128_w8k_nk", "m128_nk",
                                                                     "m128")
    assert gemm.parse_tuning_bucket("m128_n24576k4096_nk") == ("m128", True, False, (24576, 4096))
    assert gemm.parse_tuning_bucket("m64_w8k") == ("m64", False, True, None) and gemm.parse_tuning_bucket("x_y") is None
    from jitkern import tuning
    won = dict(gemm.SPLIT_CANDIDATES["m128"][3])
    real_lookup, real_table = tuning.lookup, tuning.shipped_table
    # a weight shape the shipped table does not have (5120 x 4096), with a record of its own
    monkeypatch.setattr(tuning, "lookup", lambda a, op, dt, b: won if b == "m128_n5120k4096_nk" else real_lookup(a, op, dt, b))
    assert gemm.candidates("sm_90", "bf16", "m128", b_trans=True, weight=(5120, 4096))[0] == gemm.tile_of(won)
    assert gemm.candidates("sm_90", "bf16", "m128", b_trans=True, weight=(4096, 4096))[0] != gemm.tile_of(won)
    cfg, _ = gemm.choose(arch.get("sm_90"), "bf16", 128, 5120, 4096, True)
    assert gemm.tile_of(cfg.p) == gemm.tile_of(won)
    sm90 = arch.get("sm_90")
    assert cfg not in set(gemm.configs(sm90))  # not shipped: prebuild does not know it ...

    def table(name):
        doc = real_table(name)
        if name == "sm_90":
            doc = {**doc, "ops": {**doc["ops"], "gemm": {**doc["ops"]["gemm"], "bf16": {
                **doc["ops"]["gemm"]["bf16"], "m128_n5120k4096_nk": {"params": won}}}}}
        return doc
    monkeypatch.setattr(tuning, "shipped_table", table)
    assert cfg in set(gemm.configs(sm90))  # ... shipped, it is compiled


def test_out_argument_and_strided_rows():
    a_big = torch.randn(24, 96, dtype=torch.float16)
    a = a_big[:, :80]  # row stride 96, not contiguous
    b = torch.randn(80, 40, dtype=torch.float16)
    out_big = torch.full((24, 48), 7.0, dtype=torch.float16)
    out = out_big[:, :40]
    r = jitkern.ops.gemm(a, b, out=out)
    assert r.data_ptr() == out.data_ptr()
    _check(out, a, b)
    assert (out_big[:, 40:] == 7.0).all()  # masked store: nothing written past N


def test_empty_and_zero_k():
    a, b = torch.randn(0, 8, dtype=torch.bfloat16), torch.randn(8, 5, dtype=torch.bfloat16)
    assert jitkern.ops.gemm(a, b).shape == (0, 5)
    a, b = torch.randn(3, 0, dtype=torch.bfloat16), torch.randn(0, 5, dtype=torch.bfloat16)
    out = torch.full((3, 5), 1.0, dtype=torch.bfloat16)
    assert (jitkern.ops.gemm(a, b, out=out) == 0).all()
    assert counters.snapshot()["compiles"] == 0


def test_input_errors():
    a, b = torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(8, 5, dtype=torch.bfloat16)
    with pytest.raises(DTypeError, match="a has dtype int32; expected one of: bfloat16, float16"):
        jitkern.ops.gemm(a.int(), b)
    with pytest.raises(DTypeError, match="b has dtype float16 but a has bfloat16"):
        jitkern.ops.gemm(a, b.half())
    with pytest.raises(ShapeError, match=r"b must have 8 rows"):
        jitkern.ops.gemm(a, torch.randn(7, 5, dtype=torch.bfloat16))
    with pytest.raises(ShapeError, match="must have 2 dimension"):
        jitkern.ops.gemm(a[None], b)
    with pytest.raises(ShapeError, match=r"out has shape \(4, 6\); expected \(4, 5\)"):
        jitkern.ops.gemm(a, b, out=torch.empty(4, 6, dtype=torch.bfloat16))
    with pytest.raises(LayoutError, match="a must be contiguous in its last dimension"):
        jitkern.ops.gemm(torch.randn(8, 4, dtype=torch.bfloat16).t(), b)
    with pytest.raises(LayoutError, match="b must have unit stride along N"):
        jitkern.ops.gemm(a, torch.randn(16, 10, dtype=torch.bfloat16)[::2, ::2])


# ---- arch selection with real cross-compiles ---------------------------------------------------
def test_choice_differs_across_arches_by_budget(caplog, monkeypatch):
    """M=128 bucket: the first candidate fits sm_90's 227 KiB only, the second gfx950's 160 KiB,
    the third gfx942's 64 KiB. Real compiles decide, and rejections are remembered."""
    monkeypatch.delenv("JITKERN_ARCH", raising=False)
    caplog.set_level(logging.WARNING, logger="jitkern")
    m, n, k = 128, 256, 256
    chosen = {}
    for name in ("sm_90", "gfx950", "gfx942"):
        a = arch.get(name)
        cfg, rejected = gemm.choose(a, "bf16", m, n, k, tuned=False)
        chosen[name] = cfg
        entry, _ = get_entry(plan(gemm.SPEC, cfg, a))
        res = entry.meta["resources"]
        assert entry.meta["status"] == budget.OK
        assert 0 < res["shared_bytes"] <= a.shared_mem_per_block == res["budget_bytes"]
        assert res["regs"] and res["regs"] <= res["regs_limit"]  # read from the cubin / hsaco
        for r in rejected:
            assert r["shared_bytes"] > a.shared_mem_per_block == r["budget_bytes"]
            assert r["arch"] == name
        # each arch skips exactly the candidates before its choice, all for their bytes
        order = gemm.candidates(name, "bf16", "m128", tuned=False)
        assert len(rejected) == order.index(gemm.tile_of(cfg.p))
    assert len({c for c in chosen.values()}) == 3, chosen
    # prebuild's list for each arch holds what the runtime picks there (tuned order included)
    for name in ("sm_90", "gfx950", "gfx942"):
        picked, _ = gemm.choose(arch.get(name), "bf16", m, n, k)
        assert picked in set(gemm.configs(arch.get(name)))
    assert [len(gemm.choose(arch.get(n_), "bf16", m, n, k, tuned=False)[1]) for n_ in ("sm_90", "gfx950", "gfx942")] \
        == [0, 1, 2]
    # one warning line per (op, arch) naming config, bytes and budget
    lines = [r.getMessage() for r in caplog.records if "over the budget" in r.getMessage()]
    assert len(lines) == 2 and any("gfx942" in ln and "budget 65536 B (64 KiB)" in ln for ln in lines)
    assert any("for gfx950" in ln and "block_m=64" in ln and "num_stages=7" in ln for ln in lines)
    # a rejected config is remembered: asking again compiles nothing
    before = counters.snapshot()["compiles"]
    with pytest.raises(OverBudgetError) as e:
        get_entry(plan(gemm.SPEC, gemm.config("bf16", False, True, gemm.CANDIDATES["m128"][0]), arch.get("gfx942")))
    assert e.value.figures["shared_bytes"] > 65536 and e.value.figures["budget_bytes"] == 65536
    status = report(plan(gemm.SPEC, gemm.config("bf16", False, True, gemm.CANDIDATES["m128"][0]),
                                arch.get("gfx950")))
    assert status["status"] == "rejected_over_budget" and status["budget_bytes"] == 160 * 1024
    assert counters.snapshot()["compiles"] == before

    # The runtime path: CPU tensors with JITKERN_ARCH=gfx942 run the configuration gfx942 would
    # use (chosen through the same checks, from the cache), interpreted.
    monkeypatch.setenv("JITKERN_ARCH", "gfx942")
    want, _ = gemm.choose(arch.get("gfx942"), "bf16", m, n, k)
    a_, b_ = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(k, n, dtype=torch.bfloat16)
    c_ = jitkern.ops.gemm(a_, b_)
    _check(c_, a_, b_)
    used = jitkern.dispatcher(gemm.SPEC).route_for(a_, b_, c_).active_candidate.launches[0].config
    assert {p: used.p[p] for p in gemm.TILE_PARAMS} == {p: want.p[p] for p in gemm.TILE_PARAMS}


def test_register_budget_verdict():
    sm90, gfx942 = arch.get("sm_90"), arch.get("gfx942")
    assert budget.register_limit(sm90, 8) == 255 and budget.register_limit(sm90, 16) == 128
    assert budget.register_limit(gfx942, 4) == 512 and budget.register_limit(gfx942, 8) == 256
    v = budget.assess(sm90, {"shared_bytes": 1024, "regs": 200, "spills": 0}, num_warps=16)
    assert v["status"] == budget.REJECTED and "200 registers per thread, 16 warps allow 128" in v["reason"]
    v = budget.assess(gfx942, {"shared_bytes": 65536, "regs": 256, "spills": 4}, num_warps=8)
    assert v["status"] == budget.OK and v["resources"]["spills"] == 4


@requires_gpu
def test_gpu_numerics_large():
    torch.manual_seed(0)
    for m in (1, 16, 64, 128, 4096):
        a = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
        _check(jitkern.ops.gemm(a, b), a, b)
        _check(jitkern.ops.gemm(a, b.t()), a, b.t())


@requires_gpu
@pytest.mark.parametrize("split", [2, 4])
def test_gpu_split_k_decode_shapes_graphs_and_streams(split, monkeypatch):
    """Split-K on the GPU (JITKERN_GEMM_SPLIT_K; sm_90 only): decode shapes in both layouts, the same
    bits on every call, inside a CUDA graph replayed repeatedly (the counters stay zeroed), and on
    two streams at once (each stream has its own counters)."""
    from jitkern import dispatch

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("split-K tiles are sm_90's")
    monkeypatch.setenv("JITKERN_GEMM_SPLIT_K", str(split))
    torch.manual_seed(split)
    for m, n, k in ((1, 4096, 4096), (64, 4096, 4096), (128, 8192, 8192), (37, 1000, 3000)):
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        for b in (w.t(), w.t().contiguous()):
            first = jitkern.ops.gemm(a, b)
            _check(first, a, b)
            cfg = jitkern.dispatcher(gemm.SPEC).route_for(a, b, first).active_candidate.launches[0].config
            assert cfg.p.get("split_k") == split
            for _ in range(3):
                assert torch.equal(jitkern.ops.gemm(a, b), first)
    a = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(64, 4096, device="cuda", dtype=torch.bfloat16)
    want = jitkern.ops.gemm(a, w.t())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        jitkern.ops.gemm(a, w.t(), out=out)
    for _ in range(5):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, want)
    streams = [torch.cuda.Stream() for _ in range(2)]
    outs = [torch.empty_like(out) for _ in streams]
    torch.cuda.synchronize()
    for _ in range(20):
        for s_, o in zip(streams, outs):
            with torch.cuda.stream(s_):
                jitkern.ops.gemm(a, w.t(), out=o)
    torch.cuda.synchronize()
    assert all(torch.equal(o, want) for o in outs)
    assert all(int(buf.abs().sum()) == 0 for key, (buf, _) in dispatch._zeroed.items() if key[0] == "gemm")


@requires_gpu
def test_gpu_split_k_under_torch_compile_cuda_graph_trees_at_several_batch_sizes(monkeypatch):
    """torch.compile(mode="reduce-overhead") records one CUDA graph per batch size in one memory pool
    and refuses a pool holding tensors it does not know of: the split-K counters (kept per stream)
    must come from outside it. A buffer first used under capture is then zeroed before eager use."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("split-K tiles are sm_90's")
    monkeypatch.setenv("JITKERN_GEMM_SPLIT_K", "4")
    jitkern.reset()
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    f = torch.compile(lambda a: jitkern.ops.gemm(a, w.t()) * 2, mode="reduce-overhead")
    for m in (1, 32, 64, 32, 1):
        a = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):  # warm-up, record, replay
            _check(f(a).clone() / 2, a, w.t())
    s = torch.cuda.Stream()  # a new stream: its counters are first made under capture
    a = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(16, 4096, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=s):
        jitkern.ops.gemm(a, w.t(), out=out)
    with torch.cuda.stream(s):  # eager on the capture stream before any replay
        _check(jitkern.ops.gemm(a, w.t()), a, w.t())
    graph.replay()
    torch.cuda.synchronize()
    _check(out, a, w.t())


# ---- guard-based fallback to torch.matmul (issue 4, seed 000) ------------------------------------------
class QuantizedWeight(torch.Tensor):
    """Stands in for a torchao-style weight subclass: a tensor whose storage a kernel must not read raw."""


def test_inputs_no_kernel_takes_go_to_torch_matmul_with_one_warning(caplog):
    a, b = torch.randn(5, 8), torch.randn(8, 3)
    with caplog.at_level("WARNING", logger="jitkern"):
        for _ in range(3):
            torch.testing.assert_close(jitkern.ops.gemm(a, b), a @ b)  # fp32: no kernel takes it
        w = torch.randn(8, 3, dtype=torch.bfloat16).as_subclass(QuantizedWeight)
        x = torch.randn(5, 8, dtype=torch.bfloat16)
        out = torch.empty(5, 3, dtype=torch.bfloat16)
        for _ in range(2):
            got = jitkern.ops.gemm(x, w, out=out)
            assert got is out
            torch.testing.assert_close(out.float(), (x.float() @ w.as_subclass(torch.Tensor).float()),
                                       atol=0.1, rtol=0.02)
    warnings = [r.getMessage() for r in caplog.records if "torch.matmul" in r.getMessage()]
    assert len(warnings) == 2 and "float32" in warnings[0] and "subclass" in warnings[1]
    assert counters.snapshot()["compiles"] == 0 and counters.snapshot()["guard_refusals"] == 5


def _meta(m, n, k, b_trans):
    a = torch.empty(m, k, dtype=torch.bfloat16, device="meta")
    b = torch.empty(n, k, dtype=torch.bfloat16, device="meta").t() if b_trans else \
        torch.empty(k, n, dtype=torch.bfloat16, device="meta")
    return a, b, torch.empty(m, n, dtype=torch.bfloat16, device="meta")


def test_plan_memos_give_what_a_fresh_process_decides(monkeypatch):
    """The tile lists and configs gemm's plan keeps for the signatures after the first (and the rules
    memo under them) change nothing: each decision equals the one made right after jitkern.reset(),
    and an override set between two calls applies to the second."""
    shapes = [(1, 4096, 4096, True), (100, 4096, 4096, True), (128, 1000, 4096, False), (600, 512, 72, True)]
    for name in ("sm_90", "gfx942", "cpu"):
        a = arch.get(name)
        first = []
        for s in shapes:
            jitkern.reset()
            first.append(gemm._dispatch.candidates(_meta(*s), a, torch.device("meta")))
        again = [gemm._dispatch.candidates(_meta(*s), a, torch.device("meta")) for s in shapes * 2]
        assert again == first * 2, name
    monkeypatch.setenv("JITKERN_GEMM_NUM_STAGES", "2")
    got = gemm._dispatch.candidates(_meta(*shapes[0]), arch.get("sm_90"), torch.device("meta"))
    assert got and all(la.config.p["num_stages"] == 2 for c in got for la in c.launches)
