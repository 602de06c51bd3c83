"""Serve while compiling (JITKERN_BACKGROUND_BUILD=1, jitkern.background): a call whose preferred
candidate is not cached runs on a cached later one while a worker process builds the preferred one,
then switches to it (one log line, a counter), with identical results; no switch while a trace is in
progress; without the setting the preferred candidate is built in the foreground."""
import logging
import os
import time

import pytest
import torch

import jitkern
from jitkern import background, counters, runtime
from jitkern.spec import Config

import background_op as bg

SLEEP = 3.0


@pytest.fixture
def slow(monkeypatch, tmp_path):
    """The slow builder sleeps SLEEP s and logs each build; the fallback variant is already cached."""
    built = tmp_path / "built.txt"
    monkeypatch.setenv("BG_OP_BUILD_SLEEP", str(SLEEP))
    monkeypatch.setenv("BG_OP_BUILT", str(built))
    runtime.kernel(bg.SPEC, Config.make("triton", block=bg.BLOCK), torch.device("cpu"))
    yield built
    background.wait(timeout=120)


def _call(x0):
    x = x0.clone()
    used = jitkern.dispatcher(bg.SPEC)(x)
    return used, x


def _switch_lines(caplog):
    return [r for r in caplog.records if "switching to 'slow'" in r.getMessage()]


def test_serves_from_cached_candidate_then_switches(slow, monkeypatch, caplog):
    monkeypatch.setenv("JITKERN_BACKGROUND_BUILD", "1")
    caplog.set_level(logging.INFO, logger="jitkern")
    x0 = torch.linspace(-3, 3, 1000)
    want = bg.reference(x0.clone())
    t0 = time.monotonic()
    used, x = _call(x0)
    assert used == "triton" and time.monotonic() - t0 < SLEEP  # did not wait for the slow build
    assert torch.equal(x, want)
    assert counters.snapshot()["background_builds"] == 1
    seen = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        used, x = _call(x0)
        assert torch.equal(x, want)  # identical results before and after the switch
        seen.append(used)
        if used == "slow":
            break
        time.sleep(0.05)
    assert seen[-1] == "slow", "never switched to the preferred candidate"
    assert set(seen[:-1]) <= {"triton"}
    assert time.monotonic() - t0 >= SLEEP
    for _ in range(3):
        assert _call(x0)[0] == "slow"
    snap = counters.snapshot()
    assert snap["background_switches"] == 1 and snap["background_builds"] == 1
    assert len(_switch_lines(caplog)) == 1
    lines = slow.read_text().splitlines()
    assert len(lines) == 1 and lines[0].split()[0] != str(os.getpid())  # built once, by the worker


def test_no_switch_while_tracing(slow, monkeypatch):
    monkeypatch.setenv("JITKERN_BACKGROUND_BUILD", "1")
    x0 = torch.arange(300, dtype=torch.float32)
    assert _call(x0)[0] == "triton"
    assert background.wait(timeout=90)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # as inside a torch.compile trace
    assert all(_call(x0)[0] == "triton" for _ in range(3))
    assert counters.snapshot()["background_switches"] == 0
    monkeypatch.undo()
    assert _call(x0)[0] == "slow"
    assert counters.snapshot()["background_switches"] == 1


def test_off_by_default_builds_preferred_in_foreground(slow, monkeypatch):
    monkeypatch.setenv("BG_OP_BUILD_SLEEP", "0.5")
    monkeypatch.delenv("JITKERN_BACKGROUND_BUILD", raising=False)
    x0 = torch.arange(10, dtype=torch.float32)
    t0 = time.monotonic()
    used, x = _call(x0)
    assert used == "slow" and time.monotonic() - t0 >= 0.5
    assert torch.equal(x, bg.reference(x0.clone()))
    assert counters.snapshot()["background_builds"] == 0
    assert slow.read_text().split()[0] == str(os.getpid())  # built here


def test_nothing_cached_builds_preferred_in_foreground(monkeypatch, tmp_path):
    """No later candidate can run without a build: deferring would only delay the first call."""
    monkeypatch.setenv("JITKERN_BACKGROUND_BUILD", "1")
    monkeypatch.setenv("BG_OP_BUILD_SLEEP", "0")
    assert _call(torch.ones(4))[0] == "slow"
    assert counters.snapshot()["background_builds"] == 0
