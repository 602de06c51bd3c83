"""The `jitkern` console script, run for real in a subprocess: global options anywhere, one-line
errors with exit 2 for bad arguments, --json on every reporting command, doctor/list/prebuild output."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = shutil.which("jitkern")


def jk(*argv, env=None, cache=None, timeout=300):
    """Run the installed `jitkern` console script against this tree (PYTHONPATH)."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("JITKERN_")}
    e.update(PYTHONPATH=str(REPO), COLUMNS="100")
    if cache is not None:
        e["JITKERN_CACHE_DIR"] = str(cache)
    e.update(env or {})
    cmd = [SCRIPT] if SCRIPT else [sys.executable, "-m", "jitkern"]
    return subprocess.run(cmd + [str(a) for a in argv], env=e, capture_output=True, text=True, timeout=timeout)


def prebuild_package_op(pkg, op, cache, *extra):
    """`jitkern prebuild --arch cpu --op OP` in a fresh interpreter that first imports the module
    ``pkg/OP.py`` (which registers the op), with this tree and ``pkg`` on the path."""
    code = (f"import sys, {op}; from jitkern.cli import main; "
            f"sys.exit(main(['prebuild', '--arch', 'cpu', '--op', {op!r}, *{list(extra)!r}]))")
    e = {k: v for k, v in os.environ.items() if not k.startswith("JITKERN_")}
    e.update(PYTHONPATH=f"{REPO}{os.pathsep}{pkg}", JITKERN_CACHE_DIR=str(cache))
    return subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, timeout=300)


def one_line_usage_error(r, says):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    err = r.stderr.strip()
    assert "Traceback" not in r.stderr and "\n" not in err, r.stderr
    assert says in err, err
    assert err.startswith("jitkern"), err


def test_the_console_script_is_the_one_under_test():
    assert SCRIPT, "the jitkern console script is not on PATH (pip install -e . or pip install .)"


@pytest.mark.parametrize("argv,says", [
    (["prebuild", "--jobs", "0"], "expected a positive whole number"),
    (["prebuild", "--arch", "gfx9999"], "unknown arch 'gfx9999'"),
    (["list", "--bogus"], "unrecognized arguments: --bogus"),
    (["doctor", "--bogus"], "unrecognized arguments: --bogus"),
    (["config", "extra"], "unrecognized arguments: extra"),
    (["cache"], "required: ACTION"),
    (["cache", "frobnicate"], "invalid choice"),
    (["cache", "stats", "--cache-dir", "/etc/passwd"], "--cache-dir /etc/passwd is not a directory"),
    (["cache", "verify", "--cache-dir", "/etc/passwd"], "not a directory"),
    (["cache", "--cache-dir", "/etc/passwd", "stats"], "not a directory"),
    (["--cache-dir", "/etc/passwd", "cache", "clear"], "not a directory"),
    (["cache", "clear", "--cache-dir", ""], "is empty (an unset shell variable?)"),
    (["cache", "prune", "--max-size", "lots"], "'lots' is not a size"),
    (["cache", "export"], "required: FILE"),
    (["cache", "import", "/nonexistent/x.tar"], "cannot read archive"),
    (["tune", "--op", "gemm"], "required: --shapes"),
    (["tune", "--op", "gemm", "--shapes", "abc"], "cannot read shape"),
    ([], "required: COMMAND"),
])
def test_bad_arguments_are_one_line_exit_2_no_traceback(argv, says, tmp_path):
    one_line_usage_error(jk(*argv, cache=tmp_path / "c"), says)


def test_bad_tile_override_fails_prebuild_loudly_not_nothing_to_build(tmp_path):
    """JITKERN_GEMM_BLOCK_M=3 used to give '0 artifacts ... nothing to build', exit 0."""
    r = jk("prebuild", "--arch", "gfx942", "--op", "gemm", cache=tmp_path, env={"JITKERN_GEMM_BLOCK_M": "3"})
    assert r.returncode == 2, r.stdout + r.stderr
    assert "JITKERN_GEMM_BLOCK_M='3' is not allowed" in r.stderr and "Traceback" not in r.stderr
    assert "nothing to build" not in r.stdout


def test_garbage_setting_is_an_error_in_config(tmp_path):
    r = jk("config", cache=tmp_path, env={"JITKERN_DIRECT_LAUNCH": "garbage"})
    assert r.returncode == 2
    assert "JITKERN_DIRECT_LAUNCH='garbage' is not a boolean" in r.stdout


@pytest.mark.parametrize("argv", [
    ["-v", "list", "--cache-dir", "{c}"], ["list", "-v", "--cache-dir", "{c}"],
    ["--cache-dir", "{c}", "list", "--json"], ["list", "--json", "--cache-dir", "{c}"],
    ["--json", "list"],
])
def test_global_options_before_and_after_the_subcommand(argv, tmp_path):
    r = jk(*[a.format(c=tmp_path) for a in argv])
    assert r.returncode == 0, r.stderr
    if "--json" in argv:
        assert {o["op"] for o in json.loads(r.stdout)} >= {"rms_norm", "gemm"}


def test_cache_dir_reaches_doctor_and_config(tmp_path):
    d = tmp_path / "given"
    r = jk("doctor", "--json", "--cache-dir", d, cache=tmp_path / "env")
    assert r.returncode == 0, r.stderr
    assert [x["path"] for x in json.loads(r.stdout)["cache"]["layers"]] == [str(d)]
    r = jk("config", "--json", "--cache-dir", d, cache=tmp_path / "env")
    rows = {x["env"]: x for x in json.loads(r.stdout)["settings"]}
    assert rows["JITKERN_CACHE_DIR"]["value"] == [str(d)] and rows["JITKERN_CACHE_DIR"]["source"] == "override"
    assert not d.exists(), "reporting commands create nothing"


def test_config_json_round_trips_the_registry(tmp_path):
    env = {"JITKERN_LOCK_TIMEOUT": "10m", "JITKERN_GEMM_BLOCK_M": "64", "JITKERN_REMOTE_CACHE_KEY": "s3cret"}
    r = jk("config", "--json", cache=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    rows = {x["env"]: x for x in data["settings"]}
    from jitkern import settings

    assert set(rows) == {s.env for s in settings.registry().values()}
    assert rows["JITKERN_LOCK_TIMEOUT"]["value"] == 600.0 and rows["JITKERN_LOCK_TIMEOUT"]["source"] == "env"
    assert rows["JITKERN_AUTOTUNE"]["value"] is False and rows["JITKERN_AUTOTUNE"]["source"] == "default"
    assert rows["JITKERN_REMOTE_CACHE_KEY"]["value"] == "(set)" and "s3cret" not in r.stdout
    assert data["tile_overrides"] == {"JITKERN_GEMM_BLOCK_M": "64"}
    text = jk("config", cache=tmp_path, env=env).stdout
    assert "JITKERN_LOCK_TIMEOUT" in text and "600.0  [env]" in text and "s3cret" not in text


def test_doctor_json_has_machine_keys_and_typed_values(tmp_path):
    r = jk("doctor", "--json", cache=tmp_path)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert set(d) >= {"gpu", "toolchains", "cache", "ops", "remote", "tuning", "settings"}
    assert all(k.isidentifier() for k in d), list(d)
    layer = d["cache"]["layers"][0]
    assert layer["entries"] == 0 and layer["bytes"] == 0 and layer["writable"] is True
    assert isinstance(d["toolchains"]["triton"], str)
    assert d["ops"]["ops"]["rms_norm"][0]["status"] in ("buildable", "ready")
    assert d["tuning"]["autotune"] is False and isinstance(d["tuning"]["shipped"]["sm_90"]["entries"], int)
    assert d["settings"]["cache_dir"] == {"value": [str(tmp_path)], "source": "env"}


def test_doctor_text_says_no_gpu_once_and_wraps_at_word_boundaries(tmp_path):
    r = jk("doctor", cache=tmp_path, env={"COLUMNS": "80"})
    assert r.returncode == 0, r.stderr
    import torch

    if not torch.cuda.is_available():
        assert r.stdout.count("torch.cuda.is_available() is False") == 1, r.stdout
    for line in r.stdout.splitlines():
        assert len(line) <= 80 or len(line.split()[-1]) > 30, line  # only an unbreakable token (a path) may overflow
    # wrapped, never cut: each shipped table's whole description is there once the lines are joined
    from jitkern import tuning

    flat = " ".join(r.stdout.split())
    for name in ("gfx942", "gfx950", "sm_90"):
        source = " ".join(tuning.shipped_table(name)["source"].split())
        assert source in flat, source


def test_doctor_toolchains_never_show_nvcc_release_as_hipcc(tmp_path):
    """hipcc on a CUDA machine prints nvcc's "release" line too: the HIP compiler is reported by the
    AMD section only, the toolchains section's version picker is for nvcc/ninja/c++."""
    from jitkern.doctor import tool_version

    out = ("nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 12.4, V12.4.131\n")
    assert tool_version("nvcc", out) == "Cuda compilation tools, release 12.4, V12.4.131"
    assert tool_version("c++", "c++ (Debian 12.2.0-14) 12.2.0\nCopyright\n") == "c++ (Debian 12.2.0-14) 12.2.0"
    d = json.loads(jk("doctor", "--json", cache=tmp_path).stdout)
    assert "hipcc" not in d["toolchains"] and "amd" in d


def test_list_sorts_numbers_numerically_and_prints_no_rst(tmp_path):
    r = jk("list", cache=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "``" not in r.stdout
    for line in r.stdout.splitlines():
        key, _, vals = line.strip().partition(": ")
        items = vals.split(", ")
        if key.startswith("block_") and all(v.isdigit() for v in items):
            assert [int(v) for v in items] == sorted(int(v) for v in items), line


def test_cache_clear_never_creates_a_missing_dir_and_has_dry_run(tmp_path):
    missing = tmp_path / "missing"
    r = jk("cache", "clear", "--cache-dir", missing)
    assert r.returncode == 0 and "nothing to clear" in r.stdout and not missing.exists()
    r = jk("cache", "clear", "--json", "--cache-dir", missing)
    assert json.loads(r.stdout)["exists"] is False and not missing.exists()
    cache = tmp_path / "c"
    assert jk("prebuild", "--arch", "cpu", "--op", "rms_norm", "--limit", "1", cache=cache).returncode == 0
    r = jk("cache", "clear", "--dry-run", "--json", cache=cache)
    plan = json.loads(r.stdout)
    assert plan["dry_run"] is True and len(plan["keys"]) == 1 and plan["removed"] == 0
    stats = json.loads(jk("cache", "stats", "--json", cache=cache).stdout)
    assert stats["entries"] == 1, "a dry run removes nothing"
    r = jk("cache", "clear", "--json", cache=cache)
    assert json.loads(r.stdout)["removed"] == 1
    assert json.loads(jk("cache", "stats", "--json", cache=cache).stdout)["entries"] == 0


def test_prebuild_json_report_round_trips_and_says_planning_first(tmp_path):
    cache, report = tmp_path / "c", tmp_path / "r.json"
    r = jk("prebuild", "--arch", "cpu", "--op", "rms_norm", "--limit", "2", "--json", "--report", report, "-v",
           cache=cache)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)  # stdout is the JSON document alone; people's lines went to stderr
    assert data == json.loads(report.read_text())
    assert data["summary"]["cpu"]["built"] == 2 and len(data["artifacts"]) == 2
    assert {"op", "variant", "arch", "params", "key", "status", "seconds", "error"} <= set(data["artifacts"][0])
    assert r.stderr.index("planning rms_norm for cpu") < r.stderr.index("2 artifacts")
    # worker log lines keep their level prefix
    assert "INFO: jitkern: built rms_norm" in r.stderr
    r2 = jk("prebuild", "--arch", "cpu", "--op", "rms_norm", "--limit", "2", cache=cache)
    assert "nothing to build: all 2 artifacts are already in the cache" in r2.stdout


def test_prebuild_closing_line_does_not_claim_cached_when_a_worker_failed(tmp_path):
    """A build that fails in a worker (here: a read-only op module) must not read 'already in the cache'."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "broken_op.py").write_text(
        "import jitkern\n"
        "from pathlib import Path\n"
        "T = Path(__file__).parent / 'tpl'\n"
        "T.mkdir(exist_ok=True)\n"
        "(T / 'k.py.j2').write_text('this is not python {{ n }}\\n')\n"
        "def fn(x):\n    return x\n"
        "SPEC = jitkern.register(jitkern.OpSpec(name='broken_op', fn=fn, reference=fn, template_dir=T,\n"
        "    variants=(jitkern.Variant('triton', 'k.py.j2', 'kern'),),\n"
        "    configs=lambda arch: [jitkern.Config('triton', (('n', 1),))]))\n")
    r = prebuild_package_op(pkg, "broken_op", tmp_path / "c")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "nothing to build" not in r.stdout, r.stdout
    last = r.stdout.splitlines()[-1]
    assert last.startswith("jitkern prebuild: 0 built, ") and "1 failed" in last, last


def test_prebuild_bar_draws_on_a_terminal_of_size_zero(tmp_path):
    """Under a pseudo-terminal of 0 columns and 0 rows tqdm drew nothing until the end ("\\r\\n")."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 0, 0, 0, 0))
    e = {k: v for k, v in os.environ.items() if not k.startswith("JITKERN_") and k not in ("COLUMNS", "LINES")}
    e.update(PYTHONPATH=str(REPO), JITKERN_CACHE_DIR=str(tmp_path / "c"))
    cmd = ([SCRIPT] if SCRIPT else [sys.executable, "-m", "jitkern"]) + [
        "prebuild", "--arch", "cpu", "--op", "rms_norm", "--limit", "2", "--jobs", "1"]
    p = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=e, close_fds=True)
    os.close(slave)
    out = b""
    while True:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        elif p.poll() is not None:
            break
    assert p.wait(timeout=300) == 0, out
    text = out.decode(errors="replace")
    assert "jitkern prebuild:   0%|" in text and "| 2/2 [" in text, text


def test_a_key_that_changed_while_prebuild_ran_names_the_part(monkeypatch):
    """The worker's key differs from the parent's (here: a Triton codegen variable set after planning,
    as a toolchain installed midway would change the compiler part): the failure names the part, not
    "the op's template or code changed"."""
    import dataclasses

    from jitkern import arch, prebuild

    monkeypatch.delenv("TRITON_F32_DEFAULT", raising=False)
    task = prebuild.enumerate_tasks(["rms_norm"], [arch.get("cpu")], limit=1)[0]
    monkeypatch.setenv("TRITON_F32_DEFAULT", "ieee")
    rec = prebuild.build_task(dataclasses.replace(task))
    assert rec["status"] == "failed"
    assert "what changed while prebuild ran: env: TRITON_F32_DEFAULT added (=ieee)" in rec["error"], rec["error"]
    assert "template or code changed" not in rec["error"]


def test_no_numpy_warning_from_the_cli_or_its_workers(tmp_path):
    """Where numpy is missing, every `import torch` warned "Failed to initialize NumPy" (parent and each
    prebuild worker); the CLI has nothing for the user to do about it, so it is filtered."""
    stub = tmp_path / "stub" / "numpy"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text('raise ModuleNotFoundError("No module named numpy", name="numpy")\n')
    e = {"PYTHONPATH": f"{tmp_path / 'stub'}{os.pathsep}{REPO}"}
    probe = subprocess.run([sys.executable, "-c", "import torch"], env={**os.environ, **e}, capture_output=True,
                           text=True, timeout=120)
    assert "Failed to initialize NumPy" in probe.stderr, "the stub no longer provokes torch's warning"
    for argv in (["list"], ["prebuild", "--arch", "sm_90", "--op", "rms_norm", "--limit", "1", "--jobs", "1"]):
        r = jk(*argv, cache=tmp_path / "c", env=e)
        assert "Failed to initialize NumPy" not in r.stderr, (argv, r.stderr)
        assert r.returncode == 0, (argv, r.stdout, r.stderr)


WARN_OP = '''
import logging, multiprocessing
from pathlib import Path
import jitkern
T = Path(__file__).parent / "tpl"
T.mkdir(exist_ok=True)
(T / "k.py.j2").write_text("import triton\\nimport triton.language as tl\\n\\n\\n@triton.jit\\n"
                           "def kern(x, n):  # {{ n }}\\n    pass\\n")
if multiprocessing.parent_process() is not None:  # in each prebuild worker
    logging.getLogger("jitkern").warning("jitkern: warn_op: the same warning from every worker")
def fn(x):
    return x
SPEC = jitkern.register(jitkern.OpSpec(name="warn_op", fn=fn, reference=fn, template_dir=T,
    variants=(jitkern.Variant("triton", "k.py.j2", "kern", args=(jitkern.Arg("x", "*fp32"), jitkern.Arg("n", "i32"))),),
    configs=lambda arch: [jitkern.Config("triton", (("n", i),)) for i in range(6)]))
'''


def test_worker_warnings_have_a_level_prefix_and_are_printed_once(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "warn_op.py").write_text(WARN_OP)
    r = prebuild_package_op(pkg, "warn_op", tmp_path / "c", "--jobs", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "the same warning from every worker" in ln]
    assert lines == ["WARNING: jitkern: warn_op: the same warning from every worker"], r.stderr
