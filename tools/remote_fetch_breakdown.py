"""Where a remote-cache fetch spends its time: Redis GET, checks (decode), local publish.

Starts its own redis-server on a free loopback port, stores N synthetic entries (sizes like an
rms_norm sm_90 entry: ~20 KB), then fetches each into an empty local cache, timing the three steps.

    python tools/remote_fetch_breakdown.py [--entries 100]

Prints JSON and a table (milliseconds per entry).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", type=int, default=100)
    args = ap.parse_args(argv)
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server not found (apt-get install redis-server)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    work = Path(tempfile.mkdtemp(prefix="jitkern-fetch-"))
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(work)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from jitkern import remote
        from jitkern.cache import Store

        r = remote.RedisRemote(f"redis://127.0.0.1:{port}/0")
        for _ in range(200):
            try:
                r.client.ping()
                break
            except Exception:
                time.sleep(0.05)
        keys = [os.urandom(32).hex() for _ in range(args.entries)]
        for k in keys:
            files = {"entry.json": json.dumps({"op": "synthetic", "key": k}).encode(), "kernel.py": os.urandom(3000),
                     "kernel.cubin": os.urandom(15000), "metadata.json": os.urandom(2000)}
            r.client.set(r.entry_name(k), remote.encode(k, files))
        store = Store([work / "local"])
        t = {"get": 0.0, "decode": 0.0, "local_publish": 0.0}
        for k in keys:
            t0 = time.perf_counter()
            blob = r.get_blob(k)
            t1 = time.perf_counter()
            files = remote.decode(k, blob)
            t2 = time.perf_counter()
            remote.store_files(store, k, files)
            t3 = time.perf_counter()
            t["get"] += t1 - t0
            t["decode"] += t2 - t1
            t["local_publish"] += t3 - t2
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    per = {k: round(1000 * v / args.entries, 3) for k, v in t.items()}
    report = {"entries": args.entries, "ms_per_entry": per, "loadavg": [round(x, 2) for x in os.getloadavg()],
              "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    print(json.dumps(report, indent=1))
    print(f"\n{'step':<14} {'ms/entry':>9}")
    for k, v in per.items():
        print(f"{k:<14} {v:>9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
