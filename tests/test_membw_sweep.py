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
            tile = buckets[mod.TUNED_BUCKET]["params"]
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
