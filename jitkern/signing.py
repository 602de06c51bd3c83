"""Ed25519 signatures (the ``cryptography`` package) for what jitkern trusts from elsewhere.

A shared cache is a code-execution channel: whoever can write it runs code on its readers. Builders
sign with a private key; readers verify with the public key only, so no reader can forge an entry
(unlike the HMAC of ``JITKERN_REMOTE_CACHE_KEY``, where every reader holds the forging secret).

=============================  ===========================================================================
``JITKERN_CACHE_SIGN_KEY``     private key (made by ``jitkern cache keygen PATH``): entries this process
                               publishes, locally and to the remote cache, are signed with it
``JITKERN_CACHE_VERIFY_KEY``   public key(s) (``PATH.pub``; several separated by ``:`` while rotating):
                               read-only layers (baked, installed as wheels) load only entries signed
                               by one of them, and remote entries must carry such a signature
=============================  ===========================================================================

What is signed, each under its own domain string (a signature for one purpose never verifies for
another):

- **an entry**: ``signature.json`` beside its ``manifest.json``, over the cache key and the manifest's
  exact bytes (the manifest names every file's size and SHA-256, so the signature covers them all);
- **a remote entry**: the wire blob's payload and its cache key (``jitkern.remote``);
- **a bundle** (``jitkern cache export --sign-key``): ``jitkern-export.sig`` over the bundle's
  ``jitkern-export.json``, which lists every member with its SHA-256.

A signature file records the signer's key id (SHA-256 of the raw public key, 16 hex digits) so that
a refusal can say which key signed what; trust comes only from the verification.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Iterable, Sequence

from . import settings
from .errors import ConfigError, SignatureError

ENTRY_SIGNATURE = "signature.json"
BUNDLE_SIGNATURE = "jitkern-export.sig"
DOMAIN_ENTRY = b"jitkern-entry-v1\0"
DOMAIN_REMOTE = b"jitkern-remote-v1\0"
DOMAIN_BUNDLE = b"jitkern-bundle-v1\0"
SIGNATURE_BYTES = 64


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise ConfigError("signing needs the 'cryptography' package: pip install 'jitkern[sign]'") from None
    return serialization, ed25519


# ---- keys --------------------------------------------------------------------------------------
def keygen(path: str | os.PathLike) -> tuple[Path, Path]:
    """Write a new Ed25519 private key to ``path`` (PEM, mode 0600) and its public key to ``path.pub``.
    Refuses to overwrite either."""
    serialization, ed25519 = _crypto()
    priv_path = Path(path)
    pub_path = Path(f"{priv_path}.pub")
    for p in (priv_path, pub_path):
        if os.path.lexists(p):
            raise ConfigError(f"{p} exists; jitkern cache keygen never overwrites a key (remove it, or choose "
                              "another path)")
    key = ed25519.Ed25519PrivateKey.generate()
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with open(fd, "wb") as f:
        f.write(priv)
    os.chmod(priv_path, 0o600)  # whatever the umask
    fd = os.open(pub_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with open(fd, "wb") as f:
        f.write(pub)
    return priv_path, pub_path


def _read_key_file(path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read the {what} {path}: {e.strerror or e}; make one with "
                          "'jitkern cache keygen PATH' (PATH is the private key, PATH.pub the public one)") from None


def load_private(path) -> "object":
    """The Ed25519 private key in a PEM file written by ``keygen``. Refuses a file others can read."""
    serialization, ed25519 = _crypto()
    data = _read_key_file(path, "private signing key")
    st = os.stat(path)
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise ConfigError(f"private signing key {path} can be read by other users (mode "
                          f"{stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path} is not an unencrypted PEM private key ({e}); make one with "
                          "'jitkern cache keygen PATH'") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{path} holds a {type(key).__name__}, not an Ed25519 key; make one with "
                          "'jitkern cache keygen PATH'")
    return key


def load_public(path) -> "object":
    """The Ed25519 public key in a PEM file (``PATH.pub`` from ``keygen``)."""
    serialization, ed25519 = _crypto()
    data = _read_key_file(path, "public verify key")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as e:
        hint = " (that looks like a private key: pass PATH.pub)" if b"PRIVATE KEY" in data else ""
        raise ConfigError(f"{path} is not a PEM public key{hint}: {e}") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ConfigError(f"{path} holds a {type(key).__name__}, not an Ed25519 public key")
    return key


def key_id(public_key) -> str:
    """A short, stable name for a public key: SHA-256 of its 32 raw bytes, 16 hex digits."""
    serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


# ---- settings ----------------------------------------------------------------------------------
_loaded: dict = {}


def _memo(kind: str, path: str, loader):
    """Keys are read once per process and file version (path, size, mtime)."""
    try:
        st = os.stat(path)
        stamp = (st.st_size, st.st_mtime_ns)
    except OSError:
        stamp = None
    k = (kind, path, stamp)
    if k not in _loaded:
        _loaded[k] = loader(path)
    return _loaded[k]


def sign_key():
    """The private key of ``JITKERN_CACHE_SIGN_KEY``, or None."""
    path = settings.get("cache_sign_key")
    return _memo("private", path, load_private) if path else None


def verify_keys() -> tuple | None:
    """The public keys of ``JITKERN_CACHE_VERIFY_KEY``, or None (no signatures required)."""
    paths = settings.get("cache_verify_key")
    return tuple(_memo("public", p, load_public) for p in paths) if paths else None


def public_keys(paths: Iterable[str | os.PathLike]) -> tuple:
    return tuple(load_public(os.fspath(p)) for p in paths)


# ---- sign / verify -----------------------------------------------------------------------------
def sign(private_key, domain: bytes, message: bytes) -> bytes:
    return private_key.sign(domain + message)


def check(public_keys: Sequence, domain: bytes, message: bytes, signature: bytes, what: str) -> str:
    """The key id of the trusted key that made ``signature``; raises ``SignatureError`` if none did."""
    from cryptography.exceptions import InvalidSignature

    if not isinstance(signature, (bytes, bytearray)) or len(signature) != SIGNATURE_BYTES:
        raise SignatureError(f"{what} has a malformed signature")
    for pub in public_keys:
        try:
            pub.verify(bytes(signature), domain + message)
            return key_id(pub)
        except InvalidSignature:
            continue
    trusted = ", ".join(key_id(k) for k in public_keys)
    raise SignatureError(f"{what} is not signed by a trusted key (trusted: {trusted}): signed with another key, "
                         "or changed after signing")


def signature_record(private_key, domain: bytes, message: bytes) -> bytes:
    """A signature file's content: ``{"alg": "ed25519", "key_id": ..., "signature": hex}``."""
    return json.dumps({"alg": "ed25519", "key_id": key_id(private_key.public_key()),
                       "signature": sign(private_key, domain, message).hex()}, sort_keys=True).encode()


def check_record(public_keys: Sequence, domain: bytes, message: bytes, record: bytes | None, what: str) -> str:
    """Verify a signature file's content (``signature_record``); raises ``SignatureError``."""
    if record is None:
        raise SignatureError(f"{what} is not signed")
    try:
        rec = json.loads(record)
        if rec.get("alg") != "ed25519":
            raise ValueError(f"algorithm {rec.get('alg')!r}")
        sig = bytes.fromhex(rec["signature"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise SignatureError(f"{what} has an unreadable signature ({e})") from None
    try:
        return check(public_keys, domain, message, sig, what)
    except SignatureError:
        raise SignatureError(f"{what} is signed by key {rec.get('key_id')!r}, which is not trusted here "
                             f"(trusted: {', '.join(key_id(k) for k in public_keys)}), or was changed after "
                             "signing") from None


# ---- entries -----------------------------------------------------------------------------------
def entry_message(key: str, manifest: bytes) -> bytes:
    return key.encode() + b"\0" + manifest


def sign_entry(private_key, key: str, manifest: bytes) -> bytes:
    """The content of an entry's ``signature.json``."""
    return signature_record(private_key, DOMAIN_ENTRY, entry_message(key, manifest))


def check_entry(public_keys: Sequence, key: str, manifest: bytes, record: bytes | None, where: str) -> str:
    return check_record(public_keys, DOMAIN_ENTRY, entry_message(key, manifest), record, f"cache entry {where}")


__all__ = ["keygen", "load_private", "load_public", "key_id", "sign_key", "verify_keys", "sign", "check",
           "signature_record", "check_record", "sign_entry", "check_entry"]
