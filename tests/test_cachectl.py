"""`jitkern cache ...`: stats, verify, prune (LRU, in-use safe), clear, export/import, layered reads."""
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest

from jitkern import arch, cachectl, registry
from jitkern.build import get_entry
from jitkern.plan import plan
from jitkern.cache import Layer, Store
from jitkern.cli import main

REPO = Path(__file__).resolve().parents[1]


def fill(root: Path, n: int) -> list[str]:
    """Publish ``n`` real rms_norm entries (interpreter arch: rendered module, import-checked)."""
    spec = registry.get("rms_norm")
    store = Store([root])
    keys = []
    for cfg in list(spec.configs(arch.get("cpu")))[:n]:
        entry, _ = get_entry(plan(spec, cfg, arch.get("cpu")), store)
        keys.append(entry.key)
    return keys


def age(root: Path, keys: list[str]) -> None:
    """Give entries distinct last-use stamps, keys[0] the least recently used, all older than a minute."""
    now = time.time()
    for i, k in enumerate(keys):
        t = now - 3600 + i * 10
        os.utime(Layer(root).entry_dir(k), (t, t))


def present(root: Path) -> set[str]:
    return {k for k, _ in cachectl.iter_entries(Layer(root))}


def flip_byte(path: Path, offset: int = 10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_stats_counts_entries_bytes_per_op_and_failures(cache_dir, capsys):
    keys = fill(cache_dir, 3)
    Layer(cache_dir).publish("f" * 64, {}, {"op": "rms_norm", "arch": "gfx942", "status": "failed", "error": "boom"})
    s = cachectl.stats(Store([cache_dir]))
    (layer,) = s["layers"]
    assert layer["entries"] == 4 and layer["failures"] == 1
    assert layer["per_op"]["rms_norm"]["entries"] == 4 and layer["per_arch"]["cpu"]["entries"] == 3
    on_disk = sum(f.stat().st_size for k in keys + ["f" * 64] for f in Layer(cache_dir).entry_dir(k).iterdir())
    assert layer["bytes"] == on_disk
    assert main(["cache", "stats", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["entries"] == 4


def test_verify_detects_a_flipped_byte(cache_dir, capsys):
    keys = fill(cache_dir, 3)
    assert main(["cache", "verify"]) == 0
    flip_byte(Layer(cache_dir).entry_dir(keys[1]) / "kernel.py")
    assert main(["cache", "verify"]) == 1
    out = capsys.readouterr().out
    assert f"DAMAGED {keys[1]}" in out and "1 damaged" in out
    assert main(["cache", "verify", "--discard"]) == 1
    assert present(cache_dir) == {keys[0], keys[2]}
    assert main(["cache", "verify"]) == 0


def test_prune_removes_least_recently_used_until_it_fits(cache_dir):
    keys = fill(cache_dir, 6)
    age(cache_dir, keys)
    sizes = {k: cachectl.dir_size(Layer(cache_dir).entry_dir(k)) for k in keys}
    # a load refreshes the last-use stamp: keys[0] becomes the most recently used
    assert Store([cache_dir]).lookup(keys[0]) is not None
    limit = sum(sizes.values()) - sizes[keys[1]] - sizes[keys[2]] // 2  # must drop keys[1] and keys[2]
    assert main(["cache", "prune", "--max-size", str(limit)]) == 0
    assert present(cache_dir) == {keys[0], *keys[3:]}
    assert sum(cachectl.dir_size(Layer(cache_dir).entry_dir(k)) for k in present(cache_dir)) <= limit
    assert main(["cache", "verify"]) == 0


HOLD = textwrap.dedent("""
    import sys, time
    from jitkern.cache import Store
    entry = Store([sys.argv[1]]).lookup(sys.argv[2])   # a loader keeps its entry while it uses it
    print("held" if entry is not None else "missing", flush=True)
    time.sleep(60)
""")


def test_prune_never_removes_an_entry_another_process_holds(cache_dir):
    keys = fill(cache_dir, 3)
    age(cache_dir, keys)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(cache_dir), keys[0]], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = cachectl.prune(Store([cache_dir]), max_size=0)
        assert present(cache_dir) == {keys[0]} and r["kept_in_use"] == 1 and not r["fits"]
    finally:
        holder.kill()
        holder.wait()
    # held means locked: once the holder is gone, the entry goes although it was used a moment ago
    assert cachectl.prune(Store([cache_dir]), max_size=0)["removed"] == 1
    assert present(cache_dir) == set()


def test_prune_right_after_a_build_removes_entries_index_records_and_locks(cache_dir, capsys):
    from jitkern.plan import plan

    spec, cpu = registry.get("rms_norm"), arch.get("cpu")
    keys = []
    for cfg in list(spec.configs(cpu))[:4]:
        job = plan(spec, cfg, cpu)   # writes a plan-index record
        keys.append(get_entry(job)[0].key)         # takes (and leaves) the key's build lock file
    root = Layer(cache_dir).root
    assert len(list((root / "index").rglob("*.json"))) == 4 and len(list((root / "locks").glob("*.lock"))) == 4
    size = sum(cachectl.dir_size(Layer(cache_dir).entry_dir(k)) for k in keys)
    assert main(["cache", "prune", "--max-size", str(size // 2), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["removed"] >= 2 and r["bytes_after"] <= size // 2
    left = present(cache_dir)
    assert len(left) == 4 - r["removed"]
    index_keys = {json.loads(p.read_text())["key"] for p in (root / "index").rglob("*.json")}
    assert index_keys == left
    assert {p.stem for p in (root / "locks").glob("*.lock")} == left
    assert main(["cache", "prune", "--max-size", "0"]) == 0
    assert present(cache_dir) == set()
    assert not (root / "index").exists() and list((root / "locks").glob("*")) == []
    assert list((root / "entries").iterdir()) == []   # no empty shard directories
    assert cachectl.stats(Store([cache_dir]))["layers"][0]["evictions"]["entries"] == 4


def test_clear_failures_only_then_everything(cache_dir):
    keys = fill(cache_dir, 2)
    Layer(cache_dir).publish("e" * 64, {}, {"op": "rms_norm", "status": "failed", "error": "no hipcc"})
    assert main(["cache", "clear", "--failures"]) == 0
    assert present(cache_dir) == set(keys)
    assert main(["cache", "clear"]) == 0
    assert present(cache_dir) == set()
    root = Layer(cache_dir).root
    assert list((root / "entries").iterdir()) == [] and not (root / "index").exists()
    assert not (root / "locks").exists() or list((root / "locks").iterdir()) == []


def test_export_import_round_trip(cache_dir, tmp_path, capsys):
    keys = fill(cache_dir, 4)
    archive = tmp_path / "warm.tar.gz"
    assert main(["cache", "export", str(archive)]) == 0
    other = tmp_path / "other"
    assert main(["cache", "import", str(archive), "--cache-dir", str(other)]) == 0
    assert present(other) == set(keys)
    for k in keys:
        a, b = Layer(cache_dir).entry_dir(k), Layer(other).entry_dir(k)
        assert {f.name: f.read_bytes() for f in a.iterdir()} == {f.name: f.read_bytes() for f in b.iterdir()}
        Layer(other).verify(k)
    assert list((Layer(other).root / "tmp").iterdir()) == []
    capsys.readouterr()
    assert main(["cache", "import", str(archive), "--cache-dir", str(other)]) == 0
    assert "0 entries installed, 4 already present" in capsys.readouterr().out


def test_import_refuses_a_damaged_entry_and_installs_the_rest(cache_dir, tmp_path, capsys):
    keys = fill(cache_dir, 3)
    archive = tmp_path / "warm.tar"
    assert cachectl.export(Store([cache_dir]), archive)["entries"] == 3
    tampered = tmp_path / "tampered.tar"
    with tarfile.open(archive) as src, tarfile.open(tampered, "w") as dst:
        for m in src:
            data = src.extractfile(m).read()
            if m.name == f"entries/{keys[0]}/kernel.py":
                data = data.replace(b"tl.", b"tX.", 1)
            m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    other = tmp_path / "other"
    assert main(["cache", "import", str(tampered), "--cache-dir", str(other)]) == 1
    assert f"refused {keys[0]}" in capsys.readouterr().err
    assert present(other) == {keys[1], keys[2]}
    assert main(["cache", "import", str(tmp_path / "missing.tar"), "--cache-dir", str(other)]) == 2


def test_reads_from_a_read_only_layer_write_nothing_there(tmp_path):
    ro, rw = tmp_path / "ro", tmp_path / "rw"
    keys = fill(ro, 2)
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in ro.rglob("*")}
    store = Store([rw, ro])
    for k in keys:
        assert store.lookup(k).path.is_relative_to(ro)
    # no stamp, no lock file, no new directory in the read-only layer
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in ro.rglob("*")} == before


@pytest.mark.parametrize("text,expected", [("4096", 4096), ("500M", 500 << 20), ("2GiB", 2 << 30), ("1.5k", 1536),
                                           ("20GB", 20 * 10 ** 9), ("20GiB", 20 * 2 ** 30), ("0.1GB", 10 ** 8),
                                           ("1.5KB", 1500), ("3TB", 3 * 10 ** 12)])
def test_sizes(text, expected):
    from jitkern.cli import parse_size

    assert parse_size(text) == expected
