"""`jitkern prebuild` as users run it: real processes, real compilers, real signals.

CPU numerics run on artifacts built for the pseudo-arch "cpu" (Triton's interpreter); GPU arches are
cross-compiled by Triton for real (sm_90 here: no GPU needed).
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from jitkern.cache import Layer

REPO = Path(__file__).resolve().parents[1]


def _env(cache, **extra):
    env = dict(os.environ)
    env["JITKERN_CACHE_DIR"] = os.pathsep.join(map(str, cache)) if isinstance(cache, (list, tuple)) else str(cache)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def jitkern_cli(*args, cache, timeout=300, **extra):
    return subprocess.run([sys.executable, "-m", "jitkern", *args], env=_env(cache, **extra), capture_output=True,
                          text=True, timeout=timeout)


def snapshot(root: Path) -> dict:
    """Every path under root with its size and mtime: any write, stamp or lock file changes it."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns, st.st_mode)
    return out


def entries(root: Path) -> list[Path]:
    return sorted((Layer(root).root / "entries").glob("*/*"))


def test_prebuild_report_and_second_run_builds_nothing(tmp_path):
    a, report = tmp_path / "A", tmp_path / "report.json"
    r = jitkern_cli("prebuild", "--arch", "cpu", "--op", "rms_norm", "--jobs", "2", "--report", str(report),
                    "--progress", "lines", cache=a)
    assert r.returncode == 0, r.stderr
    rep = json.loads(report.read_text())
    arts = rep["artifacts"]
    # everything rms_norm's spec says the runtime can select, once each
    import jitkern.library.rms_norm as rn
    from jitkern import arch

    assert len(arts) == len(list(rn.configs(arch.get("cpu")))) == len({x["key"] for x in arts})
    assert {x["status"] for x in arts} == {"built"}
    assert rep["summary"]["cpu"]["built"] == len(arts)
    for x in arts:
        assert x["op"] == "rms_norm" and x["variant"] == "triton" and x["arch"] == "cpu"
        assert set(x["params"]) >= {"dtype", "block_n", "residual"} and len(x["key"]) == 64
        assert Layer(a).verify(x["key"]).meta["params"] == x["params"]
    # plain output: one line per artifact, then the summary table
    assert sum(1 for ln in r.stdout.splitlines() if ln.startswith("[") and " built " in ln) == len(arts)

    r2 = jitkern_cli("prebuild", "--arch", "cpu", "--op", "rms_norm", "--report", str(report), cache=a)
    assert r2.returncode == 0, r2.stderr
    assert "nothing to build" in r2.stdout
    assert {x["status"] for x in json.loads(report.read_text())["artifacts"]} == {"cached"}


RUN_OPS = textwrap.dedent("""
    import json, torch, jitkern
    torch.manual_seed(0)
    from jitkern.library.rms_norm import reference
    worst = 0.0
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for n in (1, 100, 256, 5000, 9000):          # single pass, unaligned, and the looped long-row kernel
            for residual in (False, True):
                x = torch.randn(3, n, dtype=dtype); w = torch.randn(n, dtype=dtype)
                r1 = torch.randn(3, n, dtype=dtype) if residual else None
                r2 = r1.clone() if residual else None
                y = jitkern.ops.rms_norm(x, w, residual=r1)
                ref = reference(x, w, residual=r2)
                worst = max(worst, (y.float() - ref.float()).abs().max().item())
    from jitkern.library.gemm import reference as gemm_ref
    for dtype in (torch.bfloat16, torch.float16):
        for m, n, k in ((1, 24, 40), (33, 24, 40), (17, 130, 70)):  # decode and ragged edges
            a = torch.randn(m, k, dtype=dtype); b = torch.randn(k, n, dtype=dtype)
            for bb in (b, b.t().contiguous().t()):                   # row-major and transposed weights
                y, ref = jitkern.ops.gemm(a, bb), gemm_ref(a, bb)
                worst = max(worst, ((y.float() - ref.float()).abs() / (ref.float().abs() + 1)).max().item())
    print(json.dumps({"stats": jitkern.stats(), "worst": worst}))
""")


def test_readonly_layer_serves_everything_without_compiling_or_writing(tmp_path):
    a, b = tmp_path / "A", tmp_path / "B"
    r = jitkern_cli("prebuild", "--arch", "cpu", "--op", "rms_norm", "--op", "gemm", cache=a)
    assert r.returncode == 0, r.stderr
    subprocess.run(["chmod", "-R", "a-w", str(a)], check=True)
    try:
        before = snapshot(a)
        run = subprocess.run([sys.executable, "-c", RUN_OPS], env=_env([b, a], TRITON_INTERPRET="1"),
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        out = json.loads(run.stdout.strip().splitlines()[-1])
        assert out["stats"]["compiles"] == 0, out
        assert out["stats"]["disk_hits"] >= 24, out
        assert out["worst"] < 0.1, out  # and the kernels it loaded compute the right thing
        assert snapshot(a) == before, "the read-only layer was written (entry, stamp or lock file)"
        assert entries(b) == [], "nothing was built, so nothing may be published to the writable layer"
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(a)], check=True)


BAD_OP = textwrap.dedent('''
    from pathlib import Path
    import jitkern
    from jitkern.spec import Arg, Config, OpSpec, Variant

    def configs(arch):
        yield Config.make("triton", ok=True)
        yield Config.make("triton", ok=False)    # renders a module with a syntax error
        yield Config.make("triton", other=1)     # does not render: the template needs `ok`

    def fn(*a):
        raise NotImplementedError

    SPEC = jitkern.register(OpSpec(
        name="badop", variants=(Variant("triton", "k.py.j2", "k", (Arg("x", "*fp32"),)),),
        template_dir=Path(__file__).parent / "badop_templates", fn=fn, reference=fn, configs=configs))
''')


def test_failed_build_exit_status_keep_going_and_report(tmp_path):
    (tmp_path / "badop_templates").mkdir()
    (tmp_path / "badop_templates" / "k.py.j2").write_text(
        "import triton\n@triton.jit\ndef k(x):\n    pass\n{% if not ok %}def broken(:\n{% endif %}\n")
    (tmp_path / "badop.py").write_text(BAD_OP)
    driver = "import sys, badop; from jitkern.cli import main; sys.exit(main(sys.argv[1:]))"
    env = _env(tmp_path / "A")
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    args = ["--arch", "cpu", "--op", "badop", "--report", str(tmp_path / "r.json"), "--jobs", "1"]
    r = subprocess.run([sys.executable, "-c", driver, "prebuild", *args], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "--keep-going" in r.stderr and "Traceback" not in r.stderr
    rep = json.loads((tmp_path / "r.json").read_text())
    by_ok = {x["params"].get("ok"): x for x in rep["artifacts"]}
    assert by_ok[True]["status"] == "built"
    assert by_ok[False]["status"] == "failed" and "SyntaxError" in by_ok[False]["error"]
    assert by_ok[None]["status"] == "failed" and "cannot plan" in by_ok[None]["error"] and "'ok'" in by_ok[None]["error"]
    r = subprocess.run([sys.executable, "-c", driver, "prebuild", *args, "--keep-going"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["cpu"]["failed"] == 2


def _processes_with(marker: str) -> list[int]:
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and int(p.name) != os.getpid():
            try:
                if marker.encode() in (p / "environ").read_bytes():
                    found.append(int(p.name))
            except OSError:
                pass
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds leftover workers through /proc")
def test_sigint_stops_workers_and_leaves_no_partial_entries(tmp_path):
    a = tmp_path / "A-interrupt"
    p = subprocess.Popen([sys.executable, "-m", "jitkern", "prebuild", "--arch", "sm_90", "--op", "rms_norm",
                          "--jobs", "2", "--progress", "lines"], env=_env(a), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    built = 0
    deadline = time.time() + 240
    while built < 3 and time.time() < deadline:  # interrupt mid-run, with compiles in flight
        line = p.stdout.readline()
        assert line or p.poll() is None, p.stderr.read()
        built += " built " in line
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    for _ in range(50):  # the workers are gone too
        if not _processes_with(str(a)):
            break
        time.sleep(0.1)
    assert _processes_with(str(a)) == []
    found = entries(a)
    assert 3 <= len(found) < 84
    for e in found:  # every published entry is whole
        Layer(a).verify(e.name)
    assert list((Layer(a).root / "tmp").iterdir()) == []  # no half-written temporary entries either
    v = jitkern_cli("cache", "verify", cache=a)
    assert v.returncode == 0 and f"{len(found)} entries checked, 0 damaged" in v.stdout


BIG_TILE_OP = textwrap.dedent('''
    from pathlib import Path
    import jitkern
    from jitkern.spec import Arg, Config, OpSpec, Variant

    def configs(arch):
        yield Config.make("triton", bm=32, bn=32, bk=32, num_stages=1, num_warps=4)      # a few KiB
        yield Config.make("triton", bm=128, bn=256, bk=128, num_stages=3, num_warps=8)  # far over 64 KiB

    def fn(*a):
        raise NotImplementedError

    SPEC = jitkern.register(OpSpec(
        name="bigtile", variants=(Variant("triton", "k.py.j2", "k",
                                          (Arg("a", "*fp16"), Arg("b", "*fp16"), Arg("c", "*fp32"))),),
        template_dir=Path(__file__).parent / "bigtile_templates", fn=fn, reference=fn, configs=configs))
''')

BIG_TILE_TEMPLATE = """import triton
import triton.language as tl


@triton.jit
def k(a, b, c):
    m = tl.arange(0, {{ bm }})
    n = tl.arange(0, {{ bn }})
    kk = tl.arange(0, {{ bk }})
    acc = tl.zeros(({{ bm }}, {{ bn }}), dtype=tl.float32)
    for i in range(0, 8):
        x = tl.load(a + i * {{ bm * bk }} + m[:, None] * {{ bk }} + kk[None, :])
        y = tl.load(b + i * {{ bk * bn }} + kk[:, None] * {{ bn }} + n[None, :])
        acc += tl.dot(x, y)
    tl.store(c + m[:, None] * {{ bn }} + n[None, :], acc)
"""


def test_over_budget_artifacts_are_reported_rejected_not_failed(tmp_path):
    """A real gfx942 cross-compile whose LDS use exceeds 64 KiB is `rejected_over_budget`, with figures."""
    (tmp_path / "bigtile_templates").mkdir()
    (tmp_path / "bigtile_templates" / "k.py.j2").write_text(BIG_TILE_TEMPLATE)
    (tmp_path / "bigtile.py").write_text(BIG_TILE_OP)
    driver = "import sys, bigtile; from jitkern.cli import main; sys.exit(main(sys.argv[1:]))"
    env = _env(tmp_path / "A")
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    args = ["prebuild", "--arch", "gfx942", "--op", "bigtile", "--report", str(tmp_path / "r.json"), "--jobs", "2"]
    r = subprocess.run([sys.executable, "-c", driver, *args], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr  # a rejection is the budget check working, not a failure
    by_bm = {x["params"]["bm"]: x for x in json.loads((tmp_path / "r.json").read_text())["artifacts"]}
    small, big = by_bm[32], by_bm[128]
    assert small["status"] == "built" and 0 < small["shared_bytes"] <= 64 * 1024
    assert big["status"] == "rejected_over_budget", big
    assert big["shared_bytes"] > big["budget_bytes"] == 64 * 1024
    r = subprocess.run([sys.executable, "-c", driver, *args], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "nothing to build" in r.stdout, r.stdout + r.stderr
    again = {x["params"]["bm"]: x["status"] for x in json.loads((tmp_path / "r.json").read_text())["artifacts"]}
    assert again == {32: "cached", 128: "rejected_over_budget"}  # remembered, not recompiled


def test_programmatic_prebuild_returns_a_result_and_prints_nothing(tmp_path, capsys):
    """``jitkern.prebuild.prebuild`` is the library entry point (the CLI's printing lives in jitkern.cli)."""
    from jitkern import arch, prebuild

    class Seen(prebuild.Progress):
        def __init__(self):
            self.recs = []

        def update(self, rec):
            self.recs.append(rec["status"])

    cache = tmp_path / "cache"
    seen = Seen()
    res = prebuild.prebuild(["rms_norm"], [arch.get("cpu")], cache, jobs=1, limit=1, progress=seen)
    assert (res.built, res.failed, res.interrupted, seen.recs) == (1, 0, False, ["built"])
    assert res.report()["summary"]["cpu"]["built"] == 1 and res.write_layer == str(cache)
    assert len(entries(cache)) == 1
    again = prebuild.prebuild(["rms_norm"], [arch.get("cpu")], cache, limit=1)
    assert (again.built, again.count("cached")) == (0, 1)
    assert capsys.readouterr().out == ""
