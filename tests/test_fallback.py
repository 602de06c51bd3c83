"""The fallback table: recorded build failures (real compiler, real second process), toolchain
changes, clearing failures, in-place backup/restore on a run-time failure, and guard routing.

The variants are host C++ (compiled by the machine's real C++ compiler, called on CPU tensors) and
Triton (interpreter); see tests/fallback_op.py.
"""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import jitkern
from jitkern import counters, failures
from jitkern.builders import cpp
from jitkern.cache import default_store
from jitkern.errors import NoVariantError

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fallback_op  # noqa: E402

TESTS = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def fresh_state():
    jitkern.reset()
    yield
    jitkern.reset()


def fallback_warnings(caplog, op):
    return [r for r in caplog.records if r.levelno == logging.WARNING and f"{op} falls back" in r.getMessage()]


def child(name, order, env_extra=None, tag="a"):
    code = (f"import sys, json; sys.path.insert(0, {str(TESTS)!r}); import fallback_op; "
            f"print(json.dumps(fallback_op.run({name!r}, {tuple(order)!r}, tag={tag!r})))")
    env = {**os.environ, "TRITON_INTERPRET": "1", **(env_extra or {})}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


def test_build_failure_recorded_routed_warned_once_and_skipped_by_second_process(caplog, cache_dir, tmp_path):
    caplog.set_level(logging.INFO, logger="jitkern")
    op = "fb_build_failure"
    order = ("broken", "triton")
    spec = fallback_op.make_spec(op, order)
    route = fallback_op.make_route(spec)
    x = torch.linspace(-3, 3, 1000)
    want = fallback_op.reference(x.clone())
    assert route(x) == "triton"
    assert torch.equal(x, want)
    assert counters.snapshot()["compiler_runs"] == 1  # the real compiler ran once and failed

    # one warning naming the variant, the first compiler error line and the log path
    warns = fallback_warnings(caplog, op)
    assert len(warns) == 1
    msg = warns[0].getMessage()
    assert "'broken'" in msg and "jitkern_test_missing_header_a.h" in msg and "error" in msg.lower()
    recs = failures.failures(default_store())
    assert len(recs) == 1 and recs[0]["variant"] == "broken" and recs[0]["op"] == op
    log_path = Path(recs[0]["log"])
    assert str(log_path) in msg and log_path.is_file()
    log_text = log_path.read_text()
    assert "jitkern_test_missing_header_a.h" in log_text and "exit status" in log_text  # the full log, kept

    # more calls (and a new route for the same op) in this process: no compiler run, no new warning
    for _ in range(3):
        assert route(x) == "triton"
    assert fallback_op.make_route(spec)(x) == "triton"
    assert counters.snapshot()["compiler_runs"] == 1
    assert len(fallback_warnings(caplog, op)) == 1

    # a second process skips the recorded failure without running the compiler
    result, err = child(op, order)
    assert result["variant"] == "triton" and result["ok"]
    assert result["counters"]["compiler_runs"] == 0
    assert result["counters"]["failures_cached"] == 1
    assert "falls back to variant 'triton'" in err and "recorded earlier" in err

    # a different toolchain (another compiler path) has another key: it is retried, fails, is recorded
    wrapper = tmp_path / "bin" / "c++-wrapper"
    wrapper.parent.mkdir()
    real = cpp.find_cxx()
    wrapper.write_text(f'#!/bin/sh\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    result, _ = child(op, order, {"CXX": str(wrapper)})
    assert result["variant"] == "triton" and result["ok"]
    assert result["counters"]["compiler_runs"] == 1 and result["counters"]["failures_recorded"] == 1
    assert len(failures.failures(default_store())) == 2

    # clearing failures makes the next process try again
    assert failures.clear_failures(default_store()) == 2
    assert failures.failures(default_store()) == []
    result, _ = child(op, order)
    assert result["counters"]["compiler_runs"] == 1


def test_inplace_backup_restored_when_a_variant_raises_after_writing(caplog, cache_dir):
    caplog.set_level(logging.WARNING, logger="jitkern")
    op = "fb_runtime_failure"
    route = fallback_op.make_route(fallback_op.make_spec(op, ("raises", "triton")))
    x = torch.linspace(-3, 3, 1000)
    want = fallback_op.reference(x.clone())
    assert route(x) == "triton"
    # 'raises' overwrote the first half with -12345 and failed; the input was restored before Triton ran
    assert torch.equal(x, want)
    snap = counters.snapshot()
    assert snap["runtime_fallbacks"] == 1 and snap["compiler_runs"] == 1
    msg = fallback_warnings(caplog, op)[0].getMessage()
    assert "'raises'" in msg and "raised at run time" in msg and "error code 7" in msg
    # remembered for the process: not tried again, on this route or a new one
    x2 = torch.linspace(-1, 1, 300)
    want2 = fallback_op.reference(x2.clone())
    assert fallback_op.make_route(fallback_op.make_spec(op, ("raises", "triton")))(x2) == "triton"
    assert torch.equal(x2, want2)
    assert counters.snapshot()["runtime_fallbacks"] == 1
    # a run-time failure is not a build failure: nothing recorded on disk
    assert failures.failures(default_store()) == []


def test_backup_only_until_first_success(cache_dir):
    route = fallback_op.make_route(fallback_op.make_spec("fb_backup_once", ("good", "triton")))
    x = torch.linspace(-3, 3, 1000)
    want = x.clone()
    for _ in range(4):
        assert route(x) == "good"
        fallback_op.reference(want)
    assert torch.equal(x, want)
    assert counters.snapshot()["inplace_backups"] == 1  # first call only


def test_guard_routes_tensor_subclass_to_next_variant(cache_dir):
    class Quantized(torch.Tensor):  # stands in for a torchao-style weight subclass (seed 000)
        pass

    route = fallback_op.make_route(fallback_op.make_spec("fb_guard", ("good", "triton"), guarded=("good",)))
    x = torch.linspace(-3, 3, 1000)
    want = fallback_op.reference(x.clone())
    assert route(x) == "good" and torch.equal(x, want)
    q = torch.linspace(-3, 3, 1000).as_subclass(Quantized)
    want_q = fallback_op.reference(torch.linspace(-3, 3, 1000))
    assert route(q) == "triton"
    assert torch.equal(q.as_subclass(torch.Tensor), want_q)
    assert counters.snapshot()["guard_refusals"] == 1
    assert route(x) == "good"  # plain tensors still take the guarded variant
    assert counters.snapshot()["fallbacks"] == 0  # a guard refusal is routing, not a failure
    # the guard is asked once per signature (the tensor's type is part of it): later calls of either
    # signature run the decided candidate's launch function itself, with no guard in front of it
    assert route(q) == "triton" and route(x) == "good" and counters.snapshot()["guard_refusals"] == 1
    fires = {r._slots[i].fire for r in route._routes.values() for i in range(2)} - {None}
    assert set(route._memo.values()) <= fires and len(route._memo) == 2


def test_guard_routes_to_a_pytorch_candidate_for_inputs_no_kernel_supports(cache_dir):
    calls = []

    def torch_impl(x):
        calls.append(1)
        fallback_op.reference(x)

    # fp64 is part of the signature (dtype): the plan sees it; here the guard decides per call instead
    spec = fallback_op.make_spec("fb_native", ("good",), guarded=("good",),
                                 extra_candidates=[jitkern.Candidate(torch=torch_impl, name="torch")])
    route = fallback_op.make_route(spec)
    x = torch.linspace(-3, 3, 128)
    sub = x.clone().as_subclass(Sub)
    want = fallback_op.reference(x.clone())
    assert route(sub) == "torch" and torch.equal(sub.as_subclass(torch.Tensor), want) and calls == [1]
    assert route(x) == "good" and calls == [1] and torch.equal(x, want)
    assert route(x.clone().as_subclass(Sub)) == "torch" and calls == [1, 1]


class Sub(torch.Tensor):
    pass


def test_no_variant_left_is_a_specific_error(cache_dir):
    route = fallback_op.make_route(fallback_op.make_spec("fb_none", ("broken", "raises")))
    x = torch.linspace(-3, 3, 100)
    before = x.clone()
    with pytest.raises(NoVariantError, match="broken: .*jitkern_test_missing_header_a.h.*raises: raised at run time"):
        route(x)
    assert torch.equal(x, before)


def test_doctor_names_active_variant_and_why_earlier_ones_are_not(cache_dir):
    from jitkern import arch, doctor

    spec = fallback_op.make_spec("fb_doctor", ("broken", "good", "triton"))
    cpu = arch.ARCHES["cpu"]
    before = {r["variant"]: r for r in doctor.variant_report(spec, cpu)}
    assert before["broken"]["status"] == "buildable" and before["broken"].get("active")
    route = fallback_op.make_route(spec)
    assert route(torch.ones(10)) == "good"
    recs = {r["variant"]: r for r in doctor.variant_report(spec, cpu)}
    assert recs["broken"]["status"] == "failed" and "jitkern_test_missing_header_a.h" in recs["broken"]["why"]
    assert Path(recs["broken"]["log"]).is_file()
    assert recs["good"]["status"] == "ready" and recs["good"].get("active") and recs["good"]["guard"]
    assert not recs["triton"].get("active")
    gpu = {r["variant"]: r for r in doctor.variant_report(spec, arch.get("sm_90"))}
    assert gpu["good"]["status"] == "unavailable" and "CPU tensors" in gpu["good"]["why"]
    assert gpu["triton"].get("active")


def test_build_time_limit_kills_the_compiler_and_is_not_recorded(cache_dir, tmp_path, monkeypatch, caplog):
    import time

    caplog.set_level(logging.WARNING, logger="jitkern")
    slow = tmp_path / "slow-c++"
    real = cpp.find_cxx()
    # answers --version at once (the key asks it); a compile sleeps first, in a child process of sh
    slow.write_text(f'#!/bin/sh\ncase "$1" in --version) exec {real} "$@";; esac\nsleep 60\nexec {real} "$@"\n')
    slow.chmod(0o755)
    monkeypatch.setenv("CXX", str(slow))
    monkeypatch.setenv("JITKERN_BUILD_TIMEOUT", "1")
    route = fallback_op.make_route(fallback_op.make_spec("fb_timeout", ("good", "triton")))
    t0 = time.monotonic()
    assert route(torch.ones(10)) == "triton"
    assert time.monotonic() - t0 < 30  # the whole process group was killed, not waited for
    msg = fallback_warnings(caplog, "fb_timeout")[0].getMessage()
    assert "timed out after 1 s" in msg
    assert failures.failures(default_store()) == []  # a slow machine is not a broken variant


def test_cli_cache_clear_failures_removes_only_the_records(cache_dir, capsys):
    from jitkern.cli import main

    route = fallback_op.make_route(fallback_op.make_spec("fb_cli_clear", ("broken", "triton")))
    assert route(torch.ones(10)) == "triton"
    assert len(failures.failures(default_store())) == 1
    assert main(["cache", "clear", "--failures"]) == 0
    assert failures.failures(default_store()) == []
    assert list((cache_dir / "v1" / "entries").glob("*/*/kernel.py"))  # the Triton entry stays


def test_first_error_line():
    log = "In file included from a.cu:1:\nb.h:3:10: fatal error: nope.h: No such file or directory\nx\n"
    assert cpp.first_error_line(log) == "b.h:3:10: fatal error: nope.h: No such file or directory"
    assert cpp.first_error_line("\n  something odd\n") == "something odd"
