"""A compiler's ``--version`` (part of C++ keys) is remembered across processes in the cache layer
(``jitkern.toolversions``): real processes, a stand-in compiler that records each run, and real nvcc."""
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: A fresh process takes the CUDA fingerprint for sm_90 (what planning a CUDA kernel does), then,
#: unless told to only look, opens the cache's write layer (as a lookup or build does, creating it
#: if missing) and plans again.
PROBE = textwrap.dedent("""
    import json, sys, jitkern
    from jitkern import arch
    from jitkern.builders import cpp
    from jitkern.cache import default_store
    fp = cpp.CUDA.fingerprint(arch.get("sm_90"))
    if sys.argv[1:] != ["look"]:
        default_store().write_layer
        assert cpp.CUDA.fingerprint(arch.get("sm_90")) == fp
    s = jitkern.stats()
    print(json.dumps({"version": fp["version"], "queries": s["toolchain_queries"],
                      "hits": s["toolchain_cache_hits"]}))
""")


def fresh_process(cache: Path, nvcc: str | None = None, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JITKERN_")}
    env.update(PYTHONPATH=str(ROOT), JITKERN_CACHE_DIR=str(cache))
    if nvcc:
        env["JITKERN_NVCC"] = nvcc
    r = subprocess.run([sys.executable, "-c", PROBE, *args], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def fake_nvcc(d: Path, release: str = "12.8") -> tuple[Path, Path]:
    """An executable that prints a version and appends a line to ``runs`` every time it is run."""
    tool, runs = d / "nvcc", d / "runs.txt"
    # (the runs file is named relative to the script: a wrapper's absolute paths are part of its identity)
    tool.write_text(f"#!/bin/sh\necho run >> \"$(dirname \"$0\")/{runs.name}\"\n"
                    f"echo 'Cuda compilation tools, release {release}'\n")
    tool.chmod(0o755)
    return tool, runs


def runs(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def records(cache: Path) -> list[Path]:
    return sorted(cache.glob("v*/toolchains/*/*.json"))


@pytest.fixture
def tool(tmp_path):
    return fake_nvcc(tmp_path)


def test_second_fresh_process_runs_no_toolchain_query(tmp_path, tool):
    nvcc, ran = tool
    cache = tmp_path / "cache"
    first = fresh_process(cache, str(nvcc))
    assert first == {"version": "Cuda compilation tools, release 12.8", "queries": 1, "hits": 0}
    assert runs(ran) == 1
    [rec] = records(cache)
    assert stat.S_IMODE(rec.stat().st_mode) == 0o600
    assert stat.S_IMODE(rec.parent.stat().st_mode) == 0o700
    assert json.loads(rec.read_text())["path"] == str(nvcc.resolve())
    second = fresh_process(cache, str(nvcc))
    assert second == {"version": first["version"], "queries": 0, "hits": 1}
    assert runs(ran) == 1  # the tool was not started again


def test_touched_or_replaced_tool_is_asked_again(tmp_path, tool):
    nvcc, ran = tool
    cache = tmp_path / "cache"
    fresh_process(cache, str(nvcc))
    st = nvcc.stat()
    os.utime(nvcc, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # touched: a new mtime
    assert fresh_process(cache, str(nvcc))["queries"] == 1
    assert runs(ran) == 2
    new = tmp_path / "nvcc.new"  # replaced (a new inode and size) by an upgrade, same mtime as before
    new.write_text(nvcc.read_text().replace("12.8", "12.9.1"))
    new.chmod(0o755)
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    os.replace(new, nvcc)
    out = fresh_process(cache, str(nvcc))
    assert out["queries"] == 1 and out["version"] == "Cuda compilation tools, release 12.9.1"
    assert runs(ran) == 3
    assert fresh_process(cache, str(nvcc))["queries"] == 0  # and the new binary's answer is remembered


def test_upgrade_behind_an_unchanged_wrapper_script_is_seen(tmp_path):
    """``/usr/local/bin/nvcc`` on the CI box is ``exec /usr/local/cuda-13.0/bin/nvcc "$@"``: the
    wrapper never changes when CUDA is upgraded in place, the compiler it runs does."""
    real_dir = tmp_path / "cuda" / "bin"
    real_dir.mkdir(parents=True)
    real, ran = fake_nvcc(real_dir)
    wrapper = tmp_path / "wrapper-nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    cache = tmp_path / "cache"
    assert fresh_process(cache, str(wrapper))["queries"] == 1
    assert fresh_process(cache, str(wrapper))["queries"] == 0
    real.write_text(real.read_text().replace("12.8", "13.1"))  # upgraded in place; the wrapper is untouched
    out = fresh_process(cache, str(wrapper))
    assert out["queries"] == 1 and out["version"] == "Cuda compilation tools, release 13.1"
    assert runs(ran) == 2


@pytest.mark.parametrize("how", ["world_writable_file", "world_writable_dir", "group_writable_other_group",
                                 "other_owner"])
def test_record_others_could_write_is_ignored(tmp_path, tool, how):
    nvcc, ran = tool
    cache = tmp_path / "cache"
    fresh_process(cache, str(nvcc))
    [rec] = records(cache)
    # a planted record: another version text, in a file another user could have written
    rec.write_text(json.dumps({**json.loads(rec.read_text()), "version": "planted"}))
    if how == "world_writable_file":
        rec.chmod(0o666)
    elif how == "world_writable_dir":
        rec.parent.chmod(0o777)
    elif how == "group_writable_other_group":  # (group-writable by the user's own group is the cache's rule's "ok")
        if os.getuid() != 0:
            pytest.skip("needs root to chgrp a record to a group the user is not in")
        os.chown(rec, -1, 65534)
        rec.chmod(0o660)
    else:
        if os.getuid() != 0:
            pytest.skip("needs root to chown a record to another user")
        os.chown(rec, 65534, 65534)  # nobody
    out = fresh_process(cache, str(nvcc))
    assert out == {"version": "Cuda compilation tools, release 12.8", "queries": 1, "hits": 0}
    assert runs(ran) == 2


@pytest.mark.parametrize("content", [b"{not json", b"", b'["a list"]', b'{"version": 7}', "other_file"])
def test_corrupt_record_is_ignored_and_replaced(tmp_path, tool, content):
    nvcc, ran = tool
    cache = tmp_path / "cache"
    fresh_process(cache, str(nvcc))
    [rec] = records(cache)
    if content == "other_file":  # a sound record, but about another binary (or a stale inode)
        data = json.loads(rec.read_text())
        content = json.dumps({**data, "ino": data["ino"] + 1, "version": "someone else's"}).encode()
    rec.write_bytes(content)
    out = fresh_process(cache, str(nvcc))
    assert out == {"version": "Cuda compilation tools, release 12.8", "queries": 1, "hits": 0}
    assert fresh_process(cache, str(nvcc))["queries"] == 0  # the run rewrote a sound record
    assert runs(ran) == 2


def test_a_process_that_only_looks_creates_no_cache(tmp_path, tool):
    """``jitkern doctor`` and friends create nothing: no record is written into a cache that does
    not exist yet (a later call in a process that builds, once the layer exists, records it)."""
    nvcc, ran = tool
    cache = tmp_path / "cache"
    for _ in range(2):
        assert fresh_process(cache, str(nvcc), "look")["queries"] == 1
    assert not cache.exists() and runs(ran) == 2
    assert fresh_process(cache, str(nvcc))["queries"] == 1  # asked before the layer existed, recorded after
    assert fresh_process(cache, str(nvcc), "look") == {"version": "Cuda compilation tools, release 12.8",
                                                       "queries": 0, "hits": 1}
    assert runs(ran) == 3


def test_no_writable_layer_just_runs_the_tool(tmp_path, tool):
    nvcc, ran = tool
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cache = blocker / "cache"  # cannot be created (root ignores modes, so no chmod here)
    for _ in range(2):
        out = fresh_process(cache, str(nvcc))
        assert out == {"version": "Cuda compilation tools, release 12.8", "queries": 1, "hits": 0}
    assert runs(ran) == 2


def test_a_read_only_layer_from_another_machine_answers(tmp_path, tool):
    """A prebuilt layer's record, made where the same binary had other inode and device numbers (an
    image built elsewhere), answers a process whose only other layer is its own: no compiler run,
    and nothing written into the read-only layer. A touched binary is asked again."""
    nvcc, ran = tool
    shipped = tmp_path / "shipped"
    fresh_process(shipped, str(nvcc))  # the prebuild machine: it records into the layer it builds
    [rec] = records(shipped)
    doc = json.loads(rec.read_text())
    rec.write_text(json.dumps({**doc, "ino": doc["ino"] + 1, "dev": doc["dev"] + 7}))  # another machine's numbers
    rec.chmod(0o600)
    assert fresh_process(shipped, str(nvcc))["queries"] == 1  # as the writable layer: all five must match
    rec.write_text(json.dumps({**doc, "ino": doc["ino"] + 1, "dev": doc["dev"] + 7}))
    rec.chmod(0o600)
    layers = f"{tmp_path / 'user'}{os.pathsep}{shipped}"
    before = rec.read_text()
    out = fresh_process(Path(layers), str(nvcc), "look")  # the user's layer does not exist yet
    assert out == {"version": "Cuda compilation tools, release 12.8", "queries": 0, "hits": 1}
    assert runs(ran) == 2 and rec.read_text() == before
    st = nvcc.stat()
    os.utime(nvcc, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # touched since the image was built
    assert fresh_process(Path(layers), str(nvcc), "look")["queries"] == 1


def test_one_process_asks_once(tool):
    """In a process, the answer is memoised (and the record is read once)."""
    import jitkern
    from jitkern.builders import cpp
    from jitkern.cache import default_store

    nvcc, ran = tool
    default_store().write_layer  # the cache exists (conftest's private JITKERN_CACHE_DIR)
    assert cpp.tool_version(str(nvcc)) == cpp.tool_version(str(nvcc)) == "Cuda compilation tools, release 12.8"
    assert jitkern.stats()["toolchain_queries"] == 1 and runs(ran) == 1
    jitkern.reset()  # process state gone: the record in the cache answers
    assert cpp.tool_version(str(nvcc)) == "Cuda compilation tools, release 12.8"
    assert jitkern.stats()["toolchain_queries"] == 0 and jitkern.stats()["toolchain_cache_hits"] == 1


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_real_nvcc_is_not_run_by_a_warm_process(tmp_path):
    """Planning a qk_norm_rope CUDA kernel for sm_90 in a second process over the same cache starts
    no nvcc, and plans to the same key."""
    script = textwrap.dedent("""
        import json, jitkern
        from jitkern import arch, registry
        from jitkern.plan import plan
        a = arch.get("sm_90")
        spec = registry.get("qk_norm_rope")
        cfg = next(c for c in spec.configs(a) if c.variant == "cuda")
        job = plan(spec, cfg, a)
        print(json.dumps({"key": job.key, "queries": jitkern.stats()["toolchain_queries"],
                          "hits": jitkern.stats()["toolchain_cache_hits"]}))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("JITKERN_")}
    env.update(PYTHONPATH=str(ROOT), JITKERN_CACHE_DIR=str(tmp_path / "cache"))
    outs = []
    for _ in range(2):
        r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        outs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    assert outs[0]["queries"] >= 1 and outs[1]["queries"] == 0 and outs[1]["hits"] >= 1
    assert outs[0]["key"] == outs[1]["key"]
