"""Manifests (issue 15): record what a workload calls, prebuild exactly that for every arch, prove the
cache covers it, and run strict. Real processes, real calls under Triton's interpreter (JITKERN_ARCH
picks the configs), real cross-compiles for gfx942/gfx950/sm_90."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import shutil
import textwrap

import pytest

from jitkern import manifest
from jitkern.cache import Layer, iter_entries, layer_record, read_meta

REPO = Path(__file__).resolve().parents[1]


def _env(cache, **extra):
    env = dict(os.environ)
    env["JITKERN_CACHE_DIR"] = str(cache)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    for k in ("JITKERN_STRICT", "JITKERN_RECORD", "JITKERN_ARCH"):
        env.pop(k, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def jitkern_cli(*args, cache, timeout=300, **extra):
    return subprocess.run([sys.executable, "-m", "jitkern", *args], env=_env(cache, **extra), capture_output=True,
                          text=True, timeout=timeout)


APPENDER = """
import sys
from jitkern import manifest
path, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
for i in range(n):
    manifest.append(path, ['{"op":"x","args":{"tag":"%s","i":%d,"pad":"%s"}}' % (tag, i, "y" * (i % 700))])
"""


def test_appends_from_concurrent_processes_stay_whole_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    procs = [subprocess.Popen([sys.executable, "-c", APPENDER, str(path), tag, "400"], env=_env(tmp_path / "c"))
             for tag in ("a", "b", "c")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    lines = path.read_text().splitlines()
    assert len(lines) == 1200
    recs = [json.loads(ln) for ln in lines]  # no torn or interleaved line
    assert {(r["args"]["tag"], r["args"]["i"]) for r in recs} == {(t, i) for t in "abc" for i in range(400)}
    assert len(manifest.read(path)) == 1200


def test_read_skips_duplicates_and_comments_and_names_a_bad_line(tmp_path):
    import pytest

    from jitkern.errors import ConfigError

    p = tmp_path / "m.jsonl"
    p.write_text('# recorded\n{"op":"a","args":{}}\n\n{"args":{}, "op":"a"}\n{"op":"b","args":{"n":1}}\n')
    m = manifest.read(p)
    assert [r["op"] for r in m.records] == ["a", "b"]
    q = tmp_path / "q.jsonl"
    q.write_text('{"op":"b","args":{"n":1}}\n{"op":"a","args":{}}\n')
    assert manifest.read(q).digest == m.digest  # order and duplicates do not change the digest
    p.write_text('{"op":"a","args":{}}\nnot json\n')
    with pytest.raises(ConfigError, match=r"m.jsonl:2: not a manifest line"):
        manifest.read(p)


def test_full_prebuild_writes_a_layer_record_that_stats_and_doctor_show(tmp_path):
    cache = tmp_path / "c"
    r = jitkern_cli("prebuild", "--arch", "cpu", "--op", "rms_norm", "--limit", "2", "--progress", "none", cache=cache)
    assert r.returncode == 0, r.stderr
    rec = layer_record(Layer(cache))["prebuilds"][-1]
    assert rec["complete"] is True and rec["arches"] == ["cpu"] and rec["manifest"] is None
    assert rec["counts"]["artifacts"] == rec["counts"]["built"] > 0
    s = jitkern_cli("cache", "stats", "--json", cache=cache)
    assert json.loads(s.stdout)["layers"][0]["prebuilds"][-1]["counts"] == rec["counts"]


# ---- record -> prebuild (3 arches, real cross-compiles) -> strict, check, explain ---------------
ARCHES = "gfx942,gfx950,sm_90,cpu"  # cpu: the interpreter this test's processes run on (configs as for sm_90)

WORKLOAD = textwrap.dedent("""
    import json, sys

    def close(got, want, tol):
        return float((got.float() - want.float()).abs().max()) <= tol

    def main(part):  # imports here: the spawned compile workers re-import this file, and need none of them
        import torch
        import jitkern
        from jitkern.library import gemm, rms_norm

        ok, g = True, torch.Generator().manual_seed(0)
        if part in ("a", "both"):  # rms_norm: two dtypes, two widths, with and without the fused residual
            for dtype, rows, n in ((torch.float32, 4, 64), (torch.bfloat16, 3, 128)):
                x, w = torch.randn(rows, n, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)
                ok &= close(jitkern.ops.rms_norm(x, w, 1e-6), rms_norm.reference(x, w, 1e-6), 2e-2)
                r = torch.randn(rows, n, generator=g).to(dtype)
                want = rms_norm.reference(x, w, 1e-5, residual=r.clone())
                ok &= close(jitkern.ops.rms_norm(x, w, 1e-5, residual=r), want, 2e-2)
        if part in ("b", "both"):  # gemm at two token counts (one bucket), and the fp32 rms_norm again
            for m in (16, 8):
                a, b = torch.randn(m, 64, generator=g).half(), torch.randn(32, 64, generator=g).half()
                ok &= close(jitkern.ops.gemm(a, b.t()), gemm.reference(a, b.t()), 5e-2)
            x, w = torch.randn(4, 64, generator=g), torch.randn(64, generator=g)
            ok &= close(jitkern.ops.rms_norm(x, w, 1e-6), rms_norm.reference(x, w, 1e-6), 1e-4)
        print("RESULT " + json.dumps({"ok": bool(ok), "stats": jitkern.stats()}))

    if __name__ == "__main__":  # builds for sm_90 (the budget check) run in spawned workers
        main(sys.argv[1])
""")
#: distinct signatures: rms_norm 2 dtypes x (residual or not) = 4, gemm 2 (M=16, M=8); "b"'s rms_norm is "a"'s
SIGNATURES = 6


def _result(proc_or_run):
    out = proc_or_run.stdout
    line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
    assert line, out + proc_or_run.stderr
    return json.loads(line[7:])


@pytest.fixture(scope="module")
def prebuilt(tmp_path_factory):
    """Two processes record into one manifest (one through 'jitkern record', one through JITKERN_RECORD),
    then 'jitkern prebuild --manifest' builds it for gfx942, gfx950, sm_90 and the interpreter."""
    d = tmp_path_factory.mktemp("manifest")
    script, man = d / "workload.py", d / "manifest.jsonl"
    script.write_text(WORKLOAD)
    interp = {"TRITON_INTERPRET": "1", "JITKERN_ARCH": "sm_90"}
    procs = [
        subprocess.Popen([sys.executable, "-m", "jitkern", "record", "-o", str(man), "--", sys.executable, str(script),
                          "a"], env=_env(d / "rec-a", **interp), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True),
        subprocess.Popen([sys.executable, str(script), "b"], env=_env(d / "rec-b", JITKERN_RECORD=man, **interp),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
    ]
    recorded = []
    for p in procs:
        so, se = p.communicate(timeout=300)
        assert p.returncode == 0, se
        recorded.append(_result(subprocess.CompletedProcess(p.args, 0, so, se)))
    cache = d / "cache"
    r = jitkern_cli("prebuild", "--manifest", str(man), "--arch", ARCHES, "--jobs", "2", "--json",
                    "--progress", "none", cache=cache, JITKERN_ARCH="sm_90")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return {"dir": d, "script": script, "manifest": man, "cache": cache, "report": json.loads(r.stdout),
            "recorded": recorded, "interp": interp}


def test_record_from_two_processes_gives_each_signature_once_per_process(prebuilt):
    assert all(r["ok"] for r in prebuilt["recorded"])  # the recorded calls were real and right
    lines = [ln for ln in prebuilt["manifest"].read_text().splitlines() if ln.strip()]
    recs = [json.loads(ln) for ln in lines]
    m = manifest.read(prebuilt["manifest"])
    assert len(m) == SIGNATURES and m.ops() == ["gemm", "rms_norm"]
    assert len(lines) == SIGNATURES + 1  # the fp32 rms_norm signature came from both processes, once each
    assert all("dtype" in v and "shape" in v and "stride" in v for r in recs for v in r["args"].values()
               if isinstance(v, dict))
    assert all("eps" not in r["args"] for r in recs)  # a per-call scalar is not part of a signature
    assert not any("arch" in ln or "block_" in ln or "cpu" in ln for ln in lines)  # arch-independent


def test_prebuild_covers_every_signature_on_every_arch_and_records_the_layer(prebuilt):
    rep = prebuilt["report"]
    assert rep["complete"] is True
    sigs = rep["signatures"]
    assert len(sigs) == SIGNATURES * 4 and all(s["status"] == "covered" and s["covered_by"] for s in sigs)
    arts = rep["artifacts"]
    for a in ("gfx942", "gfx950", "sm_90"):  # real cross-compiles
        got = [x for x in arts if x["arch"] == a]
        assert got and all(x["status"] in ("built", "rejected_over_budget") for x in got)
        assert {x["op"] for x in got if x["status"] == "built"} == {"gemm", "rms_norm"}
    # only what the signatures select: rms_norm's 4 configs (2 dtypes x residual) per arch, not its 84
    assert len([x for x in arts if x["arch"] == "gfx942" and x["op"] == "rms_norm"]) == 4
    rec = layer_record(Layer(prebuilt["cache"]))["prebuilds"][-1]
    assert rec["manifest"]["digest"] == manifest.read(prebuilt["manifest"]).digest
    assert rec["complete"] is True and rec["arches"] == ARCHES.split(",")
    assert rec["counts"]["covered"] == SIGNATURES * 4 and rec["counts"]["artifacts"] == len(arts)
    s = jitkern_cli("cache", "stats", "--json", cache=prebuilt["cache"])
    assert json.loads(s.stdout)["layers"][0]["prebuilds"][-1]["manifest"]["digest"] == rec["manifest"]["digest"]
    # the C hot path and CUDA loader for this Python ship in the layer (sm_90 is among the arches)
    from jitkern import fastcall

    assert len(list(prebuilt["cache"].rglob(f"host/{fastcall.artifact_name()}"))) == 1


def test_fresh_strict_process_making_the_same_calls_compiles_nothing(prebuilt):
    r = subprocess.run([sys.executable, str(prebuilt["script"]), "both"], capture_output=True, text=True,
                       env=_env(prebuilt["cache"], JITKERN_STRICT=1, **prebuilt["interp"]), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = _result(r)
    assert res["ok"] and res["stats"]["compiles"] == 0 and res["stats"]["disk_hits"] > 0
    c = jitkern_cli("cache", "check", "--manifest", str(prebuilt["manifest"]), "--arch", ARCHES,
                    cache=prebuilt["cache"], JITKERN_ARCH="sm_90")
    assert c.returncode == 0, c.stdout + c.stderr


def test_strict_names_a_changed_codegen_env_var(prebuilt):
    env = _env(prebuilt["cache"], JITKERN_STRICT=1, TRITON_F32_DEFAULT="ieee", **prebuilt["interp"])
    r = subprocess.run([sys.executable, str(prebuilt["script"]), "a"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode != 0
    assert "CacheMissError" in r.stderr and "env: TRITON_F32_DEFAULT added (=ieee)" in r.stderr, r.stderr[-3000:]
    assert "rms_norm/triton(" in r.stderr
    e = jitkern_cli("cache", "explain", "--manifest", str(prebuilt["manifest"]), "--arch", "sm_90",
                    cache=prebuilt["cache"], TRITON_F32_DEFAULT="ieee")
    assert e.returncode == 1 and e.stdout.count("env: TRITON_F32_DEFAULT added (=ieee)") == SIGNATURES, e.stdout


def test_check_on_a_cache_missing_one_entry_names_that_signature(prebuilt, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(prebuilt["cache"], cache, symlinks=True)
    layer = Layer(cache)
    gone = [k for k, p in iter_entries(layer) if (read_meta(p).get("op"), read_meta(p).get("arch"),
                                                   read_meta(p).get("status", "ok")) == ("gemm", "gfx950", "ok")]
    assert len(gone) == 1  # both gemm signatures (M=16, M=8) run the same config
    layer.discard(gone[0])
    c = jitkern_cli("cache", "check", "--manifest", str(prebuilt["manifest"]), "--arch", ARCHES, cache=cache,
                    JITKERN_ARCH="sm_90")
    assert c.returncode == 1
    bad = [ln for ln in c.stdout.splitlines() if ln.startswith("not covered")]
    assert len(bad) == 2 and all("gfx950: gemm(a=float16[" in ln for ln in bad), c.stdout
    assert any("a=float16[16,64]" in ln for ln in bad) and any("a=float16[8,64]" in ln for ln in bad)
