"""Ed25519 signatures (jitkern.signing) with real keys: keygen, signed bundles (export --sign-key /
import --verify-key), and read-only layers that load only signed entries (JITKERN_CACHE_VERIFY_KEY)."""
import hashlib
import io
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest

from jitkern import arch, cachectl, counters, registry, signing
from jitkern.build import get_entry
from jitkern.plan import plan
from jitkern.cache import MANIFEST, Layer, Store
from jitkern.cli import main


@pytest.fixture
def keys(tmp_path):
    d = tmp_path / "keys"
    d.mkdir()
    assert main(["cache", "keygen", str(d / "fleet")]) == 0
    assert main(["cache", "keygen", str(d / "other")]) == 0
    return d


def fill(root: Path, n: int) -> list[str]:
    spec = registry.get("rms_norm")
    store = Store([root])
    cpu = arch.get("cpu")
    return [get_entry(plan(spec, cfg, cpu), store)[0].key for cfg in list(spec.configs(cpu))[:n]]


def present(root: Path) -> set[str]:
    return {p.name for p in (Layer(root).root / "entries").glob("*/*")}


def rewrite_tar(src: Path, dst: Path, change) -> None:
    """Copy an archive member by member; ``change(name, data)`` returns new bytes, or None to drop it."""
    with tarfile.open(src) as a, tarfile.open(dst, "w") as b:
        for m in a:
            data = change(m.name, a.extractfile(m).read())
            if data is None:
                continue
            m.size = len(data)
            b.addfile(m, io.BytesIO(data))


def test_keygen_writes_a_private_key_0600_and_a_public_key_and_never_overwrites(keys, capsys):
    priv, pub = keys / "fleet", keys / "fleet.pub"
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in priv.read_bytes() and b"PUBLIC KEY" in pub.read_bytes()
    key = signing.load_private(priv)
    assert signing.key_id(key.public_key()) == signing.key_id(signing.load_public(pub))
    capsys.readouterr()
    assert main(["cache", "keygen", str(priv)]) == 2
    assert "never overwrites" in capsys.readouterr().err
    os.chmod(priv, 0o644)
    with pytest.raises(Exception, match="chmod 600"):
        signing.load_private(priv)


def test_signed_bundle_imports_with_its_public_key_and_refuses_anything_else(cache_dir, keys, tmp_path, capsys):
    ks = fill(cache_dir, 3)
    signed, unsigned = tmp_path / "signed.tar", tmp_path / "unsigned.tar"
    assert main(["cache", "export", str(signed), "--sign-key", str(keys / "fleet")]) == 0
    assert main(["cache", "export", str(unsigned)]) == 0
    with tarfile.open(signed) as t:
        names = t.getnames()
    assert signing.BUNDLE_SIGNATURE in names and f"entries/{ks[0]}/{signing.ENTRY_SIGNATURE}" in names

    def refused(bundle, key="fleet.pub", says=""):
        dest = tmp_path / f"dest-{hashlib.sha256(str(bundle).encode()).hexdigest()[:8]}-{key}"
        capsys.readouterr()
        rc = main(["cache", "import", str(bundle), "--verify-key", str(keys / key), "--cache-dir", str(dest)])
        err = capsys.readouterr().err
        assert rc == 1 and says in err and "Traceback" not in err, err
        assert present(dest) == set()  # nothing installed

    refused(signed, "other.pub", "not trusted")
    refused(unsigned, says="not signed")
    # the strongest tamper: change a kernel and rewrite its entry manifest consistently (per-entry checks pass)
    def tamper(name, data):
        if name == f"entries/{ks[0]}/kernel.py":
            return data + b"\n# injected\n"
        if name == f"entries/{ks[0]}/{MANIFEST}":
            m = json.loads(data)
            src = tarfile.open(signed).extractfile(f"entries/{ks[0]}/kernel.py").read() + b"\n# injected\n"
            m["files"]["kernel.py"] = {"size": len(src), "sha256": hashlib.sha256(src).hexdigest()}
            return json.dumps(m).encode()
        return data
    for change, says in ((tamper, "changed after signing"),
                         (lambda n, d: None if n.endswith(f"{ks[1]}/kernel.py") else d, "missing"),
                         (lambda n, d: d.replace(b'"entries": 3', b'"entries": 4') if n == "jitkern-export.json" else d,
                          "not trusted")):
        bad = tmp_path / f"bad-{says.split()[0]}.tar"
        rewrite_tar(signed, bad, change)
        refused(bad, says=says)
    extra = tmp_path / "extra.tar"
    with tarfile.open(signed) as a, tarfile.open(extra, "w") as b:
        for m in a:
            b.addfile(m, a.extractfile(m))
        info = tarfile.TarInfo(f"entries/{'ab' * 32}/kernel.py")
        info.size = 3
        b.addfile(info, io.BytesIO(b"x=1"))
    refused(extra, says="added after signing")

    dest = tmp_path / "good"
    capsys.readouterr()
    assert main(["cache", "import", str(signed), "--verify-key", str(keys / "fleet.pub"), "--cache-dir", str(dest),
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["installed"] == 3 and r["signed_by"] == signing.key_id(signing.load_public(keys / "fleet.pub"))
    assert present(dest) == set(ks)


def _tamper_entry_consistently(root: Path, key: str) -> None:
    """Change an entry's kernel and rewrite its manifest to match: checksums pass, the signature cannot."""
    d = Layer(root).entry_dir(key)
    src = (d / "kernel.py").read_bytes() + b"\n# injected\n"
    (d / "kernel.py").write_bytes(src)
    m = json.loads((d / MANIFEST).read_bytes())
    m["files"]["kernel.py"] = {"size": len(src), "sha256": hashlib.sha256(src).hexdigest()}
    (d / MANIFEST).write_text(json.dumps(m))


def test_a_layer_that_requires_signatures_loads_only_entries_signed_by_a_trusted_key(tmp_path, keys, monkeypatch):
    ro, rw = tmp_path / "ro", tmp_path / "rw"
    monkeypatch.setenv("JITKERN_CACHE_SIGN_KEY", str(keys / "fleet"))   # a builder signs what it publishes
    signed = fill(ro, 3)
    monkeypatch.delenv("JITKERN_CACHE_SIGN_KEY")
    assert all((Layer(ro).entry_dir(k) / signing.ENTRY_SIGNATURE).exists() for k in signed)
    Layer(ro).discard(signed[2])
    unsigned = fill(ro, 3)[2]                                            # published without a key
    assert not (Layer(ro).entry_dir(unsigned) / signing.ENTRY_SIGNATURE).exists()
    _tamper_entry_consistently(ro, signed[1])
    Layer(ro).verify(signed[1])                                          # checksums alone cannot tell

    def loads(key, verify=None):
        if verify:
            monkeypatch.setenv("JITKERN_CACHE_VERIFY_KEY", str(keys / verify))
        else:
            monkeypatch.delenv("JITKERN_CACHE_VERIFY_KEY", raising=False)
        e = Store([rw, ro]).lookup(key)
        return e is not None and e.path.is_relative_to(ro)

    assert all(loads(k) for k in (signed[0], signed[1], unsigned))      # no key required: all load
    counters.reset()
    assert loads(signed[0], "fleet.pub")
    assert not loads(signed[1], "fleet.pub") and not loads(unsigned, "fleet.pub")
    assert counters.snapshot()["signature_refused"] == 2
    assert not loads(signed[0], "other.pub")                             # signed, but by an untrusted key
    monkeypatch.setenv("JITKERN_CACHE_VERIFY_KEY", f"{keys / 'other.pub'}{os.pathsep}{keys / 'fleet.pub'}")
    assert Store([rw, ro]).lookup(signed[0]) is not None                 # key rotation: either key
    fleet_id = signing.key_id(signing.load_public(keys / "fleet.pub"))
    assert any(fleet_id in r["text"] for r in cachectl.policy_rows())    # jitkern doctor says what is trusted
    # the process's own writable layer is not held to it: what it builds there loads
    assert get_entry(plan(registry.get("rms_norm"), list(registry.get("rms_norm").configs(arch.get("cpu")))[5],
                          arch.get("cpu")), Store([rw, ro]))[1] == "built"
