"""Issue 17 items 1 and 2: nothing the loader trusts comes from outside a checked entry or a
private directory.

Real processes, real files; where ownership matters a throwaway second user (``useradd``, run as
root; skipped otherwise) plays the attacker.
"""
from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from jitkern import arch
from jitkern.cache import MANIFEST, Layer
from jitkern.errors import InsecureCacheError

REPO = Path(__file__).resolve().parents[1]
CPU = arch.ARCHES["cpu"]

#: A process that runs an op on CPU tensors through the Triton interpreter and checks the numerics.
RUN = textwrap.dedent("""
    import json, os, sys, torch, jitkern
    if len(sys.argv) > 1:
        os.umask(int(sys.argv[1], 8))
    x, w = torch.randn(4, 64), torch.rand(64) + 0.5
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    y = jitkern.ops.rms_norm(x, w, 1e-6)
    print(json.dumps({"rms_norm_ok": bool(torch.allclose(y, ref, atol=1e-4, rtol=1e-4)), "stats": jitkern.stats()}))
""")


def _env(cache, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JITKERN_") and k != "PYTHONDONTWRITEBYTECODE"}
    env.update(PYTHONPATH=str(REPO), JITKERN_CACHE_DIR=str(cache), TRITON_INTERPRET="1")  # Python may write .pyc
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run(cache, *args, check=True, **kw):
    r = subprocess.run([sys.executable, "-c", RUN, *args], env=_env(cache), capture_output=True, text=True,
                       timeout=180, **kw)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr
    return r


@pytest.fixture
def other_user():
    """A throwaway second user (created with useradd, removed afterwards): the attacker."""
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("creating a second user needs root and useradd")
    name = f"jk{uuid.uuid4().hex[:8]}"
    r = subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"useradd failed: {r.stderr.strip()}")
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], capture_output=True)


def as_user(user, code: str, *args) -> subprocess.CompletedProcess:
    def demote():
        os.setgroups([])
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable  # one others may run
    return subprocess.run([python, "-c", code, *args], preexec_fn=demote, capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin"}, cwd="/")


def _modes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): oct(stat.S_IMODE(p.lstat().st_mode)) for p in [root, *root.rglob("*")]}


# ---- item 1: private directories -----------------------------------------------------------------
def _op():
    """Run rms_norm on CPU tensors in this process (Triton interpreter), fresh per call; check it."""
    import torch

    import jitkern

    jitkern.dispatch.clear_memory()
    x, w = torch.randn(4, 64), torch.rand(64) + 0.5
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    assert torch.allclose(jitkern.ops.rms_norm(x, w, 1e-6), ref, atol=1e-4, rtol=1e-4)


def test_everything_jitkern_creates_is_private_whatever_the_umask(cache_dir):
    """Under umask 000 the plan index's directories and records, the lock files and their owner
    files were created 0777/0666: any local user could rewrite them. Now every directory is 0700 and
    every file 0600, entries/, index/, locks/ and tmp/ alike."""
    old = os.umask(0)
    try:
        _op()
    finally:
        os.umask(old)
    modes = _modes(cache_dir)
    assert any(k.startswith("v1/index/") for k in modes) and any(k.startswith("v1/locks/") for k in modes)
    loose = {k: m for k, m in modes.items()
             if m != ("0o700" if (cache_dir / k).is_dir() and not (cache_dir / k).is_symlink() else "0o600")}
    assert loose == {}, loose


@pytest.mark.parametrize("sub", ["index", "locks", "tmp"])
def test_index_locks_and_tmp_writable_by_others_are_refused_like_entries(cache_dir, sub):
    """index/, locks/ and tmp/ were not covered by the ownership check (only the layer, v1/ and
    entries/ were): another user who could write index/ supplied kernel source. Now the same rule
    holds for all four."""
    _op()
    layer = Layer(cache_dir)
    layer.check_secure()
    (layer.root / sub).chmod(0o777)
    with pytest.raises(InsecureCacheError, match=f"{sub}"):
        layer.check_secure()
    with pytest.raises(InsecureCacheError, match="chmod"):
        _op()


def test_lookups_check_a_layer_once_then_again_after_a_reset(cache_dir, monkeypatch):
    """Lookups run the full ownership and mode check once per layer (then one stat of the layer
    directory); after jitkern.runtime.clear_memory() (dispatch.clear_memory, jitkern.reset) in full
    again. Replacing or chmodding the layer directory itself is seen at once."""
    from jitkern import cache, runtime

    _op()
    layer = cache.default_store().layers[0]
    full = []
    orig = Layer._check_secure
    monkeypatch.setattr(Layer, "_check_secure", lambda self: full.append(self) or orig(self))
    _op()  # clear_memory first: one full check, then none for the other lookups of the op
    n = len(full)
    assert n >= 1
    for _ in range(3):
        layer.ensure_secure()
    assert len(full) == n
    cache_dir.chmod(0o777)
    with pytest.raises(InsecureCacheError, match="world-writable"):
        layer.ensure_secure()
    cache_dir.chmod(0o700)
    layer.ensure_secure()
    (layer.root / "entries").chmod(0o777)
    try:
        runtime.clear_memory()
        with pytest.raises(InsecureCacheError, match="entries"):
            layer.ensure_secure()
    finally:
        (layer.root / "entries").chmod(0o700)
    layer.ensure_secure()
    moved = cache_dir.with_name("moved")
    cache_dir.rename(moved)
    try:
        shutil.copytree(moved, cache_dir, symlinks=True)  # another directory in its place: checked in full
        n = len(full)
        layer.ensure_secure()
        assert len(full) == n + 1
    finally:
        shutil.rmtree(moved)


ATTACK = textwrap.dedent("""
    import json, sys
    path, marker = sys.argv[1], sys.argv[2]
    try:
        rec = json.loads(open(path).read())
        rec["source"] = f"open({marker!r}, 'w').write('ran')\\n" + rec["source"]
        open(path, "w").write(json.dumps(rec))
        print("rewritten")
    except OSError as e:
        print("refused", e.errno)
""")


def test_a_second_user_cannot_rewrite_the_plan_index(other_user, monkeypatch):
    """The issue's reproduction: the victim runs with umask 000 and makes the cache readable to others
    (chmod -R go+rX, which passes the ownership check); a second user rewrites a plan-index record
    with their own source. Before, the index file was 0666 in a 0777 directory: the rewrite worked and
    the victim's next process ran the second user's code. Now the rewrite is refused (EACCES)."""
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="jitkern-victim-", dir="/tmp"))  # reachable by the other user
    try:
        top.chmod(0o755)
        cache, marker = top / "c", top / "pwned"
        monkeypatch.setenv("JITKERN_CACHE_DIR", str(cache))
        old = os.umask(0)
        try:
            _op()
        finally:
            os.umask(old)
        subprocess.run(["chmod", "-R", "go+rX", str(cache)], check=True)
        records = sorted((Layer(cache).root / "index").rglob("*.json"))
        assert records
        results = [as_user(other_user, ATTACK, str(p), str(marker)) for p in records]
        assert all(r.stdout.startswith("refused") for r in results), [(r.stdout, r.stderr[-300:]) for r in results]
        _op()  # the victim's next run (fresh kernel memo): its own kernel, nothing of the other user's
        assert not marker.exists()
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _cpu_job(block=None, n=64):
    from jitkern import plan
    from jitkern.library import rms_norm as rn

    b, single = rn.block_for(n)
    return plan.plan(rn.SPEC, rn.config("fp32", False, n % 16 == 0, block or b, single), CPU)


def test_an_index_record_cannot_supply_source_no_entry_was_built_from(cache_dir):
    """A plan-index record only had to agree with itself (key recomputed from its own source), so a
    rewritten record supplied any source, which the next build imported. Now a record's source is
    used only for a key that some layer holds an entry for; otherwise the job is rendered."""
    from jitkern import plan
    from jitkern.cache import write_private

    marker = cache_dir.parent / "pwned"
    job = _cpu_job()
    evil = f"open({str(marker)!r}, 'w').write('ran')\n" + job.source
    forged = plan.make_job(job.spec, job.config, CPU, source=evil)  # a record consistent with its own source
    layer = Layer(cache_dir)
    layer.writable()
    ih = plan.index_key(job.spec, job.config, CPU, job.parts[-1][1])
    write_private(plan._index_path(layer, ih), json.dumps({"key": forged.key, "source": evil}).encode())
    _op()
    assert not marker.exists(), "the record's source was built and imported"
    assert not layer.entry_dir(forged.key).exists() and layer.entry_dir(job.key).is_dir()


@pytest.fixture
def two_entries(cache_dir):
    """Real CPU entries of two rms_norm configs and one gemm config, in this test's cache."""
    from jitkern import build, plan
    from jitkern.library import gemm

    a, b = _cpu_job(), _cpu_job(block=512)
    g = plan.plan(gemm.SPEC, next(iter(gemm.configs(CPU))), CPU)
    for job in (a, b, g):
        build.get_entry(job)
    return a, b, g


@pytest.mark.parametrize("tamper", ["another config's source", "params rewritten", "kernel name rewritten",
                                    "a gemm entry rewritten as this one"])
def test_an_intact_entry_of_another_kernel_is_refused(two_entries, cache_dir, tamper):
    """The entry-versus-job check compared op, variant and arch only, so an entry with another
    kernel's files, its entry.json and manifest rewritten to match, was loaded. Now the kernel
    name, the parameters and the stored source (the key recomputed from it) must match the job."""
    from jitkern import build
    from jitkern.cache import ENTRY_META, Store

    from test_reliability import _rewrite_manifest

    a, b, g = two_entries
    layer = Layer(cache_dir)
    d = layer.entry_dir(a.key)
    meta = json.loads((d / ENTRY_META).read_text())
    if tamper == "another config's source":
        shutil.copy(layer.entry_dir(b.key) / "kernel.py", d / "kernel.py")
    elif tamper == "params rewritten":
        meta["params"]["block_n"] = 512
    elif tamper == "kernel name rewritten":
        meta["kernel"] = "gemm_kernel"
    else:
        shutil.rmtree(d)
        shutil.copytree(layer.entry_dir(g.key), d)
        gmeta = json.loads((d / ENTRY_META).read_text())
        meta = {**gmeta, **{k: meta[k] for k in ("op", "variant", "arch", "key")}}
        m = json.loads((d / MANIFEST).read_text())
        (d / MANIFEST).write_text(json.dumps({**m, "key": a.key}))
    (d / ENTRY_META).write_text(json.dumps(meta))
    _rewrite_manifest(d)
    layer.verify(a.key)  # the checksums accept it ...
    assert Store([cache_dir]).lookup(a.key, build.checker(a)) is None  # ... the job check does not
    assert not d.exists()
    entry, how = build.get_entry(a)  # rebuilt, right kernel
    assert how == "built" and entry.read_bytes("kernel.py") == a.source.encode()


def test_cpu_entries_load_from_verified_bytes_and_a_planted_pyc_never_runs(cache_dir, tmp_path):
    """CPU entries were imported by path: Python wrote __pycache__/kernel.*.pyc into the entry, and a
    planted .pyc (matching kernel.py's mtime and size) was executed while 'cache verify' said clean.
    Now the module is executed from the verified bytes: nothing is written and no .pyc is read (one
    is inert, as pip's byte-compiled copies in a cache installed as a wheel are). Any other file the
    manifest does not cover makes the entry damaged."""
    import importlib._bootstrap_external as bx

    _op()  # built here, then loaded from the cache by a process that writes bytecode caches
    out, _ = run(cache_dir)
    assert out["rms_norm_ok"] and out["stats"]["disk_hits"] >= 1, out
    (d,) = [p for p in Layer(cache_dir).root.glob("entries/*/*")]
    assert sorted(os.listdir(d)) == ["entry.json", "kernel.py", MANIFEST], os.listdir(d)  # no __pycache__
    marker = tmp_path / "pwned"
    st = os.stat(d / "kernel.py")
    code = compile(f"open({str(marker)!r}, 'w').write('ran')\n", str(d / "kernel.py"), "exec")
    (d / "__pycache__").mkdir(mode=0o700)
    (d / "__pycache__" / f"kernel.{sys.implementation.cache_tag}.pyc").write_bytes(
        bx._code_to_timestamp_pyc(code, int(st.st_mtime), st.st_size))
    os.chmod(d / "__pycache__" / f"kernel.{sys.implementation.cache_tag}.pyc", 0o600)
    _op()
    assert not marker.exists(), "the planted .pyc ran"
    (d / "stray.so").write_bytes(b"\x7fELF")
    r = subprocess.run([sys.executable, "-m", "jitkern", "cache", "verify", "--cache-dir", str(cache_dir)],
                       env=_env(cache_dir), capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "stray.so" in r.stdout, r.stdout + r.stderr
