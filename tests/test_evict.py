"""The size cap (JITKERN_CACHE_MAX_SIZE, jitkern.evict): LRU eviction after publishes, amortised,
never removing an entry a process holds, correct with 8 real processes publishing and evicting."""
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from jitkern import cachectl, counters, evict
from jitkern.cache import Layer, Store
from jitkern.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _key(*parts) -> str:
    return hashlib.sha256("-".join(map(str, parts)).encode()).hexdigest()


def _tree(root: Path) -> dict:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("text,expected", [("20GB", 20 * 10 ** 9), ("20GiB", 20 * 2 ** 30), ("20 gb", 20 * 10 ** 9),
                                           ("512MiB", 512 * 2 ** 20), ("1.5MB", 1_500_000), ("4096", 4096)])
def test_max_size_parses_decimal_and_binary_units_exactly(monkeypatch, text, expected):
    monkeypatch.setenv(evict.ENV_MAX_SIZE, text)
    assert evict.max_size() == expected


@pytest.mark.parametrize("text", ["lots", "20XB", "-1GB", "0"])
def test_bad_max_size_is_a_config_error(monkeypatch, text):
    monkeypatch.setenv(evict.ENV_MAX_SIZE, text)
    with pytest.raises(ConfigError, match="JITKERN_CACHE_MAX_SIZE"):
        evict.max_size()


def test_publish_over_the_cap_evicts_least_recently_used_and_keeps_what_is_held(cache_dir, monkeypatch):
    cap, size, n = 100_000, 2500, 60
    monkeypatch.setenv(evict.ENV_MAX_SIZE, str(cap))
    store = Store([cache_dir])
    root = Layer(cache_dir).root
    keys = [_key("e", i) for i in range(n)]
    held = store.publish(keys[0], {"blob": os.urandom(size)}, {"op": "t"})  # kept: oldest, but held
    order = []
    for i, k in enumerate(keys[1:], 1):
        store.publish(k, {"blob": os.urandom(size)}, {"op": "t"})
        if i == 12:  # used again: keys[1] becomes more recent than keys[2..12]
            time.sleep(0.01)
            assert store.lookup(keys[1]) is not None
        on_disk = sum(cachectl.dir_size(p) for _, p in evict.iter_entries(root))
        assert on_disk <= cap + size + 1000  # at most one entry over the cap, right after a publish
        if i > 12 and not Layer(cache_dir).entry_dir(keys[2]).exists() and not order:
            order.append(Layer(cache_dir).entry_dir(keys[1]).exists())  # the reused one outlived keys[2]
    left = {k for k, _ in evict.iter_entries(root)}
    assert keys[0] in left and (held.path / "blob").exists()
    assert order == [True] and keys[2] not in left and keys[-1] in left
    u = evict.read_usage(root)
    assert u["evicted_entries"] == n - len(left) == counters.snapshot()["evictions"]
    assert u["walks"] <= n / 4  # amortised: a walk per ~tenth of the cap published, not one per publish
    assert u["bytes"] == sum(cachectl.dir_size(p) for _, p in evict.iter_entries(root))


WORKER = textwrap.dedent("""
    import hashlib, json, os, sys
    from jitkern import counters
    from jitkern.cache import Store

    wid, n, size = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    key = lambda *p: hashlib.sha256("-".join(map(str, p)).encode()).hexdigest()
    store = Store()
    layer = store.write_layer
    held, lost, errors = [], [], []
    for i in range(n):
        k = key("w", wid, i)
        idx = layer.root / "index" / k[:2]          # a plan-index record for the key, as jitkern plans it
        idx.mkdir(parents=True, exist_ok=True)
        (idx / (key("ih", wid, i) + ".json")).write_text(json.dumps({"key": k, "source": ""}))
        blob = os.urandom(size)
        try:
            with store.build_lock(k, "test"):
                entry = store.publish(k, {"blob": blob}, {"op": "t", "worker": wid})
        except Exception as e:
            errors.append(repr(e))
            continue
        held.append((entry, blob))
        if len(held) > 3:
            held.pop(0)                             # dropping the entry releases its hold
        store.lookup(key("w", (wid + 1) % 8, i // 2))  # read a neighbour's entry, if it is still there
        for e, b in held:                           # what this process holds is never evicted
            try:
                ok = (e.path / "blob").read_bytes() == b
            except OSError:
                ok = False
            if not ok:
                lost.append(e.key)
    print(json.dumps({"lost": lost, "errors": errors, "evictions": counters.snapshot()["evictions"]}))
""")


def test_eight_processes_publishing_and_evicting_under_a_cap(tmp_path):
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    for i in range(3):  # a read-only layer behind the writable one: never touched
        Layer(ro).publish(_key("ro", i), {"blob": os.urandom(4096)}, {"op": "t"})
    before_ro = _tree(ro)
    cap, size, n = 512 << 10, 8192, 25
    env = {**os.environ, "PYTHONPATH": str(REPO), "JITKERN_CACHE_DIR": f"{rw}{os.pathsep}{ro}",
           evict.ENV_MAX_SIZE: str(cap)}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(w), str(n), str(size)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in range(8)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert all(r["lost"] == [] and r["errors"] == [] for r in results), results
    evicted = sum(r["evictions"] for r in results)
    root = Layer(rw).root
    u = evict.read_usage(root)
    assert evicted > 8 * n // 2 and u["evicted_entries"] == evicted
    assert u["walks"] <= 8 * n / 5, u  # amortised
    present = {k for k, _ in evict.iter_entries(root)}
    on_disk = sum(cachectl.dir_size(Layer(rw).entry_dir(k)) for k in present)
    assert on_disk <= cap + 8 * 4 * (size + 1024)  # over the cap by at most what was held or mid-publish
    # evicted entries took their index records and build lock files with them
    records = {json.loads(p.read_text())["key"] for p in (root / "index").rglob("*.json")}
    assert records <= present and {p.stem for p in (root / "locks").glob("*.lock")} <= present
    assert list((root / "tmp").iterdir()) == []
    for k in present:
        Layer(rw).verify(k)
    assert _tree(ro) == before_ro
    # `cache prune` uses the same code: with nobody holding anything, it reaches the cap exactly
    r = cachectl.prune(Store([rw, ro]), cap // 2)
    assert r["fits"] and r["kept_in_use"] == 0
    assert evict.read_usage(root)["bytes"] == sum(cachectl.dir_size(p) for _, p in evict.iter_entries(root))
    assert _tree(ro) == before_ro
