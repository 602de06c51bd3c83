"""Reliability and security of the cache (issue 8), with real processes, real kills and real
compilers: crashes, concurrency, corruption, full disks, read-only caches and homes, waiting on
locks, permissions and paths. tools/stress_cache.py runs the long versions (50+ kill trials, 16
processes)."""
from __future__ import annotations

import ctypes
import json
import logging
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import jitkern
from jitkern import arch, build, counters, locks
from jitkern.cache import MANIFEST, Layer, Store, _host_tag, configured_layers
from jitkern.plan import plan as plan_job
from jitkern.errors import CacheError, ConfigError, CorruptEntryError, InsecureCacheError
from jitkern.library import rms_norm as rn

from test_cache import N_KEYS, entries, result, run_worker, start, worker_env

CPU = arch.ARCHES["cpu"]


def cpu_job(n=64, dtype="fp32"):
    block, single = rn.block_for(n)
    return plan_job(rn.SPEC, rn.config(dtype, False, n % 16 == 0, block, single), CPU)


def assert_every_entry_sound(cache_dir):
    layer = Layer(cache_dir)
    for e in entries(cache_dir):
        layer.verify(e.name)  # raises if a half-written or damaged entry was published


def drop_root_write_override():
    """preexec_fn: a root test process still obeys file modes after exec (CAP_DAC_OVERRIDE,
    CAP_DAC_READ_SEARCH and CAP_FOWNER dropped from the bounding set); no-op for other users."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2, 3):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _can_drop_root_override() -> bool:
    try:
        return subprocess.run([sys.executable, "-c", "pass"], preexec_fn=drop_root_write_override).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


#: As root, file modes bind only once CAP_DAC_OVERRIDE is dropped (needs CAP_SETPCAP, which root has
#: in ordinary containers); a non-root user always obeys them.
obeys_file_modes = pytest.mark.skipif(
    os.geteuid() == 0 and not _can_drop_root_override(),
    reason="root without CAP_SETPCAP: no directory is read-only to this user, so there is nothing to test")


# ---- crashes -----------------------------------------------------------------------------------
def test_sigkill_while_building_and_publishing_leaves_nothing_loadable(cache_dir):
    """Kill a process at random moments of its builds and publishes (each file write is slowed so
    kills land inside publishes); after each kill every published entry verifies, and the next
    process builds or loads everything correctly without waiting on the dead process."""
    rng = random.Random(8)
    env = worker_env(cache_dir)
    for trial in range(4):
        p = start(["run-slow-publish"], env)
        assert p.stdout.readline().strip() == '"ready"'
        time.sleep(rng.uniform(0.0, 0.25))
        p.send_signal(signal.SIGKILL)
        p.communicate()
        assert p.returncode == -signal.SIGKILL
        assert_every_entry_sound(cache_dir)
    t0 = time.monotonic()
    after, _ = run_worker(["run"], env)
    assert after["ok"], after["errors"]
    assert after["stats"]["compiles"] + after["stats"]["disk_hits"] == N_KEYS
    assert after["stats"]["corrupt_discarded"] == 0
    assert time.monotonic() - t0 < 120
    assert len(entries(cache_dir)) == N_KEYS
    assert_every_entry_sound(cache_dir)
    assert list((Path(cache_dir) / "v1" / "tmp").iterdir()) == []  # dead processes' tmp dirs removed


def _hold(cache_dir, key):
    p = start(["hold", key], worker_env(cache_dir, interpret=False))
    assert p.stdout.readline().strip() == '"held"'
    return p


def test_dead_holders_lock_is_released_at_once(cache_dir):
    key = cpu_job().key
    holder = _hold(cache_dir, key)
    store = Store([cache_dir])
    owner = locks.read_owner(store.write_layer.root / "locks" / f"{key}.owner")
    assert owner["pid"] == holder.pid and owner["host"] == socket.gethostname()
    with store.build_lock(key, timeout=0.3) as held:
        assert not held  # really contended
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    t0 = time.monotonic()
    with store.build_lock(key, timeout=10) as held:
        waited = time.monotonic() - t0
        assert held
    assert waited < 1.0, f"waited {waited:.2f} s for a dead holder's lock"


def test_waiting_is_logged_with_the_holder_and_bounded(cache_dir, monkeypatch, caplog):
    """A waiter names the holder (pid, host, since when); past JITKERN_LOCK_TIMEOUT the op builds
    privately, gives the right answer, and leaves the holder's key alone."""
    key = cpu_job().key
    holder = _hold(cache_dir, key)
    try:
        monkeypatch.setattr(locks, "WAIT_REPORT_SECONDS", 0.3)
        monkeypatch.setenv("JITKERN_LOCK_TIMEOUT", "1.5")
        x, w = torch.randn(2, 64), torch.randn(64)
        t0 = time.monotonic()
        with caplog.at_level(logging.INFO, logger="jitkern"):
            y = jitkern.ops.rms_norm(x, w)
        took = time.monotonic() - t0
    finally:
        holder.kill()
        holder.wait()
    torch.testing.assert_close(y, rn.reference(x, w))
    assert 1.5 <= took < 30
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert f"pid {holder.pid} on host {socket.gethostname()}" in text and "waiting" in text
    assert "gave up waiting" in text and "private" in text
    assert jitkern.stats()["compiles"] == 1
    assert entries(cache_dir) == []  # the private build is not published under the holder's lock


def test_a_child_never_waits_for_a_lock_its_parent_holds(cache_dir):
    """A multiprocessing "spawn" child re-running an unguarded script would wait for its parent,
    which waits for it: the child sees that the holder is its parent and builds privately."""
    key = cpu_job().key
    code = ("import time, json; from jitkern.cache import Store; t0 = time.monotonic(); "
            f"held = Store([{str(cache_dir)!r}]).build_lock({key!r}).acquire(); "
            "print(json.dumps([held, time.monotonic() - t0]))")
    with Store([cache_dir]).build_lock(key) as held:
        assert held
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    held, waited = json.loads(out.stdout)
    assert held is False and waited < 5
    assert "held by this process's parent" in out.stderr


def test_a_lock_that_cannot_be_taken_still_builds_and_publishes(cache_dir, caplog):
    """Where locks are unusable (here the lock path is a directory; on some network filesystems
    flock is missing), jitkern neither hangs nor falls back to a lock file that would outlive a dead
    holder: it builds, publishes atomically, and says so once."""
    job = cpu_job()
    Layer(cache_dir).writable()
    (Layer(cache_dir).root / "locks" / f"{job.key}.lock").mkdir()
    x, w = torch.randn(2, 64), torch.randn(64)
    with caplog.at_level(logging.WARNING, logger="jitkern"):
        y = jitkern.ops.rms_norm(x, w)
    torch.testing.assert_close(y, rn.reference(x, w))
    assert sum("cannot take build locks" in r.getMessage() for r in caplog.records) == 1
    assert [e.name for e in entries(cache_dir)] == [job.key]


@pytest.mark.parametrize("raw", ["abc", "-1", "nan", "1e", " "])
def test_lock_timeout_env_is_validated(raw, monkeypatch):
    monkeypatch.setenv("JITKERN_LOCK_TIMEOUT", raw)
    if raw.strip():
        with pytest.raises(ConfigError, match="JITKERN_LOCK_TIMEOUT"):
            locks.lock_timeout()
    else:
        assert locks.lock_timeout() == locks.DEFAULT_TIMEOUT
    for good, want in (("0", 0.0), ("2.5", 2.5), ("inf", float("inf"))):
        monkeypatch.setenv("JITKERN_LOCK_TIMEOUT", good)
        assert locks.lock_timeout() == want


def test_stale_tmp_dirs_of_dead_local_processes_are_removed(cache_dir):
    layer = Layer(cache_dir)
    assert layer.writable()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = _host_tag()
    key = "ab" * 32
    tmp = layer.root / "tmp"
    names = {
        f"{key}.{dead.pid}.{host}.0123abcd": False,  # dead pid, this host: removed
        f"{key}.{os.getpid()}.{host}.0123abcd": True,  # alive: kept
        f"{key}.{dead.pid}.some-other-host.0123abcd": True,  # another host's pid means nothing here
        f"discard-{key}-0123abcd": False,  # an interrupted delete
        "triton-cache-xyz": True,  # not ours to judge
    }
    for n in names:
        (tmp / n).mkdir()
        (tmp / n / "kernel.py").write_text("partial")
    removed = layer.clean_stale(force=True)
    assert sorted(removed) == sorted(n for n, keep in names.items() if not keep)
    assert sorted(p.name for p in tmp.iterdir()) == sorted(n for n, keep in names.items() if keep)


# ---- concurrency -------------------------------------------------------------------------------
def test_eight_processes_cold_start_compile_each_key_once(cache_dir):
    env = worker_env(cache_dir)
    procs = [start(["run"], env) for _ in range(8)]
    results = [result(p)[0] for p in procs]
    assert all(r["ok"] for r in results), [r["errors"] for r in results]
    assert sum(r["stats"]["compiles"] for r in results) == N_KEYS
    assert all(r["stats"]["compiles"] + r["stats"]["disk_hits"] == N_KEYS for r in results)
    assert len(entries(cache_dir)) == N_KEYS
    assert_every_entry_sound(cache_dir)


# ---- corruption that checksums cannot see ------------------------------------------------------
@pytest.fixture(scope="module")
def gpu_entries(tmp_path_factory):
    """Real sm_90 and gfx942 entries of the same rms_norm configs, built once for this module."""
    d = tmp_path_factory.mktemp("gpu-entries")
    run_worker(["build", "sm_90", "gfx942"], worker_env(d, interpret=False))
    return d


def _gpu_job(name):
    return plan_job(rn.SPEC, rn.config("fp32", False, True, 256, True), arch.get(name))


def _rewrite_manifest(d: Path):
    """Make an entry's manifest consistent with whatever its files now hold (what a careless copy
    or a malicious writer produces), so only the content checks can catch it."""
    import hashlib

    m = json.loads((d / MANIFEST).read_text())
    for name in m["files"]:
        data = (d / name).read_bytes()
        m["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (d / MANIFEST).write_text(json.dumps(m))


def _install(src_root, key, dst_root) -> Path:
    src = Layer(src_root).entry_dir(key)
    dst = Layer(dst_root).entry_dir(key)
    Layer(dst_root).writable()
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, dst)
    return dst


def test_binary_for_another_arch_in_the_right_place_is_refused(gpu_entries, cache_dir, caplog):
    sm90, gfx = _gpu_job("sm_90"), _gpu_job("gfx942")
    d = _install(gpu_entries, sm90.key, cache_dir)
    shutil.copy(Layer(gpu_entries).entry_dir(gfx.key) / "kernel.hsaco", d / "kernel.cubin")
    _rewrite_manifest(d)
    Layer(cache_dir).verify(sm90.key)  # checksums alone accept it ...
    with pytest.raises(CorruptEntryError, match="AMDGPU binary for gfx942, not a binary for sm_90"):
        build.check_entry(sm90, Layer(cache_dir).verify(sm90.key))
    counters.reset()
    with caplog.at_level(logging.WARNING, logger="jitkern"):
        entry, how = build.get_entry(sm90)  # ... the job check discards it and rebuilds (real compile)
    assert how == "built" and entry.file("kernel.cubin").read_bytes()[18] == 190  # EM_CUDA
    assert jitkern.stats()["corrupt_discarded"] == 1
    assert sum("damaged" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("tamper", ["entry.json arch", "metadata target", "manifest of another key",
                                    "entry under another key"])
def test_entry_for_another_job_is_refused(gpu_entries, cache_dir, tamper):
    sm90, gfx = _gpu_job("sm_90"), _gpu_job("gfx942")
    d = _install(gpu_entries, sm90.key, cache_dir)
    if tamper == "entry.json arch":
        meta = json.loads((d / "entry.json").read_text())
        meta["arch"] = "sm_80"
        (d / "entry.json").write_text(json.dumps(meta))
        _rewrite_manifest(d)
    elif tamper == "metadata target":
        md = json.loads((d / "metadata.json").read_text())
        md["target"]["arch"] = 80
        (d / "metadata.json").write_text(json.dumps(md))
        _rewrite_manifest(d)
    elif tamper == "manifest of another key":
        shutil.copy(Layer(gpu_entries).entry_dir(gfx.key) / MANIFEST, d / MANIFEST)
    else:  # gfx942's whole entry, renamed to sm_90's key
        shutil.rmtree(d)
        shutil.copytree(Layer(gpu_entries).entry_dir(gfx.key), d)
    store = Store([cache_dir])
    assert store.lookup(sm90.key, build.checker(sm90)) is None
    assert not d.exists()  # removed from the cache, never returned for a load
    assert jitkern.stats()["corrupt_discarded"] == 1


# ---- full disk ---------------------------------------------------------------------------------
def test_full_disk_runs_from_memory_with_one_warning_and_leaves_nothing(cache_dir):
    """RLIMIT_FSIZE=1200 B: each kernel.py (~900 B) fits, each entry.json (~1.5 KB) does not, so every
    publish fails part-way with EFBIG, as on a full disk."""
    out, err = run_worker(["run-full-disk", "1200"], worker_env(cache_dir))
    assert out["ok"], out["errors"]
    assert out["stats"]["compiles"] == N_KEYS
    warnings = [ln for ln in err.splitlines() if "could not write cache entry" in ln]
    assert len(warnings) == 1, err[-2000:]
    assert "File too large" in warnings[0]
    assert entries(cache_dir) == []
    assert list((Path(cache_dir) / "v1" / "tmp").iterdir()) == []  # nothing half-written remains


# ---- read-only caches and homes ----------------------------------------------------------------
def _make_read_only(path: Path):
    for p in [path, *path.rglob("*")]:
        if not p.is_symlink():
            p.chmod(p.stat().st_mode & ~0o222)


def _make_writable(path: Path):
    for p in [path, *path.rglob("*")]:
        if not p.is_symlink():
            p.chmod(p.stat().st_mode | 0o200)


def _snapshot(path: Path):
    return sorted((str(p.relative_to(path)), p.stat().st_size) for p in path.rglob("*"))


@obeys_file_modes
def test_read_only_layer_is_read_and_new_kernels_go_to_the_next_layer(tmp_path):
    ro, rw = tmp_path / "ro", tmp_path / "rw"
    first, _ = run_worker(["run"], worker_env(ro))
    assert first["stats"]["compiles"] == N_KEYS
    before = _snapshot(ro)
    _make_read_only(ro)
    try:
        env = worker_env(f"{ro}{os.pathsep}{rw}")
        out, err = run_worker(["run"], env, preexec_fn=drop_root_write_override)
        assert out["ok"], out["errors"]
        assert out["stats"]["compiles"] == 0 and out["stats"]["disk_hits"] == N_KEYS
        assert _snapshot(ro) == before
        # only a read-only layer: loads what it has, nothing to write, no error
        out, err = run_worker(["run"], worker_env(ro), preexec_fn=drop_root_write_override)
        assert out["ok"] and out["stats"]["disk_hits"] == N_KEYS
        assert _snapshot(ro) == before
    finally:
        _make_writable(ro)


@obeys_file_modes
def test_unwritable_home_and_cache_build_in_memory_including_triton_cache(tmp_path):
    """HOME read-only and no JITKERN_CACHE_DIR/XDG_CACHE_HOME: the default layer and Triton's
    ~/.triton/cache cannot be written. Interpreter ops and a real sm_90 cross-compile still work."""
    home = tmp_path / "home"
    home.mkdir()
    _make_read_only(home)
    try:
        env = worker_env(tmp_path / "unused")
        for var in ("JITKERN_CACHE_DIR", "XDG_CACHE_HOME", "TRITON_CACHE_DIR", "TRITON_HOME"):
            env.pop(var, None)
        env["HOME"] = str(home)
        out, err = run_worker(["run"], env, preexec_fn=drop_root_write_override)
        assert out["ok"], out["errors"]
        assert out["stats"]["compiles"] == N_KEYS
        assert sum("no writable jitkern cache layer" in ln for ln in err.splitlines()) == 1
        env.pop("TRITON_INTERPRET")
        out, err = run_worker(["build", "sm_90"], env, preexec_fn=drop_root_write_override)
        assert out["stats"]["compiles"] == 2
        assert all(not s["path"].startswith(str(home)) for s in out["statuses"].values())
        assert sum("Triton's cache directory" in ln for ln in err.splitlines()) == 1
        assert list(home.iterdir()) == []
    finally:
        _make_writable(home)


# ---- permissions and paths ---------------------------------------------------------------------
def test_cache_directories_are_created_private_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        layer = Layer(tmp_path / "a" / "b" / "cache")
        assert layer.writable()
        entry = layer.publish("cd" * 32, {"kernel.py": b"x = 1\n"}, {"op": "t"})
    finally:
        os.umask(old)
    for d in (tmp_path / "a", tmp_path / "a" / "b", layer.base, layer.root, layer.root / "entries",
              layer.root / "locks", layer.root / "tmp", entry.path):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    for f in entry.path.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


@pytest.mark.parametrize("where", ["base", "v1", "entries"])
def test_cache_writable_by_others_is_refused_with_a_fix(cache_dir, where):
    x, w = torch.randn(2, 64), torch.randn(64)
    jitkern.ops.rms_norm(x, w)
    jitkern.dispatch.clear_memory()
    d = {"base": cache_dir, "v1": cache_dir / "v1", "entries": cache_dir / "v1" / "entries"}[where]
    d.chmod(0o777)
    with pytest.raises(InsecureCacheError, match=r"another user.*world-writable.*chmod -R go-w"):
        jitkern.ops.rms_norm(x, w)
    d.chmod(0o700)
    torch.testing.assert_close(jitkern.ops.rms_norm(x, w), rn.reference(x, w))


def test_cache_owned_or_group_writable_by_someone_else_is_refused(cache_dir):
    from jitkern.cache import others_can_write

    layer = Layer(cache_dir)
    layer.writable()
    st = os.stat(layer.root)
    fake = lambda **kw: os.stat_result(tuple(kw.get(f, getattr(st, f)) for f in (  # noqa: E731
        "st_mode", "st_ino", "st_dev", "st_nlink", "st_uid", "st_gid", "st_size", "st_atime", "st_mtime",
        "st_ctime")))
    assert others_can_write(st) is None
    assert "owned by user 4242" in others_can_write(fake(st_uid=4242))
    assert "writable by group 12345" in others_can_write(fake(st_gid=12345, st_mode=st.st_mode | 0o020))
    assert others_can_write(fake(st_gid=os.getgid(), st_mode=st.st_mode | 0o020)) is None  # the user's own group
    assert "world-writable" in others_can_write(fake(st_mode=st.st_mode | 0o002))
    if os.geteuid() == 0:  # the real thing, where the test may change owners
        os.chown(layer.root, 0, 12345)
        layer.root.chmod(0o770)
        with pytest.raises(InsecureCacheError, match="writable by group 12345"):
            Store([cache_dir]).lookup("ab" * 32)
        layer.root.chmod(0o700)
        os.chown(layer.root, 4242, 0)
        with pytest.raises(InsecureCacheError, match="owned by user 4242"):
            Store([cache_dir]).lookup("ab" * 32)


def test_symlinks_are_never_followed_out_of_the_cache(cache_dir, tmp_path):
    job = cpu_job()
    entry, _ = build.get_entry(job)
    outside = tmp_path / "outside"
    shutil.copytree(entry.path, outside)
    # 1. the entry itself is a link to a (valid) entry outside the cache: discarded, target untouched
    shutil.rmtree(entry.path)
    entry.path.symlink_to(outside, target_is_directory=True)
    assert Store([cache_dir]).lookup(job.key) is None
    assert not os.path.lexists(entry.path) and (outside / "kernel.py").exists()
    # 2. a file of the entry is a link out (manifest consistent with the target)
    build.get_entry(job)
    (entry.path / "kernel.py").unlink()
    (entry.path / "kernel.py").symlink_to(outside / "kernel.py")
    with pytest.raises(CorruptEntryError, match="link"):
        Layer(cache_dir).verify(job.key)
    assert Store([cache_dir]).lookup(job.key) is None and (outside / "kernel.py").exists()
    # 3. entries/<xx> is a link out of the cache: refused, nothing under it deleted
    build.get_entry(job)
    shard = entry.path.parent
    shutil.move(shard, tmp_path / "shard")
    shard.symlink_to(tmp_path / "shard", target_is_directory=True)
    with pytest.raises(InsecureCacheError, match="not a real directory"):
        Store([cache_dir]).lookup(job.key)
    assert (tmp_path / "shard" / job.key / "kernel.py").exists()


def test_manifest_paths_and_keys_cannot_escape(cache_dir):
    job = cpu_job()
    entry, _ = build.get_entry(job)
    m = json.loads((entry.path / MANIFEST).read_text())
    m["files"]["../../../../escape"] = {"size": 0, "sha256": ""}
    (entry.path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CorruptEntryError, match="unsafe file"):
        Layer(cache_dir).verify(job.key)
    for bad in ("../" + "a" * 61, "A" * 64, "ab", "ab" * 32 + "/x"):
        with pytest.raises(CacheError, match="malformed cache key"):
            Store([cache_dir]).lookup(bad)
    with pytest.raises(CacheError, match="plain names"):
        Layer(cache_dir).publish("ef" * 32, {"../evil": b""}, {})
    assert not (cache_dir.parent / "evil").exists()


def test_cache_dir_setting_is_validated(tmp_path):
    with pytest.raises(ConfigError, match="NUL"):
        configured_layers("a\0b")
    assert configured_layers(f" {tmp_path} {os.pathsep}{os.pathsep}") == [tmp_path]
    f = tmp_path / "a-file"
    f.write_text("")
    assert Store([f]).write_layer is None  # a file is not a layer: in-memory builds, with a warning


def test_triton_cache_is_checked_before_a_build_not_for_a_cached_entry(cache_dir, monkeypatch):
    """A warm process whose kernels are all cached never writes Triton's cache (CUDA-driver loads
    import no Triton; loads through Triton's driver check it in jitkern.launcher.GPUKernel), so its
    lookups make no write probe of it: only a build does."""
    from jitkern import registry, triton_cache
    from jitkern.plan import plan

    calls = []
    monkeypatch.setattr(triton_cache, "ensure_writable", lambda: calls.append(1))
    spec, sm90 = registry.get("rms_norm"), arch.get("sm_90")
    job = plan(spec, next(iter(spec.configs(sm90))), sm90)
    build.get_entry(job)
    assert calls == [1]
    jitkern.reset()
    build.get_entry(job)
    assert calls == [1]
