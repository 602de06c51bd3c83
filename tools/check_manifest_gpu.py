"""GPU check of issue 15: record -> prebuild (sm_90) -> strict run, on a real GPU.

    PYTHONPATH=$PWD python tools/check_manifest_gpu.py OUT.json [--layers 2] [--phases 1x16,8x16] [--steps 2]

1. **record**: the example decoder (examples/jitkern_decoder at Qwen3-8B shapes, bf16, the workload of
   tools/record_example_manifest.py) runs on the GPU with ``JITKERN_RECORD=manifest.jsonl`` and a
   cache of its own (it compiles lazily); one process per phase, in parallel, appending to one file.
2. **prebuild**: ``jitkern prebuild --manifest manifest.jsonl --arch <the GPU's arch>`` into a new,
   empty cache (no kernel from step 1 is reused: Triton cross-compiles without the GPU).
3. **check**: ``jitkern cache check`` on that cache must exit 0.
4. **strict run**: fresh processes over the prebuilt cache with ``JITKERN_STRICT=1`` run the same
   phases; each must compile nothing (``jitkern.stats()["compiles"] == 0``) and produce the logits of
   step 1 (the same kernels: compared bitwise and by max abs difference).

Everything is written to OUT.json (figures, versions, the GPU, the date) as it goes; exit 0 only if
every check passed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))


def child(args) -> int:
    """One phase in this process: run it, save the logits, print jitkern's counters as JSON."""
    import torch

    import jitkern
    from record_example_manifest import phase

    b, t = (int(v) for v in args.child.split("x"))
    t0 = time.perf_counter()
    logits = phase(b, t, args.steps, args.layers, None, device="cuda")
    torch.cuda.synchronize()
    torch.save(logits, args.logits)
    print("RESULT " + json.dumps({"seconds": round(time.perf_counter() - t0, 3), "stats": jitkern.stats()}), flush=True)
    return 0


def run_phases(phases, env, tmp: Path, tag: str, args) -> list[dict]:
    procs = []
    for p in phases:
        cmd = [sys.executable, __file__, "--child", p, "--logits", str(tmp / f"{tag}-{p}.pt"),
               "--layers", str(args.layers), "--steps", str(args.steps)]
        procs.append((p, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    out = []
    for p, proc in procs:
        so, se = proc.communicate()
        res = next((json.loads(ln[7:]) for ln in so.splitlines() if ln.startswith("RESULT ")), None)
        out.append({"phase": p, "returncode": proc.returncode, **(res or {}),
                    "stderr_tail": None if proc.returncode == 0 else se[-3000:]})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", nargs="?", help="JSON summary to write")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--phases", default="1x16,8x16")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--logits", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    if not args.out:
        ap.error("give the path of the JSON summary to write")
    import torch

    import jitkern
    from jitkern import arch, manifest

    summary: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "jitkern": jitkern.__version__,
                     "torch": torch.__version__, "device": torch.cuda.get_device_name(0), "layers": args.layers,
                     "phases": args.phases, "steps": args.steps, "checks": {}}
    import importlib.metadata as md

    summary["triton"] = md.version("triton")
    gpu_arch = arch.current().name
    summary["arch"] = gpu_arch

    def save():
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=1, default=str))

    tmp = Path(tempfile.mkdtemp(prefix="jitkern-manifest-gpu-"))
    man = tmp / "manifest.jsonl"
    base = dict(os.environ)
    base["PYTHONPATH"] = os.pathsep.join([str(REPO), base.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    for k in ("JITKERN_STRICT", "JITKERN_RECORD", "JITKERN_ARCH", "TRITON_INTERPRET"):
        base.pop(k, None)
    phases = args.phases.split(",")

    # 1. record (lazy compiles into a cache of its own)
    t0 = time.perf_counter()
    rec = run_phases(phases, {**base, "JITKERN_CACHE_DIR": str(tmp / "record-cache"), "JITKERN_RECORD": str(man)},
                     tmp, "record", args)
    m = manifest.read(man) if man.exists() else None
    summary["record"] = {"seconds": round(time.perf_counter() - t0, 1), "processes": rec,
                         "signatures": len(m) if m else 0, "ops": m.ops() if m else [],
                         "lines": sum(1 for ln in man.read_text().splitlines() if ln.strip()) if man.exists() else 0}
    summary["checks"]["record_ran"] = all(r["returncode"] == 0 for r in rec) and bool(m and len(m))
    save()
    if not summary["checks"]["record_ran"]:
        return 1

    # 2. prebuild into an empty cache
    cache = tmp / "prebuilt"
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "jitkern", "prebuild", "--manifest", str(man), "--arch", gpu_arch,
                        "--report", str(tmp / "prebuild.json"), "--progress", "none"],
                       env={**base, "JITKERN_CACHE_DIR": str(cache)}, capture_output=True, text=True)
    report = json.loads((tmp / "prebuild.json").read_text()) if (tmp / "prebuild.json").exists() else {}
    summary["prebuild"] = {"seconds": round(time.perf_counter() - t0, 1), "returncode": p.returncode,
                           "counts": report.get("counts"), "complete": report.get("complete"),
                           "stdout_tail": p.stdout[-4000:], "stderr_tail": p.stderr[-2000:]}
    summary["checks"]["prebuild_complete"] = p.returncode == 0 and bool(report.get("complete"))
    save()

    # 3. coverage check
    c = subprocess.run([sys.executable, "-m", "jitkern", "cache", "check", "--manifest", str(man), "--arch", gpu_arch],
                       env={**base, "JITKERN_CACHE_DIR": str(cache)}, capture_output=True, text=True)
    summary["check"] = {"returncode": c.returncode, "stdout_tail": c.stdout[-2000:]}
    summary["checks"]["cache_check_passes"] = c.returncode == 0
    save()

    # 4. strict run over the prebuilt cache
    t0 = time.perf_counter()
    strict = run_phases(phases, {**base, "JITKERN_CACHE_DIR": str(cache), "JITKERN_STRICT": "1"}, tmp, "strict", args)
    same = {}
    for ph in phases:
        a, b = tmp / f"record-{ph}.pt", tmp / f"strict-{ph}.pt"
        if a.exists() and b.exists():
            x, y = torch.load(a), torch.load(b)
            same[ph] = {"bitwise": bool(torch.equal(x, y)), "max_abs": float((x - y).abs().max())}
    summary["strict_run"] = {"seconds": round(time.perf_counter() - t0, 1), "processes": strict, "logits": same}
    summary["checks"]["strict_runs_ok"] = all(r["returncode"] == 0 for r in strict)
    summary["checks"]["strict_compiles_0"] = all((r.get("stats") or {}).get("compiles", 1) == 0 for r in strict)
    summary["checks"]["logits_match_record_run"] = len(same) == len(phases) and all(
        v["max_abs"] == 0.0 for v in same.values())
    summary["ok"] = all(summary["checks"].values())
    save()
    print(json.dumps(summary["checks"], indent=1))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
