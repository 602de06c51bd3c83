"""A read-only prebuilt layer serves a runtime process with zero compiles and zero writes.

1. ``jitkern prebuild --arch ARCH --op rms_norm`` into layer A (a fresh directory);
2. ``chmod -R a-w A`` and a snapshot of every path, size and mtime under A;
3. a new process with ``JITKERN_CACHE_DIR=B<pathsep>A`` runs rms_norm over dtypes, row lengths
   (single-pass and looped kernels, aligned and not) with and without the fused residual, checks
   each result against the PyTorch reference and reports ``jitkern.stats()``;
4. A is snapshotted again and compared; B must hold no entries.

On a GPU machine (the H100): ``python tools/check_readonly_layer.py --arch sm_90`` (tensors on
cuda). On CPU: ``python tools/check_readonly_layer.py --arch cpu`` (Triton's interpreter).
Prints a table and, last, one JSON line; exit status 1 if any check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import json, sys, time
    import torch, jitkern
    from jitkern.library.rms_norm import reference
    dev = sys.argv[1]
    torch.manual_seed(0)
    rows = 64 if dev == "cuda" else 3
    t0 = time.perf_counter()
    worst, calls = 0.0, 0
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for n in (1, 100, 256, 1000, 4096, 5000, 8192, 9000):
            for residual in (False, True):
                x = torch.randn(rows, n, dtype=dtype, device=dev)
                w = torch.randn(n, dtype=dtype, device=dev)
                r1 = torch.randn(rows, n, dtype=dtype, device=dev) if residual else None
                r2 = r1.clone() if residual else None
                y = jitkern.ops.rms_norm(x, w, residual=r1)
                ref = reference(x, w, residual=r2)
                tol = 2e-2 if dtype != torch.float32 else 1e-4
                err = ((y.float() - ref.float()).abs() / (ref.float().abs() + 1)).max().item()
                if residual:
                    err = max(err, ((r1.float() - r2.float()).abs() / (r2.float().abs() + 1)).max().item())
                worst = max(worst, err / tol)
                calls += 1
    if dev == "cuda":
        torch.cuda.synchronize()
    print(json.dumps({"stats": jitkern.stats(), "calls": calls, "worst_err_over_tol": worst,
                      "seconds": round(time.perf_counter() - t0, 3),
                      "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu"}))
""")


def snapshot(root: Path) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            out[str(p.relative_to(root))] = [st.st_size, st.st_mtime_ns, st.st_mode]
    return out


def env_for(cache: str, interpret: bool) -> dict:
    env = dict(os.environ, JITKERN_CACHE_DIR=cache)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return env


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--workdir", help="where layers A and B go (default: a temporary directory)")
    args = ap.parse_args()
    cpu = args.arch == "cpu"
    work = Path(args.workdir or tempfile.mkdtemp(prefix="jitkern-ro-"))
    a, b = work / "A", work / "B"
    t0 = time.perf_counter()
    pre = subprocess.run([sys.executable, "-m", "jitkern", "prebuild", "--arch", args.arch, "--op", "rms_norm",
                          "--progress", "none", "--report", str(work / "prebuild.json")],
                         env=env_for(str(a), False), capture_output=True, text=True)
    prebuild_s = time.perf_counter() - t0
    print(pre.stdout, end="")
    if pre.returncode != 0:
        print(pre.stderr, file=sys.stderr)
        return 1
    subprocess.run(["chmod", "-R", "a-w", str(a)], check=True)
    before = snapshot(a)
    run = subprocess.run([sys.executable, "-c", CHILD, "cpu" if cpu else "cuda"],
                         env=env_for(os.pathsep.join([str(b), str(a)]), cpu), capture_output=True, text=True)
    after = snapshot(a)
    subprocess.run(["chmod", "-R", "u+w", str(a)], check=True)
    if run.returncode != 0:
        print(run.stdout, run.stderr, file=sys.stderr)
        return 1
    child = json.loads(run.stdout.strip().splitlines()[-1])
    changed = sorted(set(before) ^ set(after) | {k for k in before if k in after and before[k] != after[k]})
    b_entries = sorted(str(p.relative_to(b)) for p in (b / "v1" / "entries").glob("*/*")) if b.exists() else []
    checks = {
        "zero compiles": child["stats"]["compiles"] == 0,
        "loaded from disk": child["stats"]["disk_hits"] > 0,
        "read-only layer unchanged": not changed,
        "nothing published to the writable layer": not b_entries,
        "results match the reference": child["worst_err_over_tol"] <= 1.0,
    }
    print(f"arch {args.arch} on {child['device']}: prebuild {prebuild_s:.1f} s; runtime process: {child['calls']} "
          f"calls in {child['seconds']:.2f} s")
    print(f"stats: {child['stats']}")
    for name, ok in checks.items():
        print(f"  {'ok  ' if ok else 'FAIL'} {name}")
    print(json.dumps({"arch": args.arch, "device": child["device"], "prebuild_s": round(prebuild_s, 2),
                      "child": child, "changed_in_readonly_layer": changed[:20], "entries_in_writable_layer":
                      b_entries[:20], "checks": checks, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                                              time.gmtime())}))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
