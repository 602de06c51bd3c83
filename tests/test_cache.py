"""Foundation cache tests, with real processes: a second process loads what the first built without
compiling; processes starting together on an empty cache compile each key exactly once; a damaged
entry is rebuilt with one warning and never loaded. Counters come from ``jitkern.stats()`` inside
each process (tests/cache_worker.py prints them)."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import jitkern
from jitkern import arch, build, counters
from jitkern.cache import MANIFEST, Layer, Store
from jitkern.plan import plan as plan_job
from jitkern.library import rms_norm as rn

WORKER = Path(__file__).with_name("cache_worker.py")
N_KEYS = 4  # cache_worker.SHAPES


def worker_env(cache_dir, interpret=True, **extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["JITKERN_CACHE_DIR"] = str(cache_dir)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def start(args, env, **kw):
    return subprocess.Popen([sys.executable, str(WORKER), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def result(proc, timeout=240):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{err[-3000:]}"
    return json.loads(out.strip().splitlines()[-1]), err


def run_worker(args, env, timeout=240, **kw):
    return result(start(args, env, **kw), timeout)


def entries(cache_dir) -> list[Path]:
    return sorted(Path(cache_dir).glob("v*/entries/*/*"))


def test_second_process_loads_without_compiling(cache_dir):
    first, _ = run_worker(["run"], worker_env(cache_dir))
    assert first["ok"], first["errors"]
    assert first["stats"]["compiles"] == N_KEYS and first["stats"]["disk_hits"] == 0
    assert len(entries(cache_dir)) == N_KEYS
    second, _ = run_worker(["run"], worker_env(cache_dir))
    assert second["ok"], second["errors"]
    assert second["stats"]["compiles"] == 0
    assert second["stats"]["disk_hits"] == N_KEYS


def test_four_processes_on_an_empty_cache_compile_each_key_once(cache_dir):
    """Real sm_90 cross-compiles (Triton, no GPU needed), 4 processes started together."""
    env = worker_env(cache_dir, interpret=False)
    procs = [start(["build", "sm_90"], env) for _ in range(4)]
    results = [result(p)[0] for p in procs]
    n_keys = len(results[0]["statuses"])
    assert n_keys == 2
    assert sum(r["stats"]["compiles"] for r in results) == n_keys
    for r in results:
        assert r["stats"]["compiles"] + r["stats"]["disk_hits"] == n_keys
        assert set(r["statuses"]) == set(results[0]["statuses"])
    assert len(entries(cache_dir)) == n_keys
    store = Store([cache_dir])
    for e in entries(cache_dir):
        assert store.lookup(e.name) is not None  # every published entry verifies


# ---- corruption --------------------------------------------------------------------------------
def _flip(path: Path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


DAMAGE = {
    "flipped byte in kernel.py": lambda d: _flip(d / "kernel.py"),
    "truncated kernel.py": lambda d: (d / "kernel.py").write_bytes((d / "kernel.py").read_bytes()[:100]),
    "deleted kernel.py": lambda d: (d / "kernel.py").unlink(),
    "deleted manifest": lambda d: (d / MANIFEST).unlink(),
    "garbage manifest": lambda d: (d / MANIFEST).write_text("{not json"),
    "empty entry.json": lambda d: (d / "entry.json").write_bytes(b""),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_entry_is_rebuilt_with_one_warning(cache_dir, damage, caplog):
    x, w = torch.randn(3, 64), torch.randn(64)
    jitkern.ops.rms_norm(x, w)
    (entry,) = entries(cache_dir)
    DAMAGE[damage](entry)
    jitkern.dispatch.clear_memory()
    counters.reset()
    with caplog.at_level(logging.WARNING, logger="jitkern"):
        for _ in range(3):  # the first call rebuilds; later ones use the memo, then the sound entry
            y = jitkern.ops.rms_norm(x, w)
            jitkern.dispatch.clear_memory()
    torch.testing.assert_close(y, rn.reference(x, w))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "damaged" in warnings[0].getMessage(), [r.getMessage() for r in warnings]
    s = jitkern.stats()
    assert s["corrupt_discarded"] == 1 and s["compiles"] == 1 and s["disk_hits"] == 2
    Store([cache_dir]).lookup(entry.name)  # the rebuilt entry is sound
    assert Layer(cache_dir).verify(entry.name).key == entry.name


def test_damaged_binary_is_never_loaded_and_is_rebuilt(cache_dir, caplog):
    """A flipped byte in a real sm_90 cubin: lookup refuses it; get_entry rebuilds a sound one."""
    run_worker(["build", "sm_90"], worker_env(cache_dir, interpret=False))
    job = plan_job(rn.SPEC, rn.config("fp32", False, True, 256, True), arch.get("sm_90"))
    d = Layer(cache_dir).entry_dir(job.key)
    good = (d / "kernel.cubin").read_bytes()
    _flip(d / "kernel.cubin")
    with caplog.at_level(logging.WARNING, logger="jitkern"):
        assert Store([cache_dir]).lookup(job.key) is None
    assert not d.exists()
    entry, how = build.get_entry(job)
    assert how == "built" and entry.file("kernel.cubin").read_bytes() == good  # deterministic rebuild
