"""Persisted tuning records (jitkern.tuning): written once, used by a later process, keyed by the
compiler fingerprint; shipped tables valid for their arch (real cross-compiles, budget-checked)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import jitkern
from jitkern import arch, budget, constraints, doctor, tuning
from jitkern.build import report
from jitkern.plan import plan
from jitkern.errors import ConfigError
from jitkern.library import gemm

from conftest import requires_gpu

REPO = Path(__file__).resolve().parents[1]
SHAPE = (40, 96, 64)  # bucket m64


def _tune_on_cpu(winner_index):
    """Tune the m64 bucket on CPU tensors (interpreter) with a stand-in timer that makes candidate
    ``winner_index`` the fastest; everything else (candidates, launches, persistence) is real."""
    cfgs, run, info, check = gemm.tune_args("bf16", [SHAPE], False, torch.device("cpu"))
    target = cfgs[winner_index]
    timed = []

    def run_marked(cfg):
        fn = run(cfg)
        fn.cfg = cfg
        return fn

    def bench(fn):
        fn()
        timed.append(fn.cfg)
        return 1.0 if fn.cfg == target else 2.0 + len(timed)

    rec = tuning.tune(gemm.SPEC, arch.get("cpu"), "bf16", "m64", cfgs, run_marked, info, check, bench=bench)
    return rec, target, cfgs, timed


def test_record_written_and_used_by_a_second_process(cache_dir):
    untuned = gemm.candidates("cpu", "bf16", "m64")
    rec, target, cfgs, timed = _tune_on_cpu(winner_index=len(untuned) - 1)
    assert timed == cfgs  # every candidate was launched and timed
    tile = {p: target.p[p] for p in gemm.TILE_PARAMS}
    assert rec["params"] == tile and rec["ms"] == 1.0 and rec["shapes"] == [list(SHAPE)]
    path = tuning.record_path("cpu", "gemm", "bf16", "m64")
    assert path.is_file() and str(path).startswith(str(cache_dir))
    assert json.loads(path.read_text())["fingerprint_hash"] == tuning.fingerprint_hash("cpu", "gemm")
    assert untuned[0] != tile  # the winner was not already first

    script = textwrap.dedent(f"""
        import json, torch, jitkern
        from jitkern.library import gemm
        a, b = torch.randn({SHAPE[0]}, {SHAPE[2]}, dtype=torch.bfloat16), torch.randn({SHAPE[2]}, {SHAPE[1]}, dtype=torch.bfloat16)
        c = jitkern.ops.gemm(a, b)
        err = (c.float() - a.float() @ b.float()).abs().max().item()
        cfg = jitkern.dispatcher(gemm.SPEC).route_for(a, b, c).active_candidate.launches[0].config
        print(json.dumps({{"tile": {{p: cfg.p[p] for p in gemm.TILE_PARAMS}}, "err": err,
                          "first": gemm.candidates("cpu", "bf16", "m64")[0]}}))
    """)
    env = {**os.environ, "JITKERN_CACHE_DIR": str(cache_dir), "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    env.pop("JITKERN_AUTOTUNE", None)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["tile"] == tile and got["first"] == tile
    assert got["err"] < 0.5


def test_a_wrong_candidate_never_wins(cache_dir):
    """gemm's check catches a candidate that leaves its output unwritten (NaN) and passes a real one;
    tune() skips what check calls wrong even when it would time fastest."""
    cfgs, run, info, check = gemm.tune_args("bf16", [SHAPE], False, torch.device("cpu"))
    assert check(run(cfgs[0])) is None
    assert "max abs error nan" in check(lambda: None)
    fastest, second = cfgs[0], cfgs[1]

    def run_marked(cfg):
        fn = run(cfg)
        fn.cfg = cfg
        return fn

    def check_marked(fn):  # candidate 0 writes nothing: the real check sees NaN outputs
        return check(lambda: None) if fn.cfg == fastest else check(fn)

    rec = tuning.tune(gemm.SPEC, arch.get("cpu"), "bf16", "m64", cfgs[:3], run_marked, info, check_marked,
                      bench=lambda fn: 1.0 if fn.cfg == fastest else (2.0 if fn.cfg == second else 3.0))
    assert rec["params"] == {p: second.p[p] for p in gemm.TILE_PARAMS}
    assert "nan" in rec["results"][0]["wrong"] and "ms" not in rec["results"][0]


def test_record_of_another_toolchain_is_not_used(monkeypatch):
    rec, target, _, _ = _tune_on_cpu(winner_index=1)
    assert tuning.lookup("cpu", "gemm", "bf16", "m64") == rec["params"]
    monkeypatch.setenv("TRITON_JITKERN_TEST_CODEGEN_FLAG", "1")  # part of the compiler fingerprint
    assert tuning.load_record("cpu", "gemm", "bf16", "m64") is None
    assert tuning.lookup("cpu", "gemm", "bf16", "m64") is None
    assert gemm.candidates("cpu", "bf16", "m64")[0] != rec["params"]


def test_ensure_tuned_does_not_retune():
    rec, _, _, _ = _tune_on_cpu(winner_index=1)

    def must_not_run():
        raise AssertionError("retuned although a record exists")

    assert tuning.ensure_tuned(gemm.SPEC, arch.get("cpu"), "bf16", "m64", must_not_run)["params"] == rec["params"]


def test_autotune_flag_and_shapes_parsing(monkeypatch):
    monkeypatch.setenv("JITKERN_AUTOTUNE", "1")
    assert tuning.autotune_enabled()
    monkeypatch.setenv("JITKERN_AUTOTUNE", "sometimes")
    with pytest.raises(ConfigError, match="JITKERN_AUTOTUNE='sometimes' is not a boolean"):
        tuning.autotune_enabled()
    assert tuning.parse_shapes("4096x4096x4096, 16x4096x4096") == [(4096, 4096, 4096), (16, 4096, 4096)]
    for bad in ("", "4096x", "0x4x4", "axb"):
        with pytest.raises(ConfigError):
            tuning.parse_shapes(bad)


def test_cli_tune_without_gpu_is_a_clear_error(tmp_path):
    env = {**os.environ, "JITKERN_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(REPO)}
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-m", "jitkern", "tune", "--op", "gemm", "--shapes", "64x64x64"],
                         env=env, capture_output=True, text=True, timeout=120)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert out.returncode == 1 and "none was found" in out.stderr
    out = subprocess.run([sys.executable, "-m", "jitkern", "tune", "--op", "gemm", "--shapes", "64xx"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "cannot read shape" in out.stderr


@pytest.mark.parametrize("name", ["sm_90", "gfx942", "gfx950"])
def test_shipped_table_fits_its_arch(name, monkeypatch):
    """Every shipped winner passes the arch rules and, compiled for real, its budget."""
    monkeypatch.delenv("JITKERN_ARCH", raising=False)
    table = tuning.shipped_table(name)
    assert table.get("arch") == name
    entries = table["ops"]["gemm"]["bf16"]
    buckets = {b for b, _ in gemm.BUCKETS}
    assert buckets <= set(entries)
    a = arch.get(name)
    for key, entry in entries.items():
        b, b_trans, big, weight = gemm.parse_tuning_bucket(key)  # None (not a record name): fails here
        assert gemm.tuning_bucket(b, b_trans, big, weight) == key
        tile = entry["params"]
        # the six base parameters, plus the Hopper (TMA) ones for sm_90's TMA winners only
        assert set(tile) == set(gemm.tile_of(tile)) and all(v in gemm.TUNABLES[k] for k, v in tile.items())
        assert set(gemm.TILE_PARAMS) <= set(tile) and (not tile.get("tma") or name == "sm_90")
        assert constraints.violations(name, "gemm", dict(tile, dtype="bf16")) == []
        assert gemm.candidates(name, "bf16", b, b_trans=b_trans, big=big, weight=weight)[0] == tile  # shipped first
        if key in ("large", "m16"):  # two real compiles per arch keep this test short
            st = report(plan(gemm.SPEC, gemm.config("bf16", False, True, tile), a))
            assert st["status"] in ("built", "cached"), st
            assert st["shared_bytes"] <= a.shared_mem_per_block


@requires_gpu
def test_gpu_autotune_end_to_end(monkeypatch, cache_dir):
    monkeypatch.setenv("JITKERN_AUTOTUNE", "1")
    a = torch.randn(48, 1024, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
    c = jitkern.ops.gemm(a, b)
    torch.testing.assert_close(c.float(), a.float() @ b.float(), rtol=2e-2, atol=2e-1)
    a_ = arch.current()
    rec = tuning.load_record(a_.name, "gemm", "bf16", gemm.record_bucket((48, 1024, 1024), exact=True))
    assert rec is not None and any("ms" in r for r in rec["results"])
    assert min(r["ms"] for r in rec["results"] if "ms" in r) == rec["ms"]
    (cfg,) = jitkern.dispatcher(gemm.SPEC).active_configs()
    assert {p: cfg.p[p] for p in gemm.TILE_PARAMS} == rec["params"]


def test_exact_records_need_an_op_that_keys_them(monkeypatch):
    """--exact on an op whose tuning hook has no exact= is a clear error, before any device or timing."""
    monkeypatch.setitem(gemm.SPEC.extra, "tuning_bucket", lambda shape, b_trans=False: gemm.record_bucket(shape, b_trans))
    with pytest.raises(ConfigError, match="keeps no exact tuning records"):
        tuning.tune_op("gemm", [SHAPE], "bf16", exact=True, device=torch.device("cpu"))


def test_tune_op_on_cpu_times_for_real_and_cli_prints_the_winner(monkeypatch, capsys):
    """tune_op end to end on CPU tensors (interpreter), timed with a wall clock instead of CUDA events."""
    import argparse
    import time

    def wall_clock(fn):
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    monkeypatch.setattr(tuning, "_bench", wall_clock)
    recs = tuning.tune_op("gemm", [SHAPE, (20, 96, 64)], "fp16", device=torch.device("cpu"))
    (rec,) = recs  # both shapes are in bucket m64: one record
    assert rec["bucket"] == "m64" and rec["shapes"] == [list(SHAPE), [20, 96, 64]]
    assert rec["ms"] == min(r["ms"] for r in rec["results"] if "ms" in r) > 0
    assert tuning.lookup("cpu", "gemm", "fp16", "m64") == rec["params"]
    # a second call reuses the record instead of retuning
    monkeypatch.setattr(tuning, "tune", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retuned")))
    assert tuning.tune_op("gemm", [SHAPE], "fp16", device=torch.device("cpu"))[0]["params"] == rec["params"]
    monkeypatch.setattr(tuning, "tune_op", lambda *a, **k: recs)
    args = argparse.Namespace(op="gemm", shapes="40x96x64", dtype="fp16", b_trans=False, force=False, exact=False, cache_dir=None,
                              json=False)
    from jitkern import cli

    assert cli._run_tune(args) == 0
    out = capsys.readouterr().out
    assert "m64" in out and f"block_m={rec['params']['block_m']}" in out


def test_two_processes_tune_a_bucket_once(cache_dir):
    """Two processes asking for the same untuned bucket at once: one tunes (under the record's file
    lock), the other waits and reads its record."""
    script = textwrap.dedent(f"""
        import json, sys, time, torch
        from jitkern import tuning
        def wall_clock(fn):
            t0 = time.perf_counter(); fn(); return (time.perf_counter() - t0) * 1e3
        tuning._bench = wall_clock
        real_tune = tuning.tune
        ran = []
        def counting_tune(*a, **k):
            ran.append(1)
            time.sleep(1.0)  # widen the race window
            return real_tune(*a, **k)
        tuning.tune = counting_tune
        rec, = tuning.tune_op("gemm", [{SHAPE!r}], "bf16", device=torch.device("cpu"))
        print(json.dumps({{"tuned": len(ran), "params": rec["params"], "created": rec["created"]}}))
    """)
    env = {**os.environ, "JITKERN_CACHE_DIR": str(cache_dir), "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    got = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert sorted(g["tuned"] for g in got) == [0, 1]
    assert got[0]["params"] == got[1]["params"] and got[0]["created"] == got[1]["created"]


def test_doctor_section_lists_records_overrides_and_tables(monkeypatch):
    _tune_on_cpu(winner_index=0)
    monkeypatch.setenv("JITKERN_GEMM_BLOCK_M", "64")
    rows = {r["label"]: r["text"] for r in doctor._doctor_tuning()["rows"]}
    assert rows["tile overrides"] == "JITKERN_GEMM_BLOCK_M=64"
    assert any(k.startswith("records in") and v == "cpu/gemm: 1" for k, v in rows.items())
    # gemm's 58 (per dtype: 4 buckets x 2 layouts, the N=K=8192 size class of the 3 decode buckets for
    # B = w.t(), and 18 per-weight records: the example decoder's 6 weights x 3 decode buckets), then the
    # memory-bound ops' (tools/sweep_membw.py)
    ops = tuning.shipped_table("sm_90")["ops"]
    assert sum(len(ops["gemm"][d]) for d in ops["gemm"]) == 2 * (11 + 18)
    assert rows["shipped sm_90"].startswith(f"{sum(len(b) for op in ops.values() for b in op.values())} entries")


def test_fingerprint_hash_follows_the_codegen_environment(monkeypatch):
    before = tuning.fingerprint_hash("sm_90", "gemm")
    assert tuning.fingerprint_hash("sm_90", "gemm") == before
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "0")
    changed = tuning.fingerprint_hash("sm_90", "gemm")
    assert changed != before
    monkeypatch.delenv("TRITON_DEFAULT_FP_FUSION")
    assert tuning.fingerprint_hash("sm_90", "gemm") == before != tuning.fingerprint_hash("gfx942", "gemm")
