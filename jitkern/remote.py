"""The remote shared cache on Redis: one compile per key across a fleet.

Set ``JITKERN_REMOTE_CACHE=redis://host:port/db`` (needs ``pip install jitkern[redis]``). On a local
miss, ``build.get_entry`` asks the remote before compiling, and publishes what it compiled. Settings:

==============================  ==========================================================================
``JITKERN_REMOTE_CACHE``        ``redis://[user:password@]host:port/db`` (``rediss://`` for TLS)
``JITKERN_REMOTE_CACHE_KEY``    shared secret: entries are published with an HMAC-SHA256 and an entry
                                with a missing or wrong signature is rejected, with a warning
``JITKERN_REMOTE_TIMEOUT``      seconds to connect and to wait for each read (default 2)
``JITKERN_REMOTE_DEADLINE``     seconds one command may take in all, send to last byte (default 10)
``JITKERN_REMOTE_MAX_VALUE``    largest entry fetched or published (default 64MiB); sized first (STRLEN)
``JITKERN_REMOTE_LEASE_TTL``    seconds a build lease lives unless renewed (default 30; renewed every third)
``JITKERN_REMOTE_LEASE_WAIT``   longest this process waits, in all, for other nodes' builds (default 900);
                                once spent, builds are local without waiting
==============================  ==========================================================================

**Integrity.** An entry travels as one Redis string: a SHA-256 of the whole (and of the cache key),
a signature when signing (Ed25519 or HMAC), a header naming every file with its size and SHA-256,
then the files.
Everything fetched is checked against these before it is stored in the local cache (which checks it
again before each load); a failing entry is rejected, never stored.
Checksums catch damage, not malice: anyone who can write to the Redis server can run code on its
readers, so fleets that share a server they do not fully control should sign: with Ed25519
(``jitkern.signing``: builders set ``JITKERN_CACHE_SIGN_KEY`` to the private key, readers
``JITKERN_CACHE_VERIFY_KEY`` to the public one, so no reader can forge an entry), or, for small setups
where every node may build, with the HMAC secret ``JITKERN_REMOTE_CACHE_KEY``. With a verify key set,
anything but a valid Ed25519 signature by a trusted key is rejected. Either signature covers the
cache key too, so an entry cannot be replayed under another key. A node that rejected an entry and
then built the key overwrites the bad entry.

**Cross-node builds.** A node that misses both caches takes the key's build lease (``SET NX PX``
through redis-py's ``Lock``), renews it from a thread while it compiles, publishes, then releases it.
Other nodes wait, polling for the entry, and fetch it. If the holder dies its lease expires within
``JITKERN_REMOTE_LEASE_TTL`` seconds and a waiting node takes over; if the holder's build fails, it
releases the lease and the next node tries.

**Bounded.** Every command has an overall deadline (``JITKERN_REMOTE_DEADLINE``), enforced on the
socket: a server that trickles its reply a byte at a time (each read well within
``JITKERN_REMOTE_TIMEOUT``) is cut off at the deadline. An entry is sized (``STRLEN``) before it is
read, and one over ``JITKERN_REMOTE_MAX_VALUE`` is skipped, never downloaded. Waiting for other
nodes' builds draws on one budget per process (``JITKERN_REMOTE_LEASE_WAIT``), not one per key.

**Failure never breaks an op.** Unreachable, slow (bounded by the deadline, no retries),
answering garbage: one warning, the remote switches itself off for the process, and kernels are built
and cached locally as without it. A full server (writes refused): one warning, publishing stops,
fetching goes on. Counters: ``remote_hits``, ``remote_misses``, ``remote_puts``, ``remote_errors``,
``remote_rejected``, ``remote_waits`` (``jitkern.stats()``).

The server is a cache: give it a ``maxmemory`` and an eviction policy (``allkeys-lru``) and it stays
bounded; jitkern sets no expiry on entries.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import struct
import threading
import time
import uuid
from typing import Iterator, Mapping
from urllib.parse import urlsplit, urlunsplit

from . import counters, settings, signing
from .cache import ENTRY_META, MANIFEST, Entry, Store, default_store
from .errors import ConfigError, CorruptEntryError, RemoteCacheError, SignatureError, UntrustedEntryError
from .errors import RemoteValueTooLarge as ValueTooLarge
from .key import FORMAT_VERSION
from .logs import log, warn_once

ENV_URL = "JITKERN_REMOTE_CACHE"
ENV_SECRET = "JITKERN_REMOTE_CACHE_KEY"
ENV_TIMEOUT = "JITKERN_REMOTE_TIMEOUT"
ENV_LEASE_TTL = "JITKERN_REMOTE_LEASE_TTL"
ENV_LEASE_WAIT = "JITKERN_REMOTE_LEASE_WAIT"
ENV_DEADLINE = "JITKERN_REMOTE_DEADLINE"
ENV_MAX_VALUE = "JITKERN_REMOTE_MAX_VALUE"

#: Redis key prefix; the format version is part of it, so incompatible layouts never meet.
PREFIX = f"jitkern:v{FORMAT_VERSION}:"
MAGIC = b"JKR1"
_UNSIGNED, _SIGNED, _ED25519 = b"\x00", b"\x01", b"\x02"
_SIG_BYTES = 32
#: Bytes between the frame's checksum and its payload, per flag: none, an HMAC, an Ed25519 signature.
_SIG_LEN = {_UNSIGNED: 0, _SIGNED: _SIG_BYTES, _ED25519: signing.SIGNATURE_BYTES}
_HEADER_LEN = struct.Struct(">I")
_POLL_MIN, _POLL_MAX = 0.05, 0.5
_SAY_WAITING = 10.0  # seconds of waiting on another node's build before saying so at WARNING


# ---- the wire format -----------------------------------------------------------------------------
def _digest(key: str, payload: bytes) -> bytes:
    return hashlib.sha256(MAGIC + key.encode() + b"\0" + payload).digest()


def _signature(secret: bytes, key: str, payload: bytes) -> bytes:
    return hmac.new(secret, MAGIC + key.encode() + b"\0" + payload, hashlib.sha256).digest()


def seal(key: str, payload: bytes, secret: bytes | None = None, sign_key=None) -> bytes:
    """Frame a payload: magic, flag, SHA-256 of key + payload, then an Ed25519 signature of key + payload
    (``sign_key``, a private key: ``jitkern.signing``) or an HMAC-SHA256 (``secret``) or nothing, then
    the payload."""
    if sign_key is not None:
        sig = signing.sign(sign_key, signing.DOMAIN_REMOTE, key.encode() + b"\0" + payload)
        return MAGIC + _ED25519 + _digest(key, payload) + sig + payload
    if secret:
        return MAGIC + _SIGNED + _digest(key, payload) + _signature(secret, key, payload) + payload
    return MAGIC + _UNSIGNED + _digest(key, payload) + payload


def encode(key: str, files: Mapping[str, bytes], secret: bytes | None = None, sign_key=None) -> bytes:
    """One entry's files as a single blob: a frame (``seal``) around a header naming every file with its
    size and SHA-256, then the files."""
    names = sorted(files)
    header = {"key": key, "format": FORMAT_VERSION,
              "files": [[n, len(files[n]), hashlib.sha256(files[n]).hexdigest()] for n in names]}
    head = json.dumps(header, separators=(",", ":")).encode()
    return seal(key, _HEADER_LEN.pack(len(head)) + head + b"".join(files[n] for n in names), secret, sign_key)


def decode(key: str, blob: bytes, secret: bytes | None = None, verify_keys=None) -> dict[str, bytes]:
    """The files of a blob made by ``encode``, after checking its signature (an Ed25519 one by one of
    ``verify_keys`` if given, else an HMAC if ``secret``), the whole blob's checksum and each file's.
    Raises ``UntrustedEntryError`` saying what failed."""
    if not isinstance(blob, (bytes, bytearray)) or blob[:4] != MAGIC or len(blob) < 5 + _SIG_BYTES:
        raise UntrustedEntryError(f"remote entry {key[:16]} is not a jitkern entry (bad magic)")
    flag = bytes(blob[4:5])
    if flag not in _SIG_LEN:
        raise UntrustedEntryError(f"remote entry {key[:16]} is not a jitkern entry (unknown flag {flag!r})")
    start = 5 + _SIG_BYTES + _SIG_LEN[flag]
    payload = bytes(blob[start:])
    if verify_keys:
        if flag != _ED25519:
            raise UntrustedEntryError(f"remote entry {key[:16]} carries no Ed25519 signature but "
                                      "JITKERN_CACHE_VERIFY_KEY is set")
        try:
            signing.check(verify_keys, signing.DOMAIN_REMOTE, key.encode() + b"\0" + payload,
                          bytes(blob[5 + _SIG_BYTES:start]), f"remote entry {key[:16]}")
        except SignatureError as e:
            raise UntrustedEntryError(str(e)) from None
    elif secret:
        if flag != _SIGNED:
            raise UntrustedEntryError(f"remote entry {key[:16]} carries no signature but {ENV_SECRET} is set")
        if not hmac.compare_digest(blob[5 + _SIG_BYTES:start], _signature(secret, key, payload)):
            raise UntrustedEntryError(f"remote entry {key[:16]} has a wrong signature (another secret, or tampered)")
    if not hmac.compare_digest(blob[5:5 + _SIG_BYTES], _digest(key, payload)):
        raise UntrustedEntryError(f"remote entry {key[:16]} does not match its checksum (damaged, or stored "
                                  "under another key)")
    try:
        (n,) = _HEADER_LEN.unpack_from(payload)
        header = json.loads(bytes(payload[4:4 + n]))
        entries = [(str(name), int(size), str(digest)) for name, size, digest in header["files"]]
        if header["key"] != key or header["format"] != FORMAT_VERSION:
            raise UntrustedEntryError(f"remote entry {key[:16]} is for key {str(header['key'])[:16]}, "
                                      f"format {header['format']}")
    except (struct.error, ValueError, KeyError, TypeError) as e:
        raise UntrustedEntryError(f"remote entry {key[:16]} has an unreadable header: {e}") from None
    files: dict[str, bytes] = {}
    pos = 4 + n
    for name, size, digest in entries:
        if not name or "/" in name or "\\" in name or name.startswith(".") or name == MANIFEST or name in files:
            raise UntrustedEntryError(f"remote entry {key[:16]} names an unsafe file {name!r}")
        data = bytes(payload[pos:pos + size])
        pos += size
        if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
            raise UntrustedEntryError(f"remote entry {key[:16]}: {name} does not match its checksum")
        files[name] = data
    if pos != len(payload):
        raise UntrustedEntryError(f"remote entry {key[:16]} has {len(payload) - pos} bytes beyond its files")
    if ENTRY_META not in files:
        raise UntrustedEntryError(f"remote entry {key[:16]} has no {ENTRY_META}")
    return files


def entry_files(entry: Entry) -> dict[str, bytes]:
    """The files of a local entry as its manifest lists them (the manifest itself is rebuilt on store)."""
    manifest = json.loads((entry.path / MANIFEST).read_text())
    return {name: (entry.path / name).read_bytes() for name in manifest["files"]}


def store_files(store: Store, key: str, files: Mapping[str, bytes]) -> Entry:
    """Publish decoded remote files into the local store (which writes and verifies a fresh manifest)."""
    try:
        meta = json.loads(files[ENTRY_META])
        if not isinstance(meta, dict) or meta.get("key", key) != key:
            raise ValueError("metadata names another key")
    except ValueError as e:
        raise UntrustedEntryError(f"remote entry {key[:16]} has unreadable metadata: {e}") from None
    rest = {n: d for n, d in files.items() if n != ENTRY_META}
    return store.publish(key, rest, meta)


def redact(url: str) -> str:
    """The URL without its password (for log lines; never raises, even for a malformed URL)."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url.rsplit("@", 1)[-1] if "@" in url else url
    if password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + netloc))


# ---- the remote ----------------------------------------------------------------------------------
class RedisRemote:
    """A Redis server holding jitkern entries and build leases.

    The fail-open methods (``fetch_into``, ``publish``, ``acquire``) never raise: on a failure they
    warn once, count ``remote_errors`` and switch the remote off for the process. ``client``,
    ``get_blob`` and ``put_strict`` raise ``RemoteCacheError`` (for ``jitkern cache push/pull``).
    """

    def __init__(self, url: str, secret: str | None = None, timeout: float = 2.0, lease_ttl: float = 30.0,
                 lease_wait: float = 900.0, deadline: float = 10.0, max_value: int = 64 << 20,
                 sign_key=None, verify_keys=None):
        self.url = url
        self.secret = secret.encode() if secret else None
        #: Ed25519 (``jitkern.signing``): builders sign with the private key; readers verify with public keys.
        self.sign_key = sign_key
        self.verify_keys = tuple(verify_keys) if verify_keys else None
        self.timeout = timeout
        self.lease_ttl = lease_ttl
        self.lease_wait = lease_wait
        self.wait_left = lease_wait  # one budget per process for waiting on other nodes' builds
        self.deadline = deadline
        self.max_value = max_value
        self.enabled = True
        self.can_put = True
        self._client = None
        self._rejected: dict[str, str] = {}  # key -> SHA-256 of the remote blob that failed its checks
        self._lock = threading.Lock()

    def __repr__(self):
        mode = "ed25519" if self.sign_key is not None or self.verify_keys else "hmac" if self.secret else "none"
        return f"RedisRemote({redact(self.url)!r}, signing={mode})"

    # -- connection --
    @property
    def client(self):
        """The redis-py client (created on first use; raises ``RemoteCacheError``)."""
        with self._lock:
            if self._client is None:
                try:
                    import redis
                    from redis.backoff import NoBackoff
                    from redis.retry import Retry
                except ImportError:
                    raise RemoteCacheError(f"{ENV_URL} is set but the redis client is not installed; "
                                           "run: pip install 'jitkern[redis]'") from None
                try:
                    self._client = redis.Redis.from_url(
                        self.url, socket_timeout=self.timeout, socket_connect_timeout=self.timeout,
                        retry=Retry(NoBackoff(), 0), retry_on_error=[], health_check_interval=0,
                        connection_class=_deadline_connection(self.url, self.deadline))
                except ValueError as e:
                    raise RemoteCacheError(f"{ENV_URL}={redact(self.url)!r} is not a Redis URL ({e}); "
                                           "expected redis://host:port/db") from None
            return self._client

    def entry_name(self, key: str) -> str:
        return f"{PREFIX}entry:{key}"

    def lease_name(self, key: str) -> str:
        return f"{PREFIX}lease:{key}"

    def _fail(self, doing: str, exc: BaseException) -> None:
        counters.bump("remote_errors")
        self.enabled = False
        warn_once(("remote-off", self.url),
                  "jitkern: remote cache %s failed while %s (%s: %s); switching it off for this process. "
                  "Kernels are still built and cached locally. Check the server, %s and %s",
                  redact(self.url), doing, type(exc).__name__, exc, ENV_URL, ENV_TIMEOUT)

    def _refuse_writes(self, exc: BaseException) -> None:
        counters.bump("remote_errors")
        self.can_put = False
        warn_once(("remote-no-put", self.url),
                  "jitkern: remote cache %s refuses writes (%s); this process stops publishing to it and taking "
                  "build leases (fetching goes on). Give the server more memory or an eviction policy",
                  redact(self.url), exc)

    def _reject(self, key: str, blob: bytes, exc: UntrustedEntryError) -> None:
        counters.bump("remote_rejected")
        self._rejected[key] = digest = hashlib.sha256(blob).hexdigest()
        warn_once(("remote-rejected", self.url, key, digest),
                  "jitkern: rejected an entry from the remote cache: %s. It is not stored or loaded; the kernel "
                  "is built here and the remote entry replaced. If this repeats, check that every node uses the "
                  "same %s and who can write to %s", exc,
                  "JITKERN_CACHE_VERIFY_KEY / JITKERN_CACHE_SIGN_KEY key pair" if self.verify_keys else ENV_SECRET,
                  redact(self.url))

    # -- fetch --
    def get_blob(self, key: str) -> bytes | None:
        """The raw blob for ``key`` or None (raises ``RemoteCacheError``; ``ValueTooLarge`` for an entry
        over ``max_value``, which is sized with STRLEN first and never downloaded)."""
        name = self.entry_name(key)
        try:
            size = int(self.client.strlen(name))
            if size == 0:
                return None
            if size > self.max_value:
                raise ValueTooLarge(f"remote entry {key[:16]} is {size} bytes, over {ENV_MAX_VALUE}="
                                    f"{self.max_value}; not downloaded")
            return self.client.get(name)
        except RemoteCacheError:
            raise
        except Exception as e:
            raise RemoteCacheError(f"remote cache {redact(self.url)}: GET failed: {type(e).__name__}: {e}") from e

    def fetch_into(self, store: Store, key: str, count_miss: bool = True) -> Entry | None:
        """Fetch ``key`` into the local store, verified; None if absent, rejected or the remote failed."""
        if not self.enabled:
            return None
        try:
            blob = self.get_blob(key)
        except ValueTooLarge as e:  # the server works; this entry is not worth the memory and the wait
            counters.bump("remote_rejected")
            warn_once(("remote-too-large", self.url, key), "jitkern: %s; building it here", e)
            return None
        except RemoteCacheError as e:
            self._fail("fetching an entry", e.__cause__ or e)
            return None
        if blob is None:
            if count_miss:
                counters.bump("remote_misses")
            return None
        if key in self._rejected and self._rejected[key] == hashlib.sha256(blob).hexdigest():
            return None  # the same bad entry again (polling during a lease wait): rejected already
        try:
            files = decode(key, blob, self.secret, self.verify_keys)
            entry = store_files(store, key, files)
        except UntrustedEntryError as e:
            self._reject(key, blob, e)
            return None
        except CorruptEntryError as e:  # the local re-verification disagreed: treat like a bad remote entry
            self._reject(key, blob, UntrustedEntryError(str(e)))
            return None
        except OSError as e:  # the local cache cannot take it: build as if it were absent
            log.warning("jitkern: could not store remote entry %s locally: %s", key[:16], e)
            return None
        counters.bump("remote_hits")
        log.info("jitkern: fetched %s from the remote cache (%d bytes)", key[:16], len(blob))
        return entry

    # -- publish --
    def put_strict(self, entry: Entry, overwrite: bool = False) -> bool:
        """Upload a local entry; False if the remote already had it (raises ``RemoteCacheError``)."""
        blob = encode(entry.key, entry_files(entry), self.secret, self.sign_key)
        if len(blob) > self.max_value:
            raise ValueTooLarge(f"entry {entry.key[:16]} is {len(blob)} bytes, over {ENV_MAX_VALUE}={self.max_value}; "
                                "not published")
        try:
            done = self.client.set(self.entry_name(entry.key), blob, nx=not overwrite)
        except RemoteCacheError:
            raise
        except Exception as e:
            raise RemoteCacheError(f"remote cache {redact(self.url)}: SET failed: {type(e).__name__}: {e}") from e
        return bool(done)

    def publish(self, entry: Entry) -> bool:
        """Upload an entry just built here (fail-open). Replaces a remote entry that was rejected."""
        if not (self.enabled and self.can_put):
            return False
        try:
            done = self.put_strict(entry, overwrite=entry.key in self._rejected)
        except ValueTooLarge as e:
            log.info("jitkern: %s", e)
            return False
        except RemoteCacheError as e:
            cause = e.__cause__ or e
            if _is_refused_write(cause):  # full (maxmemory) or read-only replica: keep fetching
                self._refuse_writes(cause)
            else:
                self._fail("publishing an entry", cause)
            return False
        except (OSError, ValueError) as e:  # the local entry could not be read
            log.warning("jitkern: could not publish %s to the remote cache: %s", entry.key[:16], e)
            return False
        if done:
            counters.bump("remote_puts")
            self._rejected.pop(entry.key, None)
        return done

    # -- build lease --
    def _new_lease(self, key: str):
        return self.client.lock(self.lease_name(key), timeout=self.lease_ttl, blocking=False, thread_local=False)

    def _holder(self, key: str) -> str:
        try:
            raw = self.client.get(self.lease_name(key))
        except Exception:
            return "another node"
        return raw.decode(errors="replace").rsplit(":", 1)[0] if raw else "another node"

    def acquire(self, store: Store, key: str):
        """``(entry, lease)``: a fetched entry (lease None), or a held lease to build under (entry None),
        or ``(None, None)`` when the remote failed or the wait ran out (build locally, unleased).

        Waiting for another node's build draws on ``wait_left``, one budget per process: once it is
        spent, a key another node is building is built here at once (3 squatted keys cost one
        ``lease_wait``, not three)."""
        entry = self.fetch_into(store, key)
        if entry is not None or not (self.enabled and self.can_put):
            return entry, None
        token = f"{socket.gethostname()} pid {os.getpid()}:{uuid.uuid4().hex}"
        began = time.monotonic()
        poll, waited = _POLL_MIN, False
        try:
            while True:
                try:
                    lease = self._new_lease(key)
                    if lease.acquire(blocking=False, token=token):
                        break
                except Exception as e:
                    if _is_refused_write(e):
                        self._refuse_writes(e)
                    else:
                        self._fail("taking a build lease", e)
                    return None, None
                spent = time.monotonic() - began
                if spent >= self.wait_left:
                    warn_once(("remote-wait", self.url),
                              "jitkern: this process has waited %g s in all for other nodes' builds (now %s, "
                              "held by %s); building it and every further kernel here without waiting (raise %s)",
                              self.lease_wait, key[:16], self._holder(key), ENV_LEASE_WAIT)
                    return None, None
                if not waited:
                    waited = True
                    counters.bump("remote_waits")
                    log.info("jitkern: %s is being built by %s; waiting for the remote entry", key[:16],
                             self._holder(key))
                if spent > _SAY_WAITING:  # silence looks like a hang
                    warn_once(("remote-waiting", self.url, key),
                              "jitkern: still waiting for %s to build %s (%.0f s so far; %.0f s of %s=%.0f s left)",
                              self._holder(key), key[:16], _SAY_WAITING, self.wait_left - spent, ENV_LEASE_WAIT,
                              self.lease_wait)
                time.sleep(min(poll, self.wait_left - spent))
                poll = min(poll * 1.5, _POLL_MAX)
                entry = self.fetch_into(store, key, count_miss=False)
                if entry is not None or not self.enabled:
                    return entry, None
        finally:
            if waited:
                self.wait_left = max(0.0, self.wait_left - (time.monotonic() - began))
        # Taken. The previous holder may have published just before releasing: look once more.
        entry = self.fetch_into(store, key, count_miss=False)
        if entry is not None:
            _release(lease)
            return entry, None
        return None, _Renewal(self, key, lease)


class _DeadlineSocket:
    """A socket whose reads and writes for one command share one deadline: armed when a command is
    sent (the first send after a read), every later read or write gets only the time left. redis-py
    sets a timeout per read (``socket_timeout``), which a server trickling its reply never trips."""

    def __init__(self, sock, deadline: float):
        self._sock, self._deadline = sock, deadline
        self._timeout = sock.gettimeout()
        self._ends: float | None = None
        self._read_since_arm = True

    def _arm(self, sending: bool) -> None:
        now = time.monotonic()
        if sending and (self._ends is None or self._read_since_arm):
            self._ends, self._read_since_arm = now + self._deadline, False
        if not sending:
            self._read_since_arm = True
        left = (self._ends if self._ends is not None else now + self._deadline) - now
        if left <= 0:
            raise socket.timeout(f"remote command exceeded {ENV_DEADLINE}={self._deadline:g} s")
        self._sock.settimeout(left if self._timeout is None else min(left, self._timeout))

    def settimeout(self, value):  # redis-py's per-read timeout; _arm() applies the smaller of the two
        self._timeout = value
        self._sock.settimeout(value)

    def gettimeout(self):
        return self._timeout

    def recv(self, *args):
        self._arm(False)
        return self._sock.recv(*args)

    def recv_into(self, *args):
        self._arm(False)
        return self._sock.recv_into(*args)

    def sendall(self, *args):
        self._arm(True)
        return self._sock.sendall(*args)

    def send(self, *args):
        self._arm(True)
        return self._sock.send(*args)

    def __getattr__(self, name):
        return getattr(self._sock, name)


def _deadline_connection(url: str, deadline: float):
    """redis-py's connection class for ``url``'s scheme, with every command bounded by ``deadline``."""
    from redis.connection import Connection, SSLConnection, UnixDomainSocketConnection

    scheme = urlsplit(url).scheme
    base = SSLConnection if scheme == "rediss" else UnixDomainSocketConnection if scheme == "unix" else Connection

    class DeadlineConnection(base):
        def _connect(self):
            return _DeadlineSocket(super()._connect(), deadline)

    return DeadlineConnection


def _is_refused_write(exc: BaseException) -> bool:
    """A server that is full (``maxmemory`` with no eviction) or a read-only replica."""
    name, text = type(exc).__name__, str(exc)
    return name in ("OutOfMemoryError", "ReadOnlyError") or (
        name == "ResponseError" and (text.startswith(("OOM", "READONLY")) or "maxmemory" in text))


def _release(lease) -> None:
    try:
        lease.release()
    except Exception as e:  # expired already, or the server went away: the lease ends by itself
        log.debug("jitkern: build lease %s not released cleanly: %s", lease.name, e)


class _Renewal:
    """Keeps a held lease alive from a daemon thread (every third of its TTL) until ``stop()``."""

    def __init__(self, remote: RedisRemote, key: str, lease):
        self.remote, self.key, self.lease = remote, key, lease
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"jitkern-lease-{key[:8]}", daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(self.remote.lease_ttl / 3):
            try:
                self.lease.reacquire()
            except Exception as e:
                if type(e).__name__ == "LockNotOwnedError":
                    log.warning("jitkern: lost the build lease of %s (this process stalled longer than %s=%.0f s); "
                                "another node may build it too", self.key[:16], ENV_LEASE_TTL, self.remote.lease_ttl)
                else:
                    log.debug("jitkern: renewing the build lease of %s failed: %s", self.key[:16], e)
                return

    def stop(self):
        self._stop.set()
        self._thread.join()
        _release(self.lease)


# ---- process-wide remote -------------------------------------------------------------------------
_active: RedisRemote | None = None
_active_env: tuple | None = None
_active_lock = threading.Lock()


def _settings() -> tuple:
    """The remote's settings (to notice a change); a bad one shows as its error, raised by from_env."""
    try:
        rest = tuple(settings.get(n) for n in ("remote_cache_key", "remote_timeout", "remote_lease_ttl",
                                                "remote_lease_wait", "remote_deadline", "remote_max_value",
                                                "cache_sign_key", "cache_verify_key"))
    except ConfigError as e:
        rest = (str(e),)
    return (settings.get("remote_cache") or "", *rest)


def check_url(url: str) -> str:
    """``url`` if it reads as a Redis URL, else ``ConfigError`` saying what is wrong with it."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError for a bad port)
    except ValueError as e:
        raise ConfigError(f"remote cache URL {redact(url)!r} is malformed ({e}); "
                          "expected redis://host:port/db") from None
    if parts.scheme not in ("redis", "rediss", "unix") or not (parts.hostname or parts.path):
        raise ConfigError(f"remote cache URL {redact(url)!r} is not a Redis URL; expected redis://host:port/db "
                          "(rediss:// for TLS, unix:///path for a socket)")
    return url


def from_env(url: str | None = None) -> RedisRemote:
    """A new remote for ``url`` (default ``JITKERN_REMOTE_CACHE``) with the environment's settings."""
    url = url if url is not None else settings.get("remote_cache")
    if not url:
        raise ConfigError(f"no remote cache configured: set {ENV_URL}=redis://host:port/db or pass --remote")
    return RedisRemote(url, settings.get("remote_cache_key"), settings.get("remote_timeout"),
                       settings.get("remote_lease_ttl"), settings.get("remote_lease_wait"),
                       settings.get("remote_deadline"), settings.get("remote_max_value"),
                       signing.sign_key(), signing.verify_keys())


def active() -> RedisRemote | None:
    """The process-wide remote, or None if none is configured or it switched itself off."""
    global _active, _active_env
    env = _settings()
    if not env[0]:
        return None
    with _active_lock:
        if env != _active_env:
            _active_env = env
            try:
                _active = from_env(env[0])
            except ConfigError as e:  # fails open like an unreachable server: one warning, counted
                _active = None
                counters.bump("remote_errors")
                warn_once(("remote-config", env), "jitkern: remote cache not used, switching it off for this "
                          "process: %s", e)
    return _active if _active is not None and _active.enabled else None


class FleetBuild:
    """The remote's part in ``build.get_entry``, entered together with the key's local file lock::

        with lock, remote.FleetBuild(key, store) as fleet:
            ...local lookup...
            entry = fleet.fetch_or_lease()     # fetched from the remote, or None: build, holding the lease
            ...build...
            return fleet.publish(store.publish(...)), "built"

    With no remote configured (or after it switched itself off) each step costs nothing.
    """

    def __init__(self, key: str, store: Store):
        self.key, self.store = key, store
        self.remote: RedisRemote | None = None
        self._renewal: _Renewal | None = None

    def __enter__(self) -> "FleetBuild":
        return self

    def fetch_or_lease(self) -> Entry | None:
        self.remote = active()
        if self.remote is None:
            return None
        entry, self._renewal = self.remote.acquire(self.store, self.key)
        return entry

    def publish(self, entry: Entry) -> Entry:
        if self.remote is not None:
            self.remote.publish(entry)
        return entry

    def __exit__(self, *exc) -> None:
        if self._renewal is not None:
            self._renewal.stop()
            self._renewal = None


def reset() -> None:
    """Forget the process-wide remote (tests): the next use re-reads the environment."""
    global _active, _active_env
    with _active_lock:
        _active, _active_env = None, None


# ---- push / pull (``jitkern cache push|pull``) ---------------------------------------------------
def _local_keys(store: Store) -> Iterator[tuple[object, str]]:
    for layer in store.layers:
        entries = layer.root / "entries"
        if not entries.is_dir():
            continue
        for shard in sorted(entries.iterdir()):
            if shard.is_dir():
                for d in sorted(shard.iterdir()):
                    if d.is_dir() and len(d.name) == 64:
                        yield layer, d.name


def push(remote: RedisRemote, store: Store | None = None, overwrite: bool = False) -> dict[str, int]:
    """Upload every sound local entry (all layers) the remote lacks. Raises ``RemoteCacheError``."""
    store = store or default_store()
    counts = {"pushed": 0, "present": 0, "damaged": 0}
    seen: set[str] = set()
    for layer, key in _local_keys(store):
        if key in seen:
            continue
        seen.add(key)
        try:
            entry = layer.verify(key)
        except (CorruptEntryError, FileNotFoundError) as e:
            log.warning("jitkern: not pushing damaged entry %s: %s", key[:16], e)
            counts["damaged"] += 1
            continue
        if entry.meta.get("status") == "failed":  # a recorded build failure is local knowledge
            continue
        if remote.put_strict(entry, overwrite=overwrite):
            counts["pushed"] += 1
            counters.bump("remote_puts")
        else:
            counts["present"] += 1
    return counts


def remote_keys(remote: RedisRemote) -> Iterator[str]:
    """Cache keys of every entry on the remote (SCAN, so the server is never blocked)."""
    prefix = f"{PREFIX}entry:"
    try:
        for name in remote.client.scan_iter(match=prefix + "*", count=1000):
            key = name.decode(errors="replace")[len(prefix):]
            if len(key) == 64:
                yield key
    except RemoteCacheError:
        raise
    except Exception as e:
        raise RemoteCacheError(f"remote cache {redact(remote.url)}: SCAN failed: {type(e).__name__}: {e}") from e


def pull(remote: RedisRemote, store: Store | None = None) -> dict[str, int]:
    """Download every remote entry missing locally, verified (and signature-checked if a secret is set)
    before it is stored. Raises ``RemoteCacheError`` if the remote cannot be read."""
    store = store or default_store()
    if store.write_layer is None:
        raise RemoteCacheError(f"no writable cache layer in {store} to pull into")
    counts = {"pulled": 0, "present": 0, "rejected": 0}
    for key in list(remote_keys(remote)):
        if store.lookup(key) is not None:
            counts["present"] += 1
            continue
        blob = remote.get_blob(key)
        if blob is None:  # evicted meanwhile
            continue
        try:
            store_files(store, key, decode(key, blob, remote.secret, remote.verify_keys))
        except UntrustedEntryError as e:
            counters.bump("remote_rejected")
            log.warning("jitkern: rejected remote entry: %s", e)
            counts["rejected"] += 1
            continue
        counters.bump("remote_hits")
        counts["pulled"] += 1
    return counts


__all__ = ["RedisRemote", "FleetBuild", "active", "push", "pull", "encode", "decode", "seal", "reset",
           "from_env"]
