"""Issue 17 items 3 and 4: one rule for transient failures, and prebuild reports what is on disk.

Real processes, real full disks (a small tmpfs mounted for the test: needs root, skipped otherwise),
real worker deaths (SIGKILL from inside a build), real Triton cross-compiles for sm_90.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jitkern.cache import PROBE_BYTES, Layer, write_probe
from jitkern.errors import BuildError, is_transient

REPO = Path(__file__).resolve().parents[1]


def _env(cache=None, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JITKERN_", "TRITON_"))}
    if cache is not None:
        env["JITKERN_CACHE_DIR"] = str(cache)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _run(args, env, timeout=90, cwd=None):
    """Run a command in its own session; on timeout kill the whole group (a hung prebuild's workers too)."""
    p = subprocess.Popen(args, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        pytest.fail(f"{args[2:6]}... did not finish in {timeout} s (hung)")
    return p.returncode, out, err


def _prebuild(*args, env, timeout=90, cwd=None, driver=None):
    cmd = [sys.executable, "-m", "jitkern", "prebuild", *args] if driver is None else \
        [sys.executable, "-c", driver, "prebuild", *args]
    return _run(cmd, env, timeout, cwd)


def _entries(root: Path) -> set[str]:
    return {p.name for p in (Layer(root).root / "entries").glob("*/*")}


@pytest.fixture
def small_disk(tmp_path):
    """A real filesystem that fills up: ``make(size_kib) -> path`` mounts a tmpfs (root only)."""
    mounted = []

    def make(size_kib: int) -> Path:
        d = tmp_path / f"disk{len(mounted)}"
        d.mkdir()
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs (a disk that fills up) needs root")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k,mode=0700", "tmpfs", str(d)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(d)
        return d

    yield make
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def _fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` with real bytes until ``leave`` bytes are free; return the filler file."""
    st = os.statvfs(disk)
    filler = disk / "filler"
    filler.write_bytes(b"\xff" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler


# ---- item 3: one rule --------------------------------------------------------------------------
def test_the_rule_on_real_errors():
    """ENOSPC from a real write (/dev/full), EACCES, a timeout, a dead worker: transient; a compiler's
    own error: permanent. The wrapping keeps the classification (builders wrap with ``from None``)."""
    try:
        with open("/dev/full", "wb") as f:
            f.write(b"x" * 4096)
            f.flush()
    except OSError as e:
        full = e
    assert full.errno == errno.ENOSPC and is_transient(full)
    try:
        try:
            raise full
        except OSError:
            raise BuildError("Triton failed to compile k: OSError: no space") from None
    except BuildError as wrapped:
        assert is_transient(wrapped)
    from concurrent.futures.process import BrokenProcessPool

    assert is_transient(BrokenProcessPool("a worker died"))
    assert is_transient(subprocess.TimeoutExpired(["cc"], 1))
    assert is_transient(PermissionError(errno.EACCES, "denied"))
    assert not is_transient(BuildError("Triton failed to compile k: CompilationError: at 3:4: undefined name"))
    assert not is_transient(ValueError("bad"))


def test_disk_full_in_tritons_cache_is_not_recorded_and_the_next_run_builds(small_disk, tmp_path):
    """Triton's cache dir fills up part-way through a real sm_90 compile (its probe still passes):
    the build fails with ENOSPC. Before: recorded as a failed build, and after the disk is freed
    prebuild still exits 1 ('recorded'); now: reported transient, nothing recorded, the rerun builds."""
    disk = small_disk(PROBE_BYTES // 1024 + 32)
    filler = _fill(disk, PROBE_BYTES + 8 * 1024)  # the probe fits; Triton's ~19 pages for this kernel do not
    cache = tmp_path / "cache"
    env = _env(cache, TRITON_CACHE_DIR=disk / "triton")
    args = ["--arch", "sm_90", "--op", "rms_norm", "--limit", "1", "--jobs", "1", "--progress", "lines",
            "--report", str(tmp_path / "r.json")]
    rc, out, err = _prebuild(*args, env=env)
    assert rc == 1, out + err
    (rec,) = json.loads((tmp_path / "r.json").read_text())["artifacts"]
    assert rec["status"] == "failed" and rec["transient"] is True, rec
    assert "No space left on device" in rec["error"]
    assert _entries(cache) == set()  # no failure record
    filler.unlink()
    rc, out, err = _prebuild(*args, env=env)
    assert rc == 0, out + err
    (rec,) = json.loads((tmp_path / "r.json").read_text())["artifacts"]
    assert rec["status"] == "built" and len(_entries(cache)) == 1


# ---- item 4: prebuild tells the truth and never hangs ------------------------------------------
def test_prebuild_on_a_filling_cache_disk_reports_only_what_it_saved(small_disk, tmp_path):
    """The cache's disk fills up during prebuild: the build path keeps kernels in memory, and before
    prebuild reported all of them 'built', exit 0. Now every 'built' is on disk, the rest are
    failed (transient), exit 1; after freeing space the rerun builds exactly the missing ones. A disk
    that is full from the start is one line, exit 1, before any worker starts."""
    disk = small_disk(PROBE_BYTES // 1024 + 128)
    filler = _fill(disk, PROBE_BYTES + 32 * 1024)
    env = _env(disk / "cache")
    report = tmp_path / "r.json"
    args = ["--arch", "cpu", "--op", "rms_norm", "--limit", "6", "--jobs", "1", "--progress", "none",
            "--report", str(report)]
    rc, out, err = _prebuild(*args, env=env)
    recs = json.loads(report.read_text())["artifacts"]
    on_disk = _entries(disk / "cache")
    built = {r["key"] for r in recs if r["status"] == "built"}
    lost = [r for r in recs if r["status"] != "built"]
    assert rc == 1, out + err
    assert built == on_disk and built, (len(built), len(on_disk))
    assert lost and all(r["status"] == "failed" and r["transient"] for r in lost), lost
    assert "transient" in out
    filler.unlink()
    rc, out, err = _prebuild(*args, env=env)
    assert rc == 0, out + err
    again = {r["key"]: r["status"] for r in json.loads(report.read_text())["artifacts"]}
    assert {k for k, s in again.items() if s == "built"} == {r["key"] for r in lost}
    assert len(_entries(disk / "cache")) == 6
    # full from the start: refused up front, one line
    disk2 = small_disk(PROBE_BYTES // 1024 + 64)
    _fill(disk2, 0)
    rc, out, err = _prebuild("--arch", "cpu", "--op", "rms_norm", "--limit", "2", env=_env(disk2 / "cache"))
    assert rc == 1 and "Traceback" not in err, out + err
    assert "No space left on device" in err and len(err.strip().splitlines()) == 1, err


CRASHY_OP = textwrap.dedent('''
    from pathlib import Path
    import jitkern
    from jitkern.spec import Arg, Config, OpSpec, Variant

    def configs(arch):
        for i in range(6):
            yield Config.make("triton", i=i, die=False)
        yield Config.make("triton", i=99, die=True)

    def fn(*a):
        raise NotImplementedError

    SPEC = jitkern.register(OpSpec(
        name="crashy", variants=(Variant("triton", "k.py.j2", "k", (Arg("x", "*fp32"),)),),
        template_dir=Path(__file__).parent / "crashy_templates", fn=fn, reference=fn, configs=configs))
''')

CRASHY_TEMPLATE = '''import os
import signal
import triton

with open(os.environ["CRASHY_PIDS"], "a") as f:  # which process built this config
    f.write(f"{os.getpid()}\\n")
{% if die %}os.kill(os.getpid(), signal.SIGKILL)  # a compiler crash / the OOM killer, mid-build{% endif %}


@triton.jit
def k(x):
    pass  # config {{ i }}
'''

DRIVER = "import sys, crashy; from jitkern.cli import main; sys.exit(main(sys.argv[1:]))"


def _crashy(tmp_path) -> dict:
    (tmp_path / "crashy_templates").mkdir(exist_ok=True)
    (tmp_path / "crashy_templates" / "k.py.j2").write_text(CRASHY_TEMPLATE)
    (tmp_path / "crashy.py").write_text(CRASHY_OP)
    env = _env(tmp_path / "cache", CRASHY_PIDS=tmp_path / "pids")
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    return env


def test_a_worker_that_dies_is_named_and_prebuild_finishes(tmp_path):
    """One config's build SIGKILLs its worker. Before: prebuild waited forever. Now: that artifact is
    failed (transient: not recorded), the others are built and on disk, exit 1; a rerun builds only it."""
    env = _crashy(tmp_path)
    report = tmp_path / "r.json"
    args = ["--arch", "cpu", "--op", "crashy", "--jobs", "2", "--progress", "none", "--report", str(report)]
    rc, out, err = _prebuild(*args, env=env, timeout=60, driver=DRIVER)
    assert rc == 1, out + err
    recs = {r["params"]["i"]: r for r in json.loads(report.read_text())["artifacts"]}
    assert recs[99]["status"] == "failed" and recs[99]["transient"] and "died" in recs[99]["error"]
    assert all(recs[i]["status"] == "built" for i in range(6)), recs
    assert {recs[i]["key"] for i in range(6)} == _entries(tmp_path / "cache")  # and no record of the crash
    rc, out, err = _prebuild(*args, env=env, timeout=60, driver=DRIVER)
    assert rc == 1
    again = {r["params"]["i"]: r["status"] for r in json.loads(report.read_text())["artifacts"]}
    assert again == {**{i: "cached" for i in range(6)}, 99: "failed"}


def test_jobs_is_capped_by_the_core_count(tmp_path):
    """--jobs 99999999999999999999 started one worker per artifact; now at most one per core."""
    env = _crashy(tmp_path)
    cores = len(os.sched_getaffinity(0))
    rc, out, err = _prebuild("--arch", "cpu", "--op", "crashy", "--limit", "6", "--jobs", "99999999999999999999",
                             "--progress", "none", env=env, timeout=60, driver=DRIVER)
    assert rc == 0, out + err
    pids = set((tmp_path / "pids").read_text().split())
    assert 1 <= len(pids) <= cores, (pids, cores)
    assert f"using {cores}" in err


def test_config_enumeration_errors_surface(tmp_path):
    """Where platformdirs is missing, gemm's tuned-table lookup raised ImportError even with
    --cache-dir (it looked for the default cache): 'except Exception: continue' listed nothing and
    prebuild said "nothing to build", exit 0. Now --cache-dir reaches every lookup of the command
    (jitkern.settings override), so no default cache is looked for and gemm builds; enumeration
    errors that remain are failed records. A bad override (JITKERN_GEMM_BLOCK_M=3) exits 2 with one
    line, as the lazy path raises ConfigError for it."""
    stub = tmp_path / "stub" / "platformdirs"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text('raise ImportError("No module named platformdirs (stub)")\n')
    env = _env(None)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "stub"), env["PYTHONPATH"]])
    report = tmp_path / "r.json"
    rc, out, err = _prebuild("--arch", "cpu", "--op", "gemm", "--progress", "none", "--limit", "4",
                             "--cache-dir", str(tmp_path / "cache"), "--report", str(report), env=env)
    assert rc == 0, out + err
    statuses = {r["status"] for r in json.loads(report.read_text())["artifacts"]}
    assert statuses == {"built"} and "nothing to build" not in out, out + err
    rc, out, err = _prebuild("--arch", "cpu", "--op", "gemm", env=_env(tmp_path / "c2", JITKERN_GEMM_BLOCK_M=3))
    assert rc == 2 and "JITKERN_GEMM_BLOCK_M" in err and "Traceback" not in err, out + err


def test_full_home_on_the_gpu_build_path_is_detected_by_the_probe(small_disk, tmp_path):
    """Triton's cache dir on a full disk: an empty probe file is created there anyway, so the old
    check passed and the sm_90 compile failed with ENOSPC. Now the probe writes real bytes, sees the
    full disk, and Triton is pointed at a private temporary directory (one warning); the build works."""
    disk = small_disk(64)
    _fill(disk, 0)
    assert write_probe(disk) is not None
    code = textwrap.dedent("""
        from jitkern import arch, build
        from jitkern import plan as plan_mod
        from jitkern.library import rms_norm as rn
        job = plan_mod.plan(rn.SPEC, rn.config("bf16", False, True, 256, True), arch.get("sm_90"))
        entry, how = build.get_entry(job)
        print(how, sorted(entry.verified))
    """)
    r = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path / "cache", TRITON_CACHE_DIR=disk / "tc"),
                       capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("built") and "kernel.cubin" in r.stdout
    assert "Triton's cache directory" in r.stderr and "cannot be written" in r.stderr
