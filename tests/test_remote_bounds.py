"""Issue 17 item 7: the remote cache is bounded in time, size and waiting.

Against a real redis-server on loopback (``test_remote``'s fixture) and a misbehaving fake server on
loopback that speaks just enough RESP to trickle its replies a byte at a time.
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import jitkern
from jitkern import build, remote

from test_remote import REDIS, _job, _warnings, rds, redis_server  # noqa: F401  (fixtures)

pytestmark = pytest.mark.skipif(not REDIS, reason="redis-server is not installed (CI installs it)")
REPO = Path(__file__).resolve().parents[1]


def _command(buf: bytes):
    """One complete RESP command from ``buf``: ``(args, rest)``, or None if it is not complete yet."""
    if not buf.startswith(b"*") or b"\r\n" not in buf:
        return None
    i = buf.index(b"\r\n")
    pos, args = i + 2, []
    for _ in range(int(buf[1:i])):
        j = buf.find(b"\r\n", pos)
        if j < 0:
            return None
        n = int(buf[pos + 1:j])
        if len(buf) < j + 2 + n + 2:
            return None
        args.append(buf[j + 2:j + 2 + n])
        pos = j + 2 + n + 2
    return args, buf[pos:]


class TricklingServer:
    """Answers the client's handshake, then every other command with a reply that never ends, one
    byte every ``every`` seconds: each read is quick, the reply never completes."""

    def __init__(self, every: float = 0.2):
        self.every, self.sock, self.stop = every, socket.socket(), threading.Event()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"redis://127.0.0.1:{self.sock.getsockname()[1]}/0"
        self.trickled = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stop.is_set():
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        buf = b""
        try:
            while not self.stop.is_set():
                got = _command(buf)
                if got is None:
                    data = c.recv(65536)
                    if not data:
                        return
                    buf += data
                    continue
                args, buf = got
                if args[0].upper() in (b"CLIENT", b"SELECT", b"PING"):
                    c.sendall(b"+OK\r\n")
                    continue
                c.sendall(b":")
                while not self.stop.is_set():  # an integer reply with no end
                    c.sendall(b"1")
                    self.trickled += 1
                    time.sleep(self.every)
        except OSError:
            pass
        finally:
            c.close()

    def close(self):
        self.stop.set()
        self.sock.close()


def test_a_trickling_server_is_cut_off_at_the_deadline(monkeypatch, caplog):
    """Before: JITKERN_REMOTE_TIMEOUT bounded each socket read, so a reply trickled a byte every
    0.2 s held the op for as long as the server liked. Now the command's deadline ends it: the op
    builds locally within the deadline, with one warning, and the remote is off for the process."""
    server = TricklingServer()
    monkeypatch.setenv("JITKERN_REMOTE_CACHE", server.url)
    monkeypatch.setenv("JITKERN_REMOTE_TIMEOUT", "1")
    monkeypatch.setenv("JITKERN_REMOTE_DEADLINE", "1.5")
    remote.reset()
    result, t0 = {}, time.monotonic()

    def go():
        result["how"] = build.get_entry(_job())[1]

    t = threading.Thread(target=go, daemon=True)
    with caplog.at_level(logging.WARNING, logger="jitkern"):
        t.start()
        t.join(15)
        took = time.monotonic() - t0
        server.close()
        t.join(5)
    remote.reset()
    assert result.get("how") == "built", f"the op was still blocked on the remote after {took:.1f} s"
    assert took < 6, took
    assert server.trickled >= 3  # the server really was trickling (each read well within the timeout)
    assert len(_warnings(caplog, "switching it off")) == 1


def test_a_value_over_the_maximum_is_never_downloaded(rds, redis_server, tmp_path):  # noqa: F811
    """Before: a 48 MiB value was read whole (RSS +100 MiB, seconds) before its checks failed. Now the
    entry is sized with STRLEN first and one over JITKERN_REMOTE_MAX_VALUE is skipped: no download."""
    key = _job().key
    rds.set(remote.PREFIX + f"entry:{key}", b"\0" * (48 << 20))
    code = textwrap.dedent(f"""
        import resource, time, json
        from jitkern import remote
        from jitkern.cache import Store
        r = remote.from_env()
        r.client.ping()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        got = r.fetch_into(Store(), {key!r})
        print(json.dumps({{"got": got is not None, "seconds": time.perf_counter() - t0, "enabled": r.enabled,
                          "rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before}}))
    """)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("JITKERN_")},
           "PYTHONPATH": str(REPO), "JITKERN_CACHE_DIR": str(tmp_path / "c"),
           "JITKERN_REMOTE_CACHE": redis_server, "JITKERN_REMOTE_MAX_VALUE": "4MiB"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["got"] is False and out["enabled"] is True  # skipped, the remote stays on
    assert out["rss_kib"] < 16 * 1024, out  # nothing of the 48 MiB came in
    assert "over JITKERN_REMOTE_MAX_VALUE" in r.stderr


def test_lease_wait_is_one_budget_per_process(rds, monkeypatch, caplog):  # noqa: F811
    """Three keys whose leases another node squats: before, the process waited the full lease wait for
    each (3 x 1.5 s); now one wait in all, then every build is local at once."""
    monkeypatch.setenv("JITKERN_REMOTE_LEASE_WAIT", "1.5")
    remote.reset()
    jobs = [_job(block_n=b) for b in (256, 512, 1024)]
    for job in jobs:
        rds.set(remote.PREFIX + f"lease:{job.key}", b"squatter:token", px=60_000)
    t0 = time.monotonic()
    with caplog.at_level(logging.INFO, logger="jitkern"):
        hows = [build.get_entry(job)[1] for job in jobs]
    took = time.monotonic() - t0
    assert hows == ["built"] * 3
    assert 1.5 <= took < 2.8, took
    assert len(_warnings(caplog, "waited 1.5 s in all for other nodes")) == 1
    assert jitkern.stats()["remote_waits"] == 1
