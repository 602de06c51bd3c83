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
    env = {k: v for k, v in os.environ.items() if not k.startswith("JITKERN_")}
    env.update(PYTHONPATH=str(REPO), JITKERN_CACHE_DIR=str(cache), TRITON_INTERPRET="1")
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

    jitkern.runtime.clear_memory()
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
