"""Fleet simulation for the remote shared cache (jitkern.remote): N node processes, one Redis.

Each node is a separate process with its own empty local cache (``JITKERN_CACHE_DIR``) and its own
empty Triton cache, pointed at one shared ``redis-server`` (started here on a free loopback port).
Every node asks for the same artifacts (rms_norm configurations cross-compiled with the real Triton
compiler for sm_90, then gfx942, until ``--artifacts`` are listed), each node in its own shuffled
order, all starting at the same instant once every node has imported and planned. Phases, in one run:

  compile      1 node, no remote: compile every artifact (the anchor)
  fleet-cold   N nodes, empty remote: exactly one compile per key fleet-wide is checked
  fetch        1 node, fresh local cache, warm remote: every artifact fetched, none compiled
  fleet-warm   N nodes, fresh local caches, warm remote
  fleet-none   (--no-remote-baseline) N nodes, no remote: every node compiles everything

Wall time is from the common start instant to the last node's last artifact (imports and planning
excluded; triton is imported before the start in every node, which favours the compiling phases).

    python tools/fleet_sim.py [--nodes 8] [--artifacts 100] [--json out.json] [--no-remote-baseline]

Prints a table and JSON. Needs ``redis-server`` on PATH and ``pip install redis``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHES = ("sm_90", "gfx942")


def jobs(count: int):
    """The first ``count`` rms_norm configurations over ARCHES, planned (rendered + keyed)."""
    from jitkern import arch, registry
    from jitkern.plan import plan

    spec = registry.get("rms_norm")
    out = []
    for name in ARCHES:
        a = arch.get(name)
        for cfg in spec.configs(a):
            out.append(plan(spec, cfg, a))
            if len(out) == count:
                return out
    raise SystemExit(f"only {len(out)} rms_norm configurations over {ARCHES}; ask for fewer --artifacts")


# ---- one node (a child process) ------------------------------------------------------------------
def node_main(spec: dict) -> None:
    import triton  # noqa: F401  (imported before the start instant in every phase)

    from jitkern import counters
    from jitkern.build import get_entry

    planned = jobs(spec["artifacts"])
    random.Random(spec["seed"]).shuffle(planned)
    print("ready", flush=True)
    start_at = float(sys.stdin.readline())  # the driver's "go": one start instant for every node
    time.sleep(max(0.0, start_at - time.time()))
    t0 = time.time()
    statuses: dict[str, int] = {}
    for job in planned:
        _, how = get_entry(job)
        statuses[how] = statuses.get(how, 0) + 1
    t1 = time.time()
    print(json.dumps({"start": t0, "end": t1, "statuses": statuses, "stats": counters.snapshot()}), flush=True)


# ---- the driver ----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(workdir: Path):
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server not found (apt-get install redis-server)")
    import redis

    port = _free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    for _ in range(200):
        try:
            client.ping()
            return proc, url, client
        except redis.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("redis-server did not start")


def run_phase(name: str, nodes: int, artifacts: int, url: str | None, workdir: Path) -> dict:
    procs = []
    for i in range(nodes):
        home = workdir / name / f"node{i}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TRITON_INTERPRET", "JITKERN_"))}
        env.update(JITKERN_CACHE_DIR=str(home / "jitkern"), TRITON_CACHE_DIR=str(home / "triton"),
                   PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
        if url:
            env["JITKERN_REMOTE_CACHE"] = url
        spec = {"artifacts": artifacts, "seed": zlib.crc32(f"{name}:{i}".encode())}
        procs.append(subprocess.Popen([sys.executable, __file__, "--node", json.dumps(spec)], env=env,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    for p in procs:  # wait until every node has imported and planned
        if p.stdout.readline().strip() != "ready":
            raise SystemExit(f"phase {name}: a node failed to start:\n{p.communicate()[1][-3000:]}")
    start_at = time.time() + 0.2
    for p in procs:
        p.stdin.write(f"{start_at}\n")
        p.stdin.flush()
    results = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"phase {name}: a node failed:\n{err[-3000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    late = max(r["start"] for r in results) - start_at
    if late > 0.5:
        print(f"warning: phase {name}: a node started {late:.1f} s late", file=sys.stderr)
    total = lambda k: sum(r["stats"].get(k, 0) for r in results)  # noqa: E731
    statuses: dict[str, int] = {}
    for r in results:
        for k, v in r["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    return {
        "phase": name, "nodes": nodes, "artifacts": artifacts, "remote": bool(url),
        "loadavg_1min_after": round(os.getloadavg()[0], 2),  # this machine is shared: say how busy it was
        "wall_s": round(max(r["end"] for r in results) - start_at, 3),
        "node_s": sorted(round(r["end"] - r["start"], 3) for r in results),
        "compiles": total("compiles"), "remote_hits": total("remote_hits"), "remote_puts": total("remote_puts"),
        "remote_waits": total("remote_waits"), "remote_errors": total("remote_errors"),
        "remote_rejected": total("remote_rejected"), "statuses": statuses,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--node", help=argparse.SUPPRESS)
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--artifacts", type=int, default=100)
    ap.add_argument("--no-remote-baseline", action="store_true", help="also run N nodes without a remote")
    ap.add_argument("--json", metavar="FILE", help="also write the results here")
    args = ap.parse_args(argv)
    if args.node:
        node_main(json.loads(args.node))
        return 0
    if args.nodes < 1 or args.artifacts < 1:
        ap.error("--nodes and --artifacts must be positive")

    load_before = [round(x, 2) for x in os.getloadavg()]
    workdir = Path(tempfile.mkdtemp(prefix="jitkern-fleet-"))
    proc, url, client = start_redis(workdir)
    phases = []
    try:
        phases.append(run_phase("compile", 1, args.artifacts, None, workdir))
        phases.append(run_phase("fleet-cold", args.nodes, args.artifacts, url, workdir))
        entries = len(list(client.scan_iter(match="jitkern:*entry:*", count=1000)))
        stored = sum(client.strlen(k) for k in client.scan_iter(match="jitkern:*entry:*", count=1000))
        phases.append(run_phase("fetch", 1, args.artifacts, url, workdir))
        phases.append(run_phase("fleet-warm", args.nodes, args.artifacts, url, workdir))
        if args.no_remote_baseline:
            phases.append(run_phase("fleet-none", args.nodes, args.artifacts, None, workdir))
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)

    anchor = phases[0]["wall_s"]
    for p in phases:
        p["vs_compile"] = round(p["wall_s"] / anchor, 4)
    cold = phases[1]
    checks = {
        "one_compile_per_key_fleet_wide": cold["compiles"] == args.artifacts,
        "remote_entries": entries,
        "remote_bytes": stored,
        "fetch_compiled_nothing": phases[2]["compiles"] == 0 and phases[3]["compiles"] == 0,
    }
    report = {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "host": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "loadavg_before": load_before},
        "arches": ARCHES, "op": "rms_norm", "phases": phases, "checks": checks,
        "command": " ".join([os.path.basename(sys.executable), "tools/fleet_sim.py", *(argv or sys.argv[1:])]),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    print()
    rows = [[p["phase"], p["nodes"], p["artifacts"], "yes" if p["remote"] else "no", p["compiles"],
             p["remote_hits"], p["remote_waits"], f"{p['wall_s']:.2f}", f"{1000 * p['wall_s'] / p['artifacts']:.1f}",
             f"{p['vs_compile']:.3f}"] for p in phases]
    header = ["phase", "nodes", "artifacts", "remote", "compiles", "fetched", "waited", "wall s", "ms/artifact",
              "x compile"]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    for j, r in enumerate([header, *rows]):
        print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))
    print(f"\none compile per key fleet-wide: {checks['one_compile_per_key_fleet_wide']} "
          f"({cold['compiles']} compiles for {args.artifacts} keys over {args.nodes} nodes); "
          f"remote holds {entries} entries, {stored / 1024:.0f} KiB")
    return 0 if checks["one_compile_per_key_fleet_wide"] and checks["fetch_compiled_nothing"] else 1


if __name__ == "__main__":
    sys.exit(main())
