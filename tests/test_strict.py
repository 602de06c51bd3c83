"""Strict mode (issue 15): JITKERN_STRICT=1 turns a run-time compile into CacheMissError, =warn logs
once per key; both explain the miss by the key parts in which the nearest cached entry differs.
The manifest tests (tests/test_manifest.py) cover the same with prebuilt GPU artifacts and processes."""
from __future__ import annotations

import logging

import pytest
import torch

import jitkern
from jitkern import arch, build, counters, key, strict
from jitkern import plan as plan_mod
from jitkern.cache import default_store, nearest
from jitkern.library import rms_norm as rn

CPU = arch.ARCHES["cpu"]


def job(block=256, dtype="fp32"):
    return plan_mod.plan(rn.SPEC, rn.config(dtype, False, True, block, True), CPU)


def test_explain_names_each_changed_part_old_to_new():
    old = [("format", 1), ("source", "a"), ("params", {"block_n": 256, "dtype": "bf16"}),
           ("compiler", {"triton": "3.6.0", "env": {"TRITON_X": "1"}})]
    new = [("format", 1), ("source", "b"), ("params", {"block_n": 512, "dtype": "bf16"}),
           ("compiler", {"triton": "3.6.1", "env": {"TRITON_F32_DEFAULT": "ieee"}})]
    meta = key.recorded(old)
    assert key.differing(meta, new) == ["source", "params", "compiler"]
    assert key.explain(meta, new) == [
        "source: rendered differently (follows from params)", "params: block_n 256 -> 512",
        "env: TRITON_F32_DEFAULT added (=ieee)", "env: TRITON_X removed (was 1)", "compiler: triton 3.6.0 -> 3.6.1"]
    assert key.explain(meta, [p if p[0] != "source" else ("source", "c") for p in old]) == ["source: template changed"]
    assert key.explain(meta, old) == []


def test_strict_raises_on_a_run_time_compile_naming_the_env_part(monkeypatch):
    build.get_entry(job())  # the "prebuilt" entry
    monkeypatch.setenv("JITKERN_STRICT", "1")
    build.get_entry(job())  # a hit is fine
    monkeypatch.setenv("TRITON_F32_DEFAULT", "ieee")
    before = counters.snapshot()["compiles"]
    with pytest.raises(jitkern.CacheMissError) as e:
        build.get_entry(job())
    assert counters.snapshot()["compiles"] == before  # nothing was compiled
    msg = str(e.value)
    assert "rms_norm/triton(" in msg and "for cpu" in msg and "block_n=256" in msg
    assert "env: TRITON_F32_DEFAULT added (=ieee)" in msg
    assert e.value.differences == ("env: TRITON_F32_DEFAULT added (=ieee)",)
    assert e.value.op == "rms_norm" and e.value.arch == "cpu" and e.value.nearest


def test_strict_names_the_triton_version_part(monkeypatch):
    build.get_entry(job())
    real = key._triton_version()
    monkeypatch.setattr(key, "_triton_version", lambda: real + ".post9")
    monkeypatch.setenv("JITKERN_STRICT", "1")
    with pytest.raises(jitkern.CacheMissError, match=rf"compiler: triton {real} -> {real}\.post9"):
        build.get_entry(job())


def test_strict_miss_with_nothing_near_says_so(monkeypatch):
    monkeypatch.setenv("JITKERN_STRICT", "1")
    with pytest.raises(jitkern.CacheMissError, match="no entry for rms_norm/triton on cpu in any cache layer"):
        build.get_entry(job())


def test_nearest_prefers_same_params():
    build.get_entry(job(256))
    build.get_entry(job(512))
    near = nearest(default_store(), "rms_norm", "triton", "cpu", job(512, "fp16").parts)
    assert near.meta["params"]["block_n"] == 512 and "params" in near.differing


def test_strict_warn_logs_once_per_key_and_builds(monkeypatch, caplog):
    monkeypatch.setenv("JITKERN_STRICT", "warn")
    with caplog.at_level(logging.WARNING, logger="jitkern"):
        build.get_entry(job(1024))
        monkeypatch.setenv("TRITON_F32_DEFAULT", "ieee")  # another key for the same config
        build.get_entry(job(1024))
    warnings = [r.getMessage() for r in caplog.records if "JITKERN_STRICT=warn" in r.getMessage()]
    assert len(warnings) == 2 and "no entry for rms_norm/triton on cpu" in warnings[0]
    assert "env: TRITON_F32_DEFAULT added (=ieee)" in warnings[1]
    assert counters.snapshot()["compiles"] == 2


def test_strict_reaches_the_caller_of_an_op_and_is_not_a_fallback(monkeypatch):
    monkeypatch.setenv("JITKERN_STRICT", "1")
    x = torch.randn(4, 64)
    with pytest.raises(jitkern.CacheMissError, match="rms_norm/triton"):
        jitkern.ops.rms_norm(x, torch.ones(64))
    assert counters.snapshot()["compiles"] == 0


def test_bad_strict_value_is_a_config_error(monkeypatch):
    monkeypatch.setenv("JITKERN_STRICT", "maybe")
    with pytest.raises(jitkern.ConfigError, match="JITKERN_STRICT='maybe'"):
        strict.mode()
