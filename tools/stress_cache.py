"""Stress jitkern's cache with real processes: SIGKILL at random moments, and many processes cold-
starting together. Prints a JSON object and a readable table; exits non-zero on any failure.

    python tools/stress_cache.py                       # 50 kill trials + 16 processes x 3 rounds, interpreter
    python tools/stress_cache.py --mode sm90           # the same with real sm_90 cross-compiles (no GPU needed)
    python tools/stress_cache.py --trials 100 --procs 16 --rounds 5 --json out.json

Kill trials: before each trial a random subset of entries is removed, so the worker has to build
and publish some keys and load the rest; it is killed with SIGKILL at a random moment between the
end of its imports and its expected finish (``--slow-publish`` makes every file written into the
cache take 20 ms, so more kills land inside a publish). After each kill:

- every entry in the cache must verify (checksums) and pass the job check (op, arch, ELF binary);
- every key's build lock must be free at once (a dead holder's flock is released by the kernel);
- every ``--verify-every`` trials, and after the last, a fresh process must run all keys correctly
  (results compared with the PyTorch reference in interpreter mode) without waiting and without
  finding a damaged entry, and must have removed the dead processes' temporary directories.

Concurrency rounds: an empty cache, ``--procs`` processes started together; the compiles summed
over all processes must equal the number of keys, and every result must be right.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: interpreter mode: (rows, hidden) per key.
SHAPES = ((4, 64), (3, 100), (2, 600), (2, 2048), (2, 5000), (1, 9000))
#: sm90 mode: rms_norm configs (dtype, residual, aligned, block_n, single_pass).
CONFIGS = (("fp32", False, True, 256, True), ("bf16", True, True, 256, True), ("fp16", False, False, 1024, True))


# ---- the worker (a separate process) ----------------------------------------------------------
def _jobs(mode):
    from jitkern import arch
    from jitkern.plan import plan as plan_job
    from jitkern.library import rms_norm as rn

    if mode == "sm90":
        return [plan_job(rn.SPEC, rn.config(*c), arch.get("sm_90")) for c in CONFIGS]
    jobs = []
    for _, n in SHAPES:
        block, single = rn.block_for(n)
        jobs.append(plan_job(rn.SPEC, rn.config("fp32", False, n % 16 == 0, block, single), arch.ARCHES["cpu"]))
    return jobs


def worker(mode: str, slow_publish: bool) -> None:
    if mode == "interp":
        os.environ["TRITON_INTERPRET"] = "1"
        import torch  # noqa: F401
    import jitkern
    import jitkern.ops  # noqa: F401
    from jitkern import build

    if slow_publish:
        import jitkern.cache as cache

        real = cache._write

        def slow(path, data):
            time.sleep(0.02)
            real(path, data)

        cache._write = slow
    print("ready", flush=True)
    t0 = time.perf_counter()
    ok, errors = True, []
    if mode == "sm90":
        for job in _jobs(mode):
            build.get_entry(job)
    else:
        import torch

        from jitkern.library.rms_norm import reference

        for i, (m, n) in enumerate(SHAPES):
            g = torch.Generator().manual_seed(i)
            x, w = torch.randn(m, n, generator=g), torch.randn(n, generator=g)
            try:
                good = torch.allclose(jitkern.ops.rms_norm(x, w), reference(x, w), rtol=1e-4, atol=1e-5)
            except Exception as e:
                good = False
                errors.append(f"{type(e).__name__}: {e}")
            ok &= bool(good)
    print(json.dumps({"pid": os.getpid(), "stats": jitkern.stats(), "ok": ok, "errors": errors,
                      "seconds": time.perf_counter() - t0}), flush=True)


# ---- the driver --------------------------------------------------------------------------------
def _env(cache_dir, mode):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "JITKERN_CACHE_DIR")}
    env["JITKERN_CACHE_DIR"] = str(cache_dir)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env


def _start(cache_dir, mode, slow=False):
    args = [sys.executable, str(Path(__file__).resolve()), "_worker", mode] + (["--slow-publish"] if slow else [])
    return subprocess.Popen(args, env=_env(cache_dir, mode), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _finish(p, timeout=600):
    out, err = p.communicate(timeout=timeout)
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        return {"ok": False, "errors": [f"exit {p.returncode}: {err[-1500:]}"], "stats": {}}
    return json.loads(lines[-1])


def _audit(cache_dir, jobs):
    """(entries, bad entries, tmp names, max seconds to take each key's lock)."""
    from jitkern.build import check_entry
    from jitkern.cache import Layer
    from jitkern.errors import CorruptEntryError

    layer = Layer(cache_dir)
    by_key = {j.key: j for j in jobs}
    n, bad = 0, []
    for d in sorted(layer.root.glob("entries/*/*")):
        n += 1
        try:
            entry = layer.verify(d.name)
            if d.name in by_key:
                check_entry(by_key[d.name], entry)
        except (CorruptEntryError, OSError) as e:
            bad.append(f"{d.name[:16]}: {e}")
    tmp = sorted(p.name for p in (layer.root / "tmp").glob("*")) if (layer.root / "tmp").exists() else []
    waits = []
    if (layer.root / "locks").exists():
        for j in jobs:
            t0 = time.monotonic()
            with layer.build_lock(j.key, timeout=5.0) as held:
                waits.append(time.monotonic() - t0 if held else float("inf"))
    return n, bad, tmp, max(waits, default=0.0)


def kill_trials(args, cache_dir, jobs):
    rng = random.Random(args.seed)
    # calibrate: how long a worker takes from "ready" to done on an empty cache
    p = _start(cache_dir, args.mode, args.slow_publish)
    p.stdout.readline()
    t0 = time.monotonic()
    first = _finish(p)
    span = max(0.2, time.monotonic() - t0)
    rec = {"trials": 0, "killed_mid_run": 0, "tmp_left_by_kills": 0, "bad_entries": [], "max_lock_wait_s": 0.0,
           "verify_runs": 0, "verify_failures": [], "calibration_s": round(span, 3), "stale_tmp_left": 0,
           "first_run_ok": first["ok"]}
    from jitkern.cache import Layer

    layer = Layer(cache_dir)
    for trial in range(args.trials):
        present = sorted(layer.root.glob("entries/*/*"))
        for d in present:  # drop a random subset so the worker builds some keys and loads others
            if rng.random() < 0.6:
                layer.discard(d.name)
        p = _start(cache_dir, args.mode, args.slow_publish)
        if p.stdout.readline().strip() != "ready":
            rec["verify_failures"].append(f"trial {trial}: worker did not start: {p.communicate()[1][-500:]}")
            continue
        time.sleep(rng.uniform(0.0, span))
        alive = p.poll() is None
        p.send_signal(signal.SIGKILL)
        p.communicate()
        rec["trials"] += 1
        rec["killed_mid_run"] += alive
        n, bad, tmp, wait = _audit(cache_dir, jobs)
        rec["tmp_left_by_kills"] += bool([t for t in tmp if not t.startswith("triton-cache")])
        rec["bad_entries"] += [f"trial {trial}: {b}" for b in bad]
        rec["max_lock_wait_s"] = max(rec["max_lock_wait_s"], wait)
        if (trial + 1) % args.verify_every == 0 or trial == args.trials - 1:
            t0 = time.monotonic()
            res = _finish(_start(cache_dir, args.mode))
            rec["verify_runs"] += 1
            s = res.get("stats", {})
            good = (res["ok"] and s.get("compiles", 0) + s.get("disk_hits", 0) == len(jobs)
                    and s.get("corrupt_discarded", 0) == 0)
            if not good:
                rec["verify_failures"].append(f"trial {trial}: {res}")
            _, bad, tmp, _ = _audit(cache_dir, jobs)
            rec["stale_tmp_left"] = max(rec["stale_tmp_left"], len(tmp))
            rec["bad_entries"] += [f"after trial {trial}: {b}" for b in bad]
            rec.setdefault("verify_seconds", []).append(round(time.monotonic() - t0, 2))
    rec["max_lock_wait_s"] = round(rec["max_lock_wait_s"], 4)
    return rec


def concurrency(args, root, jobs):
    rounds = []
    for r in range(args.rounds):
        cache_dir = root / f"conc-{r}"
        t0 = time.monotonic()
        procs = [_start(cache_dir, args.mode) for _ in range(args.procs)]
        results = [_finish(p) for p in procs]
        wall = time.monotonic() - t0
        compiles = [res.get("stats", {}).get("compiles", -1) for res in results]
        n, bad, _, _ = _audit(cache_dir, jobs)
        rounds.append({"round": r, "procs": args.procs, "keys": len(jobs), "compiles_total": sum(compiles),
                       "compiles_per_process": compiles, "all_ok": all(res["ok"] for res in results),
                       "entries": n, "bad_entries": bad, "wall_s": round(wall, 2),
                       "errors": [e for res in results for e in res.get("errors", [])][:5]})
    return rounds


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_worker"]:
        worker(argv[1], "--slow-publish" in argv)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("interp", "sm90"), default="interp")
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--procs", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--verify-every", type=int, default=10)
    ap.add_argument("--slow-publish", action="store_true", help="20 ms per file written into the cache")
    ap.add_argument("--seed", type=int, default=8)
    ap.add_argument("--json", help="also write the JSON report here")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    if args.mode == "interp":
        os.environ["TRITON_INTERPRET"] = "1"  # only so that planning here matches the workers' keys
    jobs = _jobs(args.mode)
    root = Path(tempfile.mkdtemp(prefix="jitkern-stress-"))
    t0 = time.monotonic()
    try:
        kills = kill_trials(args, root / "kills", jobs) if args.trials else None
        conc = concurrency(args, root, jobs) if args.rounds else []
    finally:
        shutil.rmtree(root, ignore_errors=True)
    failures = []
    if kills:
        failures += kills["bad_entries"] + kills["verify_failures"]
        if kills["max_lock_wait_s"] > 1.0:
            failures.append(f"waited {kills['max_lock_wait_s']} s for a dead holder's lock")
        if kills["stale_tmp_left"]:
            failures.append(f"{kills['stale_tmp_left']} temporary directories of dead processes were not removed")
    for r in conc:
        if r["compiles_total"] != r["keys"] or not r["all_ok"] or r["bad_entries"]:
            failures.append(f"concurrency round {r['round']}: {r}")
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "mode": args.mode,
              "keys": len(jobs), "slow_publish": args.slow_publish, "kill_trials": kills, "concurrency": conc,
              "failures": failures, "seconds": round(time.monotonic() - t0, 1)}
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"\njitkern cache stress ({args.mode}, {len(jobs)} keys) - {report['date']}")
    if kills:
        print(f"  kill trials             {kills['trials']:>6}   (killed while running: {kills['killed_mid_run']}, "
              f"left a publish tmp dir: {kills['tmp_left_by_kills']})")
        print(f"  bad entries after kills {len(kills['bad_entries']):>6}")
        print(f"  max lock wait after kill{kills['max_lock_wait_s']:>7.3f} s")
        print(f"  verify runs / failures  {kills['verify_runs']:>6} / {len(kills['verify_failures'])}"
              f"   (stale tmp dirs left after a verify run: {kills['stale_tmp_left']})")
    for r in conc:
        print(f"  {r['procs']} processes, round {r['round']}: compiles {r['compiles_total']} for {r['keys']} keys, "
              f"all correct: {r['all_ok']}, {r['wall_s']} s")
    print(f"  failures                {len(failures):>6}   ({report['seconds']} s in all)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
