"""The remote shared cache (jitkern.remote) against a real redis-server on loopback.

A session fixture starts ``redis-server`` on a free port (skipped only where the binary is absent;
CI installs the Debian package). Fleet behaviour runs in real processes, each with its own local
cache; fail-open behaviour runs against a closed port, a socket that never answers, a socket that
answers garbage, a full server and garbage values.
"""
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import jitkern.dispatch
from jitkern import arch, counters, doctor, registry, remote
from jitkern.build import get_entry
from jitkern.plan import plan
from jitkern.errors import UntrustedEntryError

REDIS = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(REDIS is None, reason="redis-server is not installed (apt-get install redis-server)")
if REDIS:
    import redis  # the client comes with jitkern[test] (and jitkern[redis])
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server on a free loopback port, no persistence; stopped at the end of the session."""
    d = tmp_path_factory.mktemp("redis")
    port = _free_port()
    proc = subprocess.Popen([REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(d)], stdout=open(d / "redis.log", "wb"), stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"redis-server did not start: {(d / 'redis.log').read_text()}")
            time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def rds(redis_server, monkeypatch):
    """An empty database, JITKERN_REMOTE_CACHE pointing at it, a fresh process-wide remote."""
    client = redis.Redis.from_url(redis_server)
    client.flushdb()
    monkeypatch.setenv(remote.ENV_URL, redis_server)
    for name in (remote.ENV_SECRET, remote.ENV_TIMEOUT, remote.ENV_LEASE_TTL, remote.ENV_LEASE_WAIT):
        monkeypatch.delenv(name, raising=False)
    remote.reset()
    yield client
    remote.reset()


def _job(arch_name="cpu", block_n=256):
    from jitkern.library import rms_norm

    return plan(registry.get("rms_norm"), rms_norm.config("fp32", False, True, block_n, True), arch.get(arch_name))


def _use_cache(monkeypatch, path):
    monkeypatch.setenv("JITKERN_CACHE_DIR", str(path))
    jitkern.dispatch.clear_memory()


def _delta(before):
    now = counters.snapshot()
    return {k: now[k] - before.get(k, 0) for k in now if now[k] != before.get(k, 0)}


def _warnings(caplog, text):
    return [r for r in caplog.records if r.name == "jitkern" and r.levelno == logging.WARNING and text in r.getMessage()]


# ---- wire format -------------------------------------------------------------------------------
def test_encode_decode_roundtrip_and_every_tampering_is_caught():
    key = "ab" * 32
    files = {"entry.json": b'{"op": "x"}', "kernel.py": b"print(1)\n", "kernel.cubin": bytes(range(256))}
    assert remote.decode(key, remote.encode(key, files)) == files
    signed = remote.encode(key, files, secret=b"s3cret")
    assert remote.decode(key, signed, secret=b"s3cret") == files
    assert remote.decode(key, signed) == files  # without a secret: checksums only
    for blob, secret in ((remote.encode(key, files), None), (signed, b"s3cret")):
        for bad in (blob[:-1], blob + b"x", blob[:3]):  # truncated, trailing bytes, no frame
            with pytest.raises(UntrustedEntryError):
                remote.decode(key, bad, secret)
        for i in range(len(blob)):  # every single-bit change anywhere (frame, header, names, data)
            with pytest.raises(UntrustedEntryError):
                remote.decode(key, blob[:i] + bytes([blob[i] ^ 0x04]) + blob[i + 1:], secret)
    with pytest.raises(UntrustedEntryError, match="checksum"):
        remote.decode("cd" * 32, remote.encode(key, files))             # replayed under another key
    with pytest.raises(UntrustedEntryError, match="no signature"):
        remote.decode(key, remote.encode(key, files), secret=b"s3cret")
    with pytest.raises(UntrustedEntryError, match="wrong signature"):
        remote.decode(key, signed, secret=b"other")
    # a frame that is sound around an inconsistent header is still caught by the per-file checks
    blob = remote.encode(key, files)
    payload = blob[5 + 32:]
    with pytest.raises(UntrustedEntryError, match="kernel.py does not match its checksum"):
        remote.decode(key, remote.seal(key, payload.replace(b"print(1)", b"print(2)")))
    with pytest.raises(UntrustedEntryError, match="beyond its files"):
        remote.decode(key, remote.seal(key, payload + b"x"))
    with pytest.raises(UntrustedEntryError, match="unsafe"):
        remote.decode(key, remote.encode(key, {**files, "../x": b""}))


# ---- fetch instead of compile ------------------------------------------------------------------
def test_second_node_fetches_instead_of_compiling_and_the_op_runs(rds, monkeypatch, tmp_path):
    import torch

    import jitkern

    x = torch.randn(3, 256)
    w = torch.randn(256)
    ref = registry.get("rms_norm").reference(x, w)
    before = counters.snapshot()
    torch.testing.assert_close(jitkern.ops.rms_norm(x, w), ref)
    d = _delta(before)
    assert d.get("compiles") == 1 and d.get("remote_puts") == 1 and d.get("remote_misses") == 1, d
    assert len(rds.keys(remote.PREFIX + "entry:*")) == 1

    _use_cache(monkeypatch, tmp_path / "node2")  # a second node: empty local cache, same remote
    before = counters.snapshot()
    torch.testing.assert_close(jitkern.ops.rms_norm(x, w), ref)
    d = _delta(before)
    assert d.get("remote_hits") == 1 and "compiles" not in d and "remote_puts" not in d, d
    assert not rds.keys(remote.PREFIX + "lease:*")

    job = _job()
    entry, how = get_entry(job)  # now a local hit
    assert how == "cached"
    assert entry.path.is_relative_to(tmp_path / "node2")


def test_checksum_mismatch_from_remote_is_rejected_rebuilt_and_replaced(rds, monkeypatch, tmp_path, caplog):
    job = _job()
    assert get_entry(job)[1] == "built"
    name = remote.PREFIX + "entry:" + job.key
    blob = rds.get(name)
    rds.set(name, blob[:-1] + bytes([blob[-1] ^ 0x20]))  # damage one byte of the last file

    _use_cache(monkeypatch, tmp_path / "node2")
    before = counters.snapshot()
    entry, how = get_entry(job)
    d = _delta(before)
    assert how == "built" and d.get("remote_rejected") == 1 and d.get("compiles") == 1, d
    assert len(_warnings(caplog, "does not match its checksum")) == 1
    assert remote.decode(job.key, rds.get(name))  # the rebuilt, sound entry replaced the damaged one

    _use_cache(monkeypatch, tmp_path / "node3")
    assert get_entry(job)[1] == "fetched"


def test_garbage_value_is_rejected_and_the_op_still_works(rds, monkeypatch, caplog):
    import torch

    import jitkern

    job = _job()
    rds.set(remote.PREFIX + "entry:" + job.key, b"\x00garbage\xff" * 10)
    x, w = torch.randn(2, 256), torch.randn(256)
    torch.testing.assert_close(jitkern.ops.rms_norm(x, w), registry.get("rms_norm").reference(x, w))
    assert len(_warnings(caplog, "not a jitkern entry")) == 1
    assert counters.snapshot()["remote_rejected"] >= 1


# ---- signing -----------------------------------------------------------------------------------
def test_signed_entries_missing_or_wrong_signature_rejected(rds, monkeypatch, tmp_path, caplog):
    job = _job()
    name = remote.PREFIX + "entry:" + job.key
    monkeypatch.setenv(remote.ENV_SECRET, "fleet-secret")
    assert get_entry(job)[1] == "built"
    good = rds.get(name)
    assert good[4:5] == b"\x01"  # published signed
    files = remote.decode(job.key, good, b"fleet-secret")

    # a node with the right secret fetches it
    _use_cache(monkeypatch, tmp_path / "b")
    assert get_entry(job)[1] == "fetched"

    # poisoning: someone with write access stores an unsigned entry with sound checksums but other code
    poisoned = dict(files, **{"kernel.py": files["kernel.py"] + b"\nimport os  # injected\n"})
    rds.set(name, remote.encode(job.key, poisoned))
    _use_cache(monkeypatch, tmp_path / "c")
    before = counters.snapshot()
    entry, how = get_entry(job)
    assert how == "built" and _delta(before).get("remote_rejected") == 1
    assert b"injected" not in entry.file("kernel.py").read_bytes()
    assert len(_warnings(caplog, "carries no signature")) == 1

    # a node with a wrong secret rejects the (now re-signed, sound) entry
    monkeypatch.setenv(remote.ENV_SECRET, "another-secret")
    _use_cache(monkeypatch, tmp_path / "d")
    before = counters.snapshot()
    assert get_entry(job)[1] == "built" and _delta(before).get("remote_rejected") == 1
    assert len(_warnings(caplog, "wrong signature")) == 1

    # without a secret the checksums pass it, but the stored source is not what the job renders (the
    # entry-versus-job check compares it): refused too. A poisoned binary would pass: why to sign
    monkeypatch.delenv(remote.ENV_SECRET)
    rds.set(name, remote.encode(job.key, poisoned))
    _use_cache(monkeypatch, tmp_path / "e")
    entry, how = get_entry(job)
    assert how == "built" and b"injected" not in entry.file("kernel.py").read_bytes()


# ---- cross-node build lease --------------------------------------------------------------------
CHILD = textwrap.dedent("""
    import json, os, sys, time
    import jitkern.build as b
    import jitkern.plan as jitkern_plan
    from jitkern import arch, counters, registry
    from jitkern.library import rms_norm
    arch_name, slow = sys.argv[1], float(sys.argv[2])
    real = b._build_files
    def slow_build(job, *rest):
        print("building", flush=True)
        time.sleep(slow)
        return real(job, *rest)
    b._build_files = slow_build
    job = jitkern_plan.plan(registry.get("rms_norm"), rms_norm.config("fp32", False, True, 256, True), arch.get(arch_name))
    print("ready", flush=True)
    sys.stdin.readline()  # the test's "go": every node starts at once
    t0 = time.time()
    entry, how = b.get_entry(job)
    binary = [f for f in os.listdir(entry.path) if f.startswith("kernel.") and f != "kernel.py"]
    print(json.dumps({"how": how, "stats": counters.snapshot(), "seconds": time.time() - t0,
                      "binary": (entry.path / binary[0]).read_bytes().hex() if binary else None}), flush=True)
""")


def _child_env(tmp_path, name, url, **extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real cross-compiles
    env.update(JITKERN_CACHE_DIR=str(tmp_path / name), TRITON_CACHE_DIR=str(tmp_path / name / "triton"),
               JITKERN_REMOTE_CACHE=url, PYTHONPATH=str(ROOT), **extra)
    env.pop(remote.ENV_SECRET, None)
    return env


def test_lease_three_nodes_one_compile_real_sm90(rds, redis_server, tmp_path):
    """Three processes with their own empty caches start the same sm_90 build at once: one compiles
    (slowly, so the others must wait on its lease), the others fetch the identical binary."""
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, "sm_90", "1.5"],
                              env=_child_env(tmp_path, f"node{i}", redis_server), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(3)]
    for p in procs:  # all imported and planned
        assert p.stdout.readline().strip() == "ready"
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(r["how"] for r in results) == ["built", "fetched", "fetched"]
    assert sum(r["stats"]["compiles"] for r in results) == 1
    waiters = [r for r in results if r["how"] == "fetched"]
    assert all(r["stats"]["remote_hits"] == 1 for r in waiters), results
    # they started together while the build took > 1.5 s: they found the lease taken and waited
    # (>= 1 rather than == 2 so that a node descheduled for seconds on a loaded box cannot fail this)
    assert sum(r["stats"]["remote_waits"] for r in waiters) >= 1, results
    assert len({r["binary"] for r in results}) == 1 and results[0]["binary"]
    assert not rds.keys(remote.PREFIX + "lease:*")  # released after publishing


def test_dead_holders_lease_expires_and_another_node_takes_over(rds, redis_server, tmp_path, monkeypatch):
    job = _job()
    lease = remote.PREFIX + "lease:" + job.key
    ttl = 1.0
    holder = subprocess.Popen([sys.executable, "-c", CHILD, "cpu", "3600"],
                              env=_child_env(tmp_path, "holder", redis_server, JITKERN_REMOTE_LEASE_TTL=str(ttl)),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready", holder.stderr.read()
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "building", holder.stderr.read()
        time.sleep(2.5 * ttl)  # well past the TTL: the holder's thread keeps renewing its lease
        assert rds.pttl(lease) > 0
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        killed = time.monotonic()
    finally:
        holder.kill()
        for f in (holder.stdin, holder.stdout, holder.stderr):
            f.close()
    assert rds.pttl(lease) > 0  # the dead holder's lease is still there...
    before = counters.snapshot()
    entry, how = get_entry(job)  # ...until it expires; this node waits for that, then builds
    waited = time.monotonic() - killed
    d = _delta(before)
    assert how == "built" and d.get("compiles") == 1 and d.get("remote_waits") == 1, d
    assert waited < ttl + 2.0
    assert rds.exists(remote.PREFIX + "entry:" + job.key) and not rds.exists(lease)


def test_a_live_holder_is_waited_for_at_most_lease_wait(rds, monkeypatch, caplog):
    job = _job()
    rds.set(remote.PREFIX + "lease:" + job.key, "otherhost pid 1:abc", px=60_000)  # a live, slow builder
    monkeypatch.setenv(remote.ENV_LEASE_WAIT, "0.6")
    remote.reset()
    t0 = time.monotonic()
    assert get_entry(job)[1] == "built"
    assert 0.6 <= time.monotonic() - t0 < 5
    assert len(_warnings(caplog, "waited 0.6 s in all for other nodes")) == 1
    assert rds.get(remote.PREFIX + "lease:" + job.key) == b"otherhost pid 1:abc"  # not ours to release


# ---- the remote failing never breaks an op -----------------------------------------------------
class _Server:
    """A loopback TCP server that accepts and then either never answers or answers garbage."""

    def __init__(self, reply: bytes | None):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"redis://127.0.0.1:{self.sock.getsockname()[1]}/0"
        self.reply, self.conns = reply, []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            if self.reply is not None:
                try:
                    c.recv(65536)
                    c.sendall(self.reply)
                except OSError:
                    pass

    def close(self):
        for c in self.conns:
            c.close()
        self.sock.close()


@pytest.mark.parametrize("kind", ["down", "slow", "garbage", "bad-url"])
def test_unreachable_slow_or_garbage_remote_one_warning_op_works(kind, monkeypatch, caplog):
    import torch

    import jitkern

    server = None
    if kind == "down":
        url = f"redis://127.0.0.1:{_free_port()}/0"
    elif kind == "bad-url":
        url = "http://cache-host:6379/0"
    else:
        server = _Server(None if kind == "slow" else b"HTTP/1.1 400 Bad Request\r\n\r\n<html>")
        url = server.url
    monkeypatch.setenv(remote.ENV_URL, url)
    monkeypatch.setenv(remote.ENV_TIMEOUT, "0.3")
    remote.reset()
    try:
        before = counters.snapshot()
        t0 = time.monotonic()
        for n in (256, 512):  # two kernels: the remote is asked once, then it is off
            x, w = torch.randn(2, n), torch.randn(n)
            torch.testing.assert_close(jitkern.ops.rms_norm(x, w), registry.get("rms_norm").reference(x, w))
        elapsed = time.monotonic() - t0
        d = _delta(before)
        assert d.get("remote_errors") == 1 and d.get("compiles") == 2, d
        assert len(_warnings(caplog, "switching it off")) == 1
        if kind == "bad-url":
            assert len(_warnings(caplog, "is not a Redis URL")) == 1
        assert remote.active() is None
        assert elapsed < 10, elapsed  # bounded by the socket timeout, not hanging
    finally:
        if server:
            server.close()
        remote.reset()


def test_full_server_stops_publishing_keeps_fetching(rds, monkeypatch, tmp_path, caplog):
    job_a, job_b = _job(block_n=256), _job(block_n=512)
    assert get_entry(job_a)[1] == "built"  # published while there is room
    rds.config_set("maxmemory", "1")
    rds.config_set("maxmemory-policy", "noeviction")
    try:
        _use_cache(monkeypatch, tmp_path / "node2")
        remote.reset()
        before = counters.snapshot()
        assert get_entry(job_b)[1] == "built"    # lease refused (OOM): built here, unleased
        assert get_entry(job_a)[1] == "fetched"  # reads still work
        d = _delta(before)
        assert d.get("remote_errors") == 1 and d.get("remote_hits") == 1 and d.get("compiles") == 1, d
        assert len(_warnings(caplog, "refuses writes")) == 1
        assert not rds.exists(remote.PREFIX + "entry:" + job_b.key)
    finally:
        rds.config_set("maxmemory", "0")


# ---- jitkern cache push / pull -----------------------------------------------------------------
def test_cli_push_then_pull_mirrors_a_local_cache(redis_server, monkeypatch, tmp_path, capsys):
    from jitkern import cli

    client = redis.Redis.from_url(redis_server)
    client.flushdb()
    monkeypatch.delenv(remote.ENV_URL, raising=False)
    monkeypatch.delenv(remote.ENV_SECRET, raising=False)
    remote.reset()
    jobs = [_job(block_n=b) for b in (256, 512)]
    for job in jobs:  # a local cache built with no remote configured (like a prebuild)
        assert get_entry(job)[1] == "built"
    src = os.environ["JITKERN_CACHE_DIR"]
    assert cli.main(["cache", "push", "--remote", redis_server, "--cache-dir", src]) == 0
    assert "2 pushed" in capsys.readouterr().out
    assert cli.main(["cache", "push", "--remote", redis_server, "--cache-dir", src]) == 0
    assert "0 pushed, 2 present" in capsys.readouterr().out

    dst = tmp_path / "fresh"
    monkeypatch.setenv(remote.ENV_URL, redis_server)  # pull reads the URL from the environment too
    assert cli.main(["cache", "pull", "--cache-dir", str(dst)]) == 0
    assert "2 pulled" in capsys.readouterr().out
    _use_cache(monkeypatch, dst)
    monkeypatch.delenv(remote.ENV_URL)
    for job in jobs:
        entry, how = get_entry(job)
        assert how == "cached" and entry.path.is_relative_to(dst)

    monkeypatch.setenv(remote.ENV_URL, redis_server)
    rows = {r["key"]: r for r in doctor._doctor_remote()["rows"]}  # the `jitkern doctor` section
    assert "answers in" in rows["server"]["text"] and "2 jitkern entries" in rows["server"]["text"]
    assert rows["server"]["value"]["reachable"] is True and rows["server"]["value"]["entries"] == 2
    monkeypatch.delenv(remote.ENV_URL)

    assert cli.main(["cache", "pull", "--remote", f"redis://127.0.0.1:{_free_port()}/0", "--cache-dir",
                     str(dst)]) == 1  # an unreachable remote is an error for the CLI
    assert "SCAN failed" in capsys.readouterr().err


# ---- Ed25519 signatures (jitkern.signing) -------------------------------------------------------
@pytest.fixture
def ed_keys(tmp_path):
    from jitkern import signing

    d = tmp_path / "keys"
    d.mkdir()
    return signing.keygen(d / "fleet"), signing.keygen(d / "other")


def test_ed25519_frames_verify_with_the_public_key_only(ed_keys):
    from jitkern import signing

    (priv, pub), (_, other) = ed_keys
    key = "ab" * 32
    files = {"entry.json": b'{"op": "x"}', "kernel.py": b"print(1)\n", "kernel.cubin": bytes(range(256))}
    blob = remote.encode(key, files, sign_key=signing.load_private(priv))
    trusted = signing.public_keys([pub])
    assert blob[4:5] == b"\x02" and remote.decode(key, blob, verify_keys=trusted) == files
    with pytest.raises(UntrustedEntryError, match="not signed by a trusted key"):
        remote.decode(key, blob, verify_keys=signing.public_keys([other]))
    for unsigned in (remote.encode(key, files), remote.encode(key, files, secret=b"s3cret")):
        with pytest.raises(UntrustedEntryError, match="no Ed25519 signature"):
            remote.decode(key, unsigned, verify_keys=trusted)
    for i in range(len(blob)):  # every single-bit change anywhere, signature included
        with pytest.raises(UntrustedEntryError):
            remote.decode(key, blob[:i] + bytes([blob[i] ^ 0x10]) + blob[i + 1:], verify_keys=trusted)
    with pytest.raises(UntrustedEntryError):
        remote.decode("cd" * 32, blob, verify_keys=trusted)  # replayed under another key


READER = textwrap.dedent("""
    import json, os, sys
    import jitkern.build as b
    import jitkern.plan as jitkern_plan
    from jitkern import arch, counters, registry, remote, signing
    from jitkern.library import rms_norm
    job = jitkern_plan.plan(registry.get("rms_norm"), rms_norm.config("fp32", False, True, 256, True), arch.get("cpu"))
    for line in sys.stdin:                 # one node per line: its own empty cache and the key it trusts
        cache, verify_key = line.split()
        os.environ.update(JITKERN_CACHE_DIR=cache, JITKERN_CACHE_VERIFY_KEY=verify_key)
        remote.reset()
        counters.reset()
        entry, how = b.get_entry(job)
        print(json.dumps({"how": how, "stats": counters.snapshot(), "private": signing.sign_key() is not None}),
              flush=True)
""")


def test_builder_signs_with_the_private_key_readers_verify_with_the_public_key(rds, redis_server, ed_keys,
                                                                              monkeypatch, tmp_path):
    (priv, pub), (_, other) = ed_keys
    job = _job()
    name = remote.PREFIX + "entry:" + job.key
    monkeypatch.setenv("JITKERN_CACHE_SIGN_KEY", str(priv))  # the builder
    remote.reset()
    assert get_entry(job)[1] == "built"
    assert rds.get(name)[4:5] == b"\x02"
    # reader nodes, in a real process holding the public key only
    env = _child_env(tmp_path, "unused", redis_server)
    del env["JITKERN_CACHE_SIGN_KEY"]
    reader = subprocess.Popen([sys.executable, "-c", READER], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def node(name, key):
        reader.stdin.write(f"{tmp_path / name} {key}\n")
        reader.stdin.flush()
        line = reader.stdout.readline()
        assert line, reader.stderr.read()
        return json.loads(line)

    try:
        r = node("reader", pub)
        assert r["how"] == "fetched" and r["stats"]["compiles"] == 0 and r["stats"]["remote_hits"] == 1, r
        assert not r["private"]
        r = node("stranger", other)  # trusts another key: rejects, builds
        assert r["how"] == "built" and r["stats"]["remote_rejected"] == 1, r
        # someone with write access to the server (even one holding the fleet's HMAC secret) cannot forge one
        files = remote.decode(job.key, rds.get(name))
        poisoned = dict(files, **{"kernel.py": files["kernel.py"] + b"\nimport os  # injected\n"})
        rds.set(name, remote.encode(job.key, poisoned, secret=b"fleet-secret"))
        r = node("victim", pub)
        assert r["how"] == "built" and r["stats"]["remote_rejected"] == 1, r
    finally:
        reader.stdin.close()
        reader.wait(30)
