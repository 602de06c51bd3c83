"""Issue 17 items 5 and 8: bad arguments are one line and exit 2 (never a traceback, never the
default cache), verify reports what it cannot check, the no-writable-layer warning fires.

Every case runs the real CLI in a fresh process (``python -m jitkern``).
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from jitkern.cache import Layer

from test_cache import N_KEYS, run_worker, worker_env
from test_remote import redis_server  # noqa: F401  (fixture)
from test_reliability import _make_read_only, _make_writable, drop_root_write_override, obeys_file_modes

REPO = Path(__file__).resolve().parents[1]


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JITKERN_")}
    env.update(PYTHONPATH=str(REPO), HOME=str(tmp_path / "home"), XDG_CACHE_HOME=str(tmp_path / "home" / ".cache"))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def cli(tmp_path, *args, **extra):
    return subprocess.run([sys.executable, "-m", "jitkern", *args], env=_env(tmp_path, **extra),
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)


def _archive(path: Path, meta: bytes) -> Path:
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("jitkern-export.json")
        info.size = len(meta)
        tar.addfile(info, io.BytesIO(meta))
    return path


CASES = {
    "stats --cache-dir FILE": (["cache", "stats", "--cache-dir", "{file}"], "is not a directory"),
    "verify --cache-dir FILE": (["cache", "verify", "--cache-dir", "{file}"], "is not a directory"),
    "prebuild --cache-dir FILE": (["prebuild", "--arch", "cpu", "--op", "rms_norm", "--cache-dir", "{file}"],
                                  "is not a directory"),
    "export to a directory": (["cache", "export", "{dir}", "--cache-dir", "{cache}"], "is a directory"),
    "export under a file": (["cache", "export", "{file}/x.tar", "--cache-dir", "{cache}"], "cannot be written"),
    "export to an unwritable place": (["cache", "export", "/proc/x.tar", "--cache-dir", "{cache}"],
                                      "cannot be written"),
    "import: export record not an object": (["cache", "import", "{list_archive}", "--cache-dir", "{cache}"],
                                            "malformed jitkern-export.json"),
    "import: export record not JSON": (["cache", "import", "{junk_archive}", "--cache-dir", "{cache}"],
                                       "malformed jitkern-export.json"),
    "push --remote 'redis://[::1'": (["cache", "push", "--remote", "redis://[::1", "--cache-dir", "{cache}"],
                                     "malformed"),
    "pull --remote http://": (["cache", "pull", "--remote", "http://example", "--cache-dir", "{cache}"],
                              "not a Redis URL"),
    "prebuild --report DIR": (["prebuild", "--arch", "cpu", "--op", "rms_norm", "--limit", "1", "--cache-dir",
                               "{cache}", "--report", "{dir}"], "is a directory"),
    "prebuild --report under a file": (["prebuild", "--arch", "cpu", "--op", "rms_norm", "--limit", "1",
                                        "--cache-dir", "{cache}", "--report", "{file}/r.json"], "cannot be written"),
    "clear --cache-dir ''": (["cache", "clear", "--cache-dir", ""], "empty"),
    "prebuild --cache-dir ''": (["prebuild", "--arch", "cpu", "--op", "rms_norm", "--cache-dir", ""], "empty"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_arguments_are_one_line_exit_2_and_touch_nothing(case, tmp_path):
    """Each of these ended in a raw traceback (or, for an empty --cache-dir, acted on the user's
    default cache: 'cache clear --cache-dir "$UNSET"' removed it). Now: one line, exit 2, before any
    work: the default cache and the named cache are untouched and nothing was built."""
    args, says = CASES[case]
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("not a cache\n")
    names = {"file": tmp_path / "file", "dir": tmp_path / "dir", "cache": tmp_path / "cache",
             "list_archive": _archive(tmp_path / "list.tar", b"[1, 2]"),
             "junk_archive": _archive(tmp_path / "junk.tar", b"{not json")}
    # a default cache with an entry in it, where platformdirs puts it for this HOME
    default = tmp_path / "home" / ".cache" / "jitkern"
    r = cli(tmp_path, "prebuild", "--arch", "cpu", "--op", "rms_norm", "--limit", "1", "--progress", "none",
            JITKERN_CACHE_DIR=default) if "''" in case else None
    assert r is None or r.returncode == 0, r.stderr
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    r = cli(tmp_path, *[a.format(**names) for a in args])
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr and (len(lines) == 1 or lines[0].startswith("usage: ")), r.stderr
    assert "error:" in lines[-1] and says in lines[-1] and all("error" not in ln for ln in lines[:-1]), r.stderr
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    if "import" in case:  # the layer to import into is created (empty) before the archive is read
        after = [p for p in after if p.parts[0] != "cache"]
    assert after == before  # nothing else created, built or removed (the default cache least of all)


def test_empty_remote_key_never_means_unsigned(tmp_path, redis_server):  # noqa: F811
    """JITKERN_REMOTE_CACHE_KEY="" (an unset shell variable) published unsigned entries; now an op
    does not use the remote at all (one warning), and 'cache push' is one line, exit 2."""
    import redis

    client = redis.Redis.from_url(redis_server)
    client.flushdb()
    code = ("import torch, jitkern; x = torch.randn(4, 64); w = torch.ones(64); "
            "jitkern.ops.rms_norm(x, w, 1e-6); print('ok')")
    env = _env(tmp_path, JITKERN_CACHE_DIR=tmp_path / "c", JITKERN_REMOTE_CACHE=redis_server,
               JITKERN_REMOTE_CACHE_KEY="", TRITON_INTERPRET=1)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]
    assert "JITKERN_REMOTE_CACHE_KEY" in r.stderr and "empty" in r.stderr
    assert client.dbsize() == 0  # nothing went out unsigned
    r = cli(tmp_path, "cache", "push", "--remote", redis_server, "--cache-dir", str(tmp_path / "c"),
            JITKERN_REMOTE_CACHE_KEY="")
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert client.dbsize() == 0


def test_verify_reports_a_symlinked_entry(tmp_path):
    """An entry that is a symbolic link (to a sound entry elsewhere) was skipped: '0 entries checked',
    exit 0. Now it is checked and reported damaged, exit 1."""
    a, b = tmp_path / "a", tmp_path / "b"
    r = cli(tmp_path, "prebuild", "--arch", "cpu", "--op", "rms_norm", "--limit", "1", "--progress", "none",
            "--cache-dir", str(a))
    assert r.returncode == 0, r.stderr
    (src,) = (Layer(a).root / "entries").glob("*/*")
    link = Layer(b).root / "entries" / src.parent.name / src.name
    link.parent.mkdir(parents=True, mode=0o700)
    for d in (b, Layer(b).root, Layer(b).root / "entries"):
        d.chmod(0o700)
    link.symlink_to(src)
    r = cli(tmp_path, "cache", "verify", "--cache-dir", str(b))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "1 entries checked, 1 damaged" in r.stdout and "symbolic link" in r.stdout, r.stdout


@obeys_file_modes
def test_no_writable_layer_warning_fires_when_the_first_kernel_is_in_a_read_only_layer(tmp_path):
    """Only a read-only layer, every kernel in it: the lookup found the first kernel there and the
    warning that new kernels cannot be saved never fired. Now it fires, once."""
    ro = tmp_path / "ro"
    first, _ = run_worker(["run"], worker_env(ro))
    assert first["stats"]["compiles"] == N_KEYS
    _make_read_only(ro)
    try:
        out, err = run_worker(["run"], worker_env(ro), preexec_fn=drop_root_write_override)
        assert out["ok"] and out["stats"]["disk_hits"] == N_KEYS, out
        assert sum("no writable jitkern cache layer" in ln for ln in err.splitlines()) == 1, err[-2000:]
    finally:
        _make_writable(ro)


@pytest.mark.parametrize("action", [["clear"], ["prune", "--max-size", "1"]])
def test_clear_and_prune_leave_no_index_locks_or_empty_shards(tmp_path, action):
    """After a real run (entries, plan-index records, build lock files), 'cache clear' and a prune to
    nothing left index/, locks/ and the empty entries/<xx>/ shard directories behind."""
    cache = tmp_path / "c"
    first, _ = run_worker(["run"], worker_env(cache))
    root = Layer(cache).root
    assert first["stats"]["compiles"] == N_KEYS and list(root.glob("index/*/*.json")) and list(root.glob("locks/*"))
    r = cli(tmp_path, "cache", *action, "--cache-dir", str(cache))
    assert r.returncode == 0, r.stdout + r.stderr
    left = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    assert not [p for p in left if p.startswith(("index/", "locks/", "entries/"))], left
