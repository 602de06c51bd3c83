"""Prebuild throughput: ``--jobs 2`` against ``--jobs 1`` on the same job list, in one run.

Default job list: the first 12 configurations of rms_norm and of gemm for gfx942, gfx950 and sm_90
(72 artifacts). Each run is the real command (``python -m jitkern prebuild``) into a fresh cache directory with a
fresh Triton cache, so neither run can reuse the other's work. Rate = artifacts built / wall time of
the whole command, and built artifacts / build phase (from starting the workers, whose start-up
is included, to the last result; the report's ``build_seconds``). Also reports the compile time per artifact per arch
(from the ``--jobs 1`` run's report, where compiles do not compete for cores).

    python tools/bench_prebuild.py [--arch gfx942,gfx950,sm_90] [--op rms_norm --op gemm] [--limit 12] [--jobs 2]

Prints a table and, last, one JSON line. Floor (issue 5): ratio >= 1.7 on a 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(jobs: int, args, work: Path) -> dict:
    cache, report = work / f"cache-j{jobs}", work / f"report-j{jobs}.json"
    env = dict(os.environ, JITKERN_CACHE_DIR=str(cache), TRITON_CACHE_DIR=str(work / f"triton-j{jobs}"))
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "jitkern", "prebuild", "--arch", args.arch, "--jobs", str(jobs),
           "--report", str(report), "--progress", "none"]
    for op in args.op:
        cmd += ["--op", op]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"prebuild --jobs {jobs} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    rep = json.loads(report.read_text())
    arts = rep["artifacts"]
    compiled = [a for a in arts if a["status"] in ("built", "rejected_over_budget")]
    build = rep["build_seconds"]
    return {"jobs": jobs, "wall_s": round(wall, 3), "build_s": build, "artifacts": len(arts),
            "compiled": len(compiled), "rate_per_s": round(len(compiled) / wall, 3),
            "build_rate_per_s": round(len(compiled) / build, 3), "artifacts_detail": arts}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="gfx942,gfx950,sm_90")
    ap.add_argument("--op", action="append", default=None)
    ap.add_argument("--limit", type=int, default=12, help="configs per op and arch (0: all)")
    ap.add_argument("--jobs", type=int, default=2, help="the parallel run's worker count")
    args = ap.parse_args()
    args.op = args.op or ["rms_norm", "gemm"]
    with tempfile.TemporaryDirectory(prefix="bench-prebuild-") as d:
        serial = run(1, args, Path(d))
        parallel = run(args.jobs, args, Path(d))
    if serial["compiled"] != parallel["compiled"]:
        sys.exit(f"the runs compiled different job lists: {serial['compiled']} vs {parallel['compiled']}")
    ratio = parallel["rate_per_s"] / serial["rate_per_s"]
    build_ratio = parallel["build_rate_per_s"] / serial["build_rate_per_s"]
    per_arch = {}
    for a in serial["artifacts_detail"]:
        if a["status"] in ("built", "rejected_over_budget") and a.get("seconds") is not None:
            per_arch.setdefault(a["arch"], []).append(a["seconds"])
    per_arch = {k: {"n": len(v), "mean_s": round(statistics.mean(v), 3), "median_s": round(statistics.median(v), 3),
                    "max_s": round(max(v), 3)} for k, v in per_arch.items()}
    print(f"jitkern prebuild --arch {args.arch} --op {' --op '.join(args.op)} --limit {args.limit}  "
          f"({os.cpu_count()} cores)")
    print(f"{'jobs':>4} {'artifacts':>9} {'wall s':>8} {'artifacts/s':>11} {'build s':>8} {'built/s':>8}")
    for r in (serial, parallel):
        print(f"{r['jobs']:>4} {r['compiled']:>9} {r['wall_s']:>8.2f} {r['rate_per_s']:>11.3f} {r['build_s']:>8.2f} "
              f"{r['build_rate_per_s']:>8.3f}")
    print(f"rate ratio jobs={args.jobs} / jobs=1: build phase {build_ratio:.2f}x (floor 1.7x); whole command "
          f"{ratio:.2f}x (includes ~fixed start-up: imports, planning, cache lookups)")
    print(f"{'arch':<8} {'n':>4} {'mean s':>7} {'median s':>9} {'max s':>6}   (compile time per artifact, jobs=1)")
    for k, v in per_arch.items():
        print(f"{k:<8} {v['n']:>4} {v['mean_s']:>7.3f} {v['median_s']:>9.3f} {v['max_s']:>6.3f}")
    for r in (serial, parallel):
        del r["artifacts_detail"]
    print(json.dumps({"cores": os.cpu_count(), "arch": args.arch, "ops": args.op, "limit": args.limit,
                      "serial": serial, "parallel": parallel, "ratio": round(ratio, 3), "build_ratio": round(build_ratio, 3),
                      "per_artifact_compile_s": per_arch}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
