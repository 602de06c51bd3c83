"""Manifests (issue 15): record what a workload calls, prebuild exactly that for every arch, prove the
cache covers it, and run strict. Real processes, real calls under Triton's interpreter (JITKERN_ARCH
picks the configs), real cross-compiles for gfx942/gfx950/sm_90."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from jitkern import manifest
from jitkern.cache import Layer, layer_record

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
    d = jitkern_cli("doctor", cache=cache)
    assert "last prebuild" in d.stdout and "complete: every config of every op for cpu" in d.stdout, d.stdout
