"""The memory-bound ops' tile sweep (tools/sweep_membw.py) and the shipped winners it writes: the
grids pass the sm_90 rules, a sweep's winner is the tile closest to every shape's best, --apply
writes it where the ops' plans (and prebuild) look first, and an override still beats it."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import jitkern
from jitkern import arch, constraints, registry, tuning
from jitkern.library import gather_kv_cache as gkv
from jitkern.library import paged_attention_decode as pa
from jitkern.library import paged_mqa_logits as mqa
from jitkern.library import qk_norm_rope as qnr

REPO = Path(__file__).resolve().parents[1]
MEM_OPS = {m.OP: m for m in (pa, mqa, gkv, qnr)}


def _tool():
    sys.path.insert(0, str(REPO / "tools"))
    spec = importlib.util.spec_from_file_location("sweep_membw", REPO / "tools" / "sweep_membw.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_grid_tile_passes_the_sm90_rules():
    for op, grid in _tool().grids().items():
        spec = registry.get(op)
        assert grid, op
        for tile in grid:
            t = {k: v for k, v in tile.items() if k != "variant"}
            assert all(v in spec.tunables[k] for k, v in t.items()), (op, t)
            assert constraints.violations("sm_90", op, t) == [], (op, t)


@pytest.mark.parametrize("name", ["sm_90", "gfx942", "gfx950"])
def test_shipped_memory_op_winners_fit_their_arch(name):
    ops = tuning.shipped_table(name).get("ops", {})
    for op, mod in MEM_OPS.items():
        for dtype, buckets in ops.get(op, {}).items():
            assert mod.TUNED_BUCKET in buckets
            for entry in buckets.values():
                tile = entry["params"]
                spec = registry.get(op)
                assert set(tile) <= set(spec.tunables) and all(v in spec.tunables[k] for k, v in tile.items()), (op, tile)
                assert constraints.violations(name, op, tile) == [], (op, tile)


def _fake_table(monkeypatch, arch_name, op, params):
    table = {"arch": arch_name, "ops": {op: {d: {"default": {"params": params}} for d in ("bf16", "fp16")}}}
    monkeypatch.setattr(tuning, "shipped_table", lambda a: table if a == arch_name else {})


def _mqa_args(device="cpu"):
    b, nn, h, d, page, ctx = 2, 1, 16, 64, 16, 64
    kv = torch.randn(b * ctx // page, page, d, dtype=torch.bfloat16, device=device)
    bt = torch.arange(b * ctx // page, dtype=torch.int32, device=device).view(b, -1)
    lens = torch.full((b,), ctx, dtype=torch.int32, device=device)
    q = torch.randn(b, nn, h, d, dtype=torch.bfloat16, device=device)
    w = torch.rand(b * nn, h, device=device)
    out = torch.empty(b * nn, ctx, dtype=torch.float32, device=device)
    return q, kv, w, lens, bt, ctx, out


def test_a_shipped_winner_is_what_the_plan_and_prebuild_pick(monkeypatch):
    won = {"block_t": 32, "span": 2, "num_warps": 4, "num_stages": 3}
    _fake_table(monkeypatch, "sm_90", mqa.OP, won)
    jitkern.reset()
    assert mqa.tiles("sm_90") == won and mqa.tiles("sm_90", "fp16") == won
    assert mqa.tiles("gfx942") == mqa.TILES.get("gfx942", mqa.DEFAULT_TILES)  # other arches keep theirs
    assert all(c.p["block_t"] == 32 for c in mqa.configs(arch.get("sm_90")))
    (cand,) = jitkern.dispatcher(mqa.SPEC).candidates(_mqa_args("meta"), arch.get("sm_90"), torch.device("meta"))
    cfg = cand.launches[0].config.p
    assert {k: cfg[k] for k in won} == won
    assert cand.launches[0].grid[:2] == (2, 1)  # 64 positions in programs of 32 x 2
    monkeypatch.setenv("JITKERN_PAGED_MQA_LOGITS_SPAN", "1")  # an override still wins
    jitkern.reset()
    (cand,) = jitkern.dispatcher(mqa.SPEC).candidates(_mqa_args("meta"), arch.get("sm_90"), torch.device("meta"))
    assert cand.launches[0].config.p["span"] == 1 and cand.launches[0].config.p["block_t"] == 32


def test_a_shipped_pa_partition_sizes_the_workspace(monkeypatch):
    _fake_table(monkeypatch, "sm_90", pa.OP, {"partition": 256, "block_n": 64, "num_warps": 4, "num_stages": 2})
    assert pa.tiles("sm_90")["partition"] == 256
    # 4 sequences x 8 heads x ceil(1024 / 256) partitions x (head_dim + 2) fp32
    assert pa.workspace_nbytes(4, 8, 128, None, 1024) == 4 * 8 * 4 * 130 * 4


def _doc():
    """A sweep result of three tiles at two shapes: b is best at shape 0, c at shape 1, and a is the
    one whose worst shape is nearest its best (1.1x) although its total is not the least."""
    rows = [{"tile": {"block_t": 64}, "ms": [1.1, 1.1]}, {"tile": {"block_t": 128}, "ms": [1.0, 1.5]},
            {"tile": {"block_t": 32}, "ms": [1.6, 0.55 + 0.45]}, {"tile": {"block_t": 16}, "ms": [None, 0.5]}]
    return {"device": "NVIDIA H200", "triton": "3.6.0", "date_utc": "2026-12-02 02:50:00Z",
            "ops": {mqa.OP: {"shapes": ["s0", "s1"], "bytes": [4.8e9, 4.8e9], "rows": rows}}}


def test_summary_picks_the_tile_nearest_every_shapes_best():
    s = _tool().summarize(_doc(), 4.8e12)[mqa.OP]
    assert s["winner"] == {"block_t": 64} and s["winner_index"] == 0
    assert s["winner_worst_over_best"] == 1.1
    assert [b["tile"] for b in s["best_per_shape"]] == [{"block_t": 128}, {"block_t": 32}]
    assert s["best_per_shape"][0]["frac_peak"] == 1.0  # 4.8 GB in 1 ms at 4.8 TB/s


def test_apply_merges_the_winner_into_the_table(tmp_path):
    tool = _tool()
    doc = _doc()
    doc["summary"] = tool.summarize(doc, 4.8e12)
    sweep = tmp_path / "membw_sweep.json"
    sweep.write_text(json.dumps(doc))
    table = tmp_path / "sm_90.json"
    table.write_text(json.dumps({"arch": "sm_90", "ops": {"gemm": {"bf16": {"large": {"params": {"x": 1}}}}}}))
    assert tool.apply(str(sweep), str(table), "") == 0
    got = json.loads(table.read_text())
    assert got["ops"]["gemm"]["bf16"]["large"]["params"] == {"x": 1}  # other entries kept
    entry = got["ops"][mqa.OP]["bf16"]["default"]
    assert entry["params"] == {"block_t": 64} and entry["device"] == "NVIDIA H200"
    assert got["ops"][mqa.OP]["fp16"]["default"]["from"] == "bf16"
    assert tool.apply(str(sweep), str(table), "mqa=1") == 0  # --pick ships a given row instead
    assert json.loads(table.read_text())["ops"][mqa.OP]["bf16"]["default"]["params"] == {"block_t": 128}


def test_qk_norm_rope_ships_each_variants_own_winner_and_never_a_mismatch(tmp_path):
    tool = _tool()
    rows = [{"tile": {"variant": "triton", "tile": 512, "num_warps": 1}, "ms": [1.0, 1.0]},
            {"tile": {"variant": "triton", "tile": 1024, "num_warps": 4}, "ms": [0.8, 0.8]},
            {"tile": {"variant": "cuda", "cuda_tok": 0}, "ms": [0.9, 0.9]},
            {"tile": {"variant": "cuda", "cuda_tok": 4, "cuda_warps": 4}, "ms": [0.5, 0.5], "matches": False},
            {"tile": {"variant": "cuda", "cuda_tok": 2, "cuda_warps": 4}, "ms": [0.7, 0.7]}]
    doc = {"ops": {qnr.OP: {"shapes": ["neox", "gptj"], "bytes": [1e9, 1e9], "rows": rows}}}
    doc["summary"] = tool.summarize(doc, 4.8e12)
    s = doc["summary"][qnr.OP]
    assert s["winner_index"] == 4  # the faster row 3 does not match the reference
    assert s["by_variant"]["triton"]["index"] == 1 and s["by_variant"]["cuda"]["index"] == 4
    (tmp_path / "sweep.json").write_text(json.dumps(doc))
    table = tmp_path / "t.json"
    tool.apply(str(tmp_path / "sweep.json"), str(table), "")
    got = json.loads(table.read_text())["ops"][qnr.OP]["bf16"]["default"]["params"]
    assert got == {"tile": 1024, "num_warps": 4, "cuda_tok": 2, "cuda_warps": 4}
    spec = registry.get(qnr.OP)
    assert all(v in spec.tunables[k] for k, v in got.items())


@pytest.mark.parametrize("entry, max_splits", [(96, 16), (80, 16), (80, 4096), (40, 16)])
def test_gather_units_cover_every_page_run(monkeypatch, entry, max_splits):
    """The flat kernel's units (block_t x block_e elements of a page's run): several per page, a
    partial last one, programs that copy several units (max_splits 16) or at most one (4096),
    sequences of 0 to 5 pages, an unaligned entry (40 elements)."""
    for k, v in (("BLOCK_T", 8), ("BLOCK_E", 64), ("NUM_WARPS", 4), ("MAX_SPLITS", max_splits)):
        monkeypatch.setenv(f"JITKERN_GATHER_KV_CACHE_{k}", str(v))
    jitkern.reset()
    g = torch.Generator().manual_seed(entry)
    page, lens = 16, torch.tensor([37, 0, 80, 1, 16], dtype=torch.int32)
    cache = torch.randn(40, page, entry, generator=g).to(torch.bfloat16)
    bt = torch.randperm(40, generator=g)[:25].int().view(5, 5)
    cu = torch.zeros(6, dtype=torch.int32)
    cu[1:] = torch.cumsum(lens, 0)
    y = gkv.gather_kv_cache(cache, bt, cu)
    assert torch.equal(y, gkv.reference(cache, bt, cu))
    (cfg,) = jitkern.dispatcher(gkv.SPEC).active_configs()
    assert cfg.p.get("flat") and cfg.p["block_t"] * cfg.p["block_e"] == 512


def test_pa_min_rows_halves_the_partition_for_small_grids_and_sizes_the_workspace_alike(monkeypatch):
    tile = {"partition": 2048, "block_n": 128, "num_warps": 4, "num_stages": 3, "min_rows": 4096}
    assert pa.partition_for(tile, 32, 32, 2048) == 512  # 32 x 32 heads x 4 partitions = 4096 rows
    assert pa.partition_for(tile, 64, 32, 8192) == 2048  # already 8192 rows
    assert pa.partition_for(tile, 1, 1, 2048) == 256  # never below 256
    assert pa.partition_for(dict(tile, block_n=1024 // 2), 1, 1, 2048) == 512  # nor below block_n
    assert pa.partition_for(dict(tile, min_rows=0), 1, 1, 2048) == 2048
    _fake_table(monkeypatch, "sm_90", pa.OP, tile)
    jitkern.reset()
    b, h, hkv, d, page, ctx = 4, 8, 2, 128, 16, 2048
    meta = dict(device="meta", dtype=torch.bfloat16)
    args = (torch.empty(b, h, d, **meta), torch.empty(b * ctx // page, page, hkv, d, **meta),
            torch.empty(b * ctx // page, page, hkv, d, **meta),
            torch.empty(b, ctx // page, device="meta", dtype=torch.int32), torch.empty(b, device="meta", dtype=torch.int32),
            1.0, None, torch.empty(b, h, d, **meta), None)
    (cand,) = jitkern.dispatcher(pa.SPEC).candidates(args, arch.get("sm_90"), torch.device("meta"))
    part = 256  # 4 x 8 heads: 32 rows per partition; 4096 rows is never reached, the floor stops it
    assert [la.config.p["partition"] for la in cand.launches] == [part, part]
    assert "min_rows" not in cand.launches[0].config.p  # a grid decision, not a build parameter
    assert cand.launches[0].grid[:3] == (b, hkv, ctx // part)
    assert pa.workspace_nbytes(b, h, d, None, b * ctx, ctx) == b * h * (ctx // part) * (d + 2) * 4


@pytest.mark.parametrize("next_n", [1, 2])
@pytest.mark.parametrize("kv_load, merge, span", [(1, 0, 1), (0, 1, 2), (1, 1, 4), (1, 2, 2), (0, 2, 1), (1, 3, 2), (0, 3, 1)])
def test_mqa_tile_fetch_and_merged_dots_match_reference(monkeypatch, next_n, kv_load, merge, span):
    """kv_load 1 (one page-table read per tile) and merge 1 (all queries in one dot, head sum as a second
    dot) at context_len == max_model_len, not a multiple of the tile, and a shorter sequence."""
    for k, v in (("BLOCK_T", 16), ("SPAN", span), ("KV_LOAD", kv_load), ("MERGE", merge)):
        monkeypatch.setenv(f"JITKERN_PAGED_MQA_LOGITS_{k}", str(v))
    jitkern.reset()
    g = torch.Generator().manual_seed(next_n)
    b, h, d, page, max_len = 2, 16, 64, 16, 40
    q = torch.randn(b, next_n, h, d, generator=g).bfloat16()
    kv = torch.randn(6, page, d, generator=g).bfloat16()
    w = torch.rand(b * next_n, h, generator=g)
    bt = torch.tensor([[5, 1, 3], [0, 2, 4]], dtype=torch.int32)
    lens = torch.tensor([max_len, 17], dtype=torch.int32)
    y = mqa.paged_mqa_logits(q, kv, w, lens, bt, max_len)
    ref = mqa.reference(q.float(), kv.float(), w, lens, bt, max_len)
    assert torch.equal(torch.isinf(y), torch.isinf(ref))
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-3)
    (cfg,) = jitkern.dispatcher(mqa.SPEC).active_configs()
    assert cfg.p.get("kv_load", 0) == kv_load and cfg.p.get("merge", 0) == merge


def test_mqa_usable_turns_down_what_a_shape_cannot_use():
    t = {"block_t": 128, "span": 8, "num_warps": 4, "num_stages": 2, "kv_load": 2, "merge": 1}
    assert mqa.usable(t, "sm_90", 64, 64, 2)["kv_load"] == 0  # a 128-row tile spans two 64-token pages
    t64 = dict(t, block_t=64)
    assert mqa.usable(t64, "sm_90", 64, 64, 2) == t64
    assert mqa.usable(t64, "gfx942", 64, 64, 2)["kv_load"] == 1  # no descriptors there
    assert mqa.usable(t64, "sm_90", 64, 64, 2, contiguous=False)["kv_load"] == 1
    assert mqa.usable(t64, "sm_90", 64, 64, 3)["merge"] == 0  # 192 queries: not a power of two
    assert mqa.usable(t64, "sm_90", 64, 128, 4)["merge"] == 0  # 512 > 256


@pytest.mark.parametrize("head_major, min_rows", [(1, 0), (0, 16384), (1, 16384)])
def test_pa_head_major_grid_and_min_rows_match_reference(monkeypatch, head_major, min_rows):
    """head_major swaps the grid's first two dimensions; min_rows (with a 512-token partition on the CPU
    tile's 16-token steps) halves the partition: both must give the reference's output."""
    for k, v in (("HEAD_MAJOR", head_major), ("MIN_ROWS", min_rows), ("PARTITION", 512)):
        monkeypatch.setenv(f"JITKERN_PAGED_ATTENTION_DECODE_{k}", str(v))
    jitkern.reset()
    g = torch.Generator().manual_seed(3)
    b, h, hkv, d, page = 3, 4, 2, 64, 16
    nblk = 40
    k = torch.randn(b * nblk, page, hkv, d, generator=g).bfloat16()
    v = torch.randn(b * nblk, page, hkv, d, generator=g).bfloat16()
    bt = torch.randperm(b * nblk, generator=g).int().view(b, nblk)
    lens = torch.tensor([640, 1, 300], dtype=torch.int32)
    q = torch.randn(b, h, d, generator=g).bfloat16()
    y = pa.paged_attention_decode(q, k, v, bt, lens)
    torch.testing.assert_close(y.float(), pa.reference(q, k, v, bt, lens).float(), atol=2e-2, rtol=2e-2)
    cfgs = {c.variant: c.p for c in jitkern.dispatcher(pa.SPEC).active_configs()}
    assert cfgs["partition"].get("head_major", 0) == head_major
    # 3 x 4 heads x cdiv(640, part) rows: 512 gives 24 rows; 16384 wanted halves down to the 256 floor
    assert cfgs["partition"]["partition"] == (256 if min_rows else 512)


@pytest.mark.parametrize("direct", [True, False])
def test_pa_one_partition_writes_out_directly(monkeypatch, direct):
    """A partition that covers the capacity: one launch, the partition kernel writes out (zeros for an
    empty sequence); DIRECT off gives the two-kernel path, same result."""
    monkeypatch.setattr(pa, "DIRECT", direct)
    monkeypatch.setenv("JITKERN_PAGED_ATTENTION_DECODE_PARTITION", "1024")
    jitkern.reset()
    g = torch.Generator().manual_seed(4)
    b, h, hkv, d, page, nblk = 3, 8, 2, 64, 16, 12
    k = torch.randn(b * nblk, page, hkv, d, generator=g).bfloat16()
    v = torch.randn(b * nblk, page, hkv, d, generator=g).bfloat16()
    bt = torch.randperm(b * nblk, generator=g).int().view(b, nblk)
    lens = torch.tensor([150, 0, 192], dtype=torch.int32)
    q = torch.randn(b, h, d, generator=g).bfloat16()
    out = torch.full((b, h, d), float("nan"), dtype=torch.bfloat16)
    y = pa.paged_attention_decode(q, k, v, bt, lens, out=out)
    assert y is out and torch.equal(y[1], torch.zeros_like(y[1]))
    torch.testing.assert_close(y.float(), pa.reference(q, k, v, bt, lens).float(), atol=2e-2, rtol=2e-2)
    cfgs = {c.variant: c.p for c in jitkern.dispatcher(pa.SPEC).active_configs()}
    assert ("combine" not in cfgs) == direct and cfgs["partition"].get("direct", False) == direct


def test_mqa_buckets_per_shape_are_shipped_and_planned(tmp_path, monkeypatch):
    """Each paged_mqa_logits bucket (next_n x small/large) ships its own winner; the plan picks the
    bucket of its launch, the default where its bucket has none."""
    tool = _tool()
    rows = [{"tile": {"block_t": 64, "span": 4}, "ms": [1.0, 3.0]}, {"tile": {"block_t": 128, "span": 16}, "ms": [2.0, 2.0]}]
    doc = {"peak_TBps": 4.8, "ops": {mqa.OP: {"shapes": ["b=32 n=1 ctx=8192", "b=128 n=1 ctx=16384"],
                                              "bytes": [1e9, 1e9], "rows": rows}}}
    (tmp_path / "s.json").write_text(json.dumps(doc))
    table = tmp_path / "t.json"
    tool.apply(str(tmp_path / "s.json"), str(table), "")
    got = json.loads(table.read_text())["ops"][mqa.OP]["bf16"]
    assert got["n1s"]["params"] == {"block_t": 64, "span": 4} and got["n1l"]["params"] == {"block_t": 128, "span": 16}
    assert got["default"]["params"] == {"block_t": 64, "span": 4}  # worst shape 1.5x its best, not 2x
    monkeypatch.setattr(tuning, "shipped_table", lambda a: json.loads(table.read_text()) if a == "sm_90" else {})
    jitkern.reset()
    assert mqa.tiles("sm_90", "bf16", mqa.buckets(1, 32 * 8192))["span"] == 4
    assert mqa.tiles("sm_90", "bf16", mqa.buckets(1, 128 * 16384))["span"] == 16
    assert mqa.tiles("sm_90", "bf16", mqa.buckets(2, 128 * 16384))["span"] == 4  # no n2 bucket: the default
    (cand,) = jitkern.dispatcher(mqa.SPEC).candidates(_mqa_args("meta"), arch.get("sm_90"), torch.device("meta"))
    assert cand.launches[0].config.p["span"] == 4  # 2 x 64 positions: a small launch
    assert {c.p["span"] for c in mqa.configs(arch.get("sm_90")) if c.p["next_n"] == 1} == {4, 16}


def _pa_args(b, ctx, cap, device="meta"):
    q = torch.empty(b, 32, 128, dtype=torch.bfloat16, device=device)
    k = torch.empty(b * -(-ctx // 16), 16, 8, 128, dtype=torch.bfloat16, device=device)
    bt = torch.empty(b, -(-ctx // 16), dtype=torch.int32, device=device)
    lens = torch.empty(b, dtype=torch.int32, device=device)
    return q, k, k, bt, lens, 0.088, cap, torch.empty_like(q), None


def test_pa_short_buckets_are_shipped_and_planned(tmp_path, monkeypatch):
    """paged_attention_decode: launches of capacity <= SHORT_CAP ship and plan their own tiles (short,
    and short_l with many rows), longer ones the default; sweeps are re-bucketed by today's rules."""
    tool = _tool()
    rows = [{"tile": {"partition": 2048, "block_n": 128, "num_warps": 4, "num_stages": 3}, "ms": [1.0, 2.0, 3.0]},
            {"tile": {"partition": 2048, "block_n": 64, "num_warps": 4, "num_stages": 2}, "ms": [2.0, 1.0, 2.0]},
            {"tile": {"partition": 2048, "block_n": 16, "num_warps": 2, "num_stages": 2}, "ms": [3.0, 3.0, 1.0]}]
    doc = {"peak_TBps": 4.8, "ops": {pa.OP: {"shapes": ["b=32 ctx=2048", "b=32 ctx=129 cap=192",
                                                        "b=128 ctx=129 cap=192"],
                                             "bytes": [1e9, 1e9, 1e9], "rows": rows, "buckets": ["default"] * 3}}}
    (tmp_path / "s.json").write_text(json.dumps(doc))
    table = tmp_path / "t.json"
    tool.apply(str(tmp_path / "s.json"), str(table), "")
    got = json.loads(table.read_text())["ops"][pa.OP]["bf16"]
    assert {b: got[b]["params"]["block_n"] for b in ("default", "short", "short_l")} == \
        {"default": 128, "short": 64, "short_l": 16}
    monkeypatch.setattr(tuning, "shipped_table", lambda a: json.loads(table.read_text()) if a == "sm_90" else {})
    jitkern.reset()
    sm90 = arch.get("sm_90")
    # the capacity is the least of max_context_len and what the cache and table hold
    for (b, ctx, cap), bn in {(32, 129, 192): 64, (128, 129, 192): 16, (128, 1024, 4096): 128, (1, 600, 600): 128}.items():
        cands = jitkern.dispatcher(pa.SPEC).candidates(_pa_args(b, ctx, cap), sm90, torch.device("meta"))
        assert cands[0].launches[0].config.p["block_n"] == bn, (b, ctx, cap)
    assert pa.tiles("gfx942", "bf16", pa.buckets(192, 4096)) == pa.tiles("gfx942")  # other arches keep theirs
    assert {c.p["block_n"] for c in pa.configs(sm90) if c.variant == "partition"} == {16, 64, 128}  # prebuild
