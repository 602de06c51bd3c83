"""GPU correctness check of the three foundation ops at realistic sizes against their PyTorch references.

Run on a GPU machine from the repo root::

    PYTHONPATH=$PWD python tools/check_ops_gpu.py [--out ops_gpu.json]

Sizes (issue 2): gemm 4096x4096x4096 bf16; rms_norm 8192x4096 bf16 (with and without the fused
residual); qk_norm_rope 4096 tokens, 32 q heads, 8 kv heads, head dim 128, bf16, both rope styles.
Each op runs in a fresh cache (compile + load), is compared with its reference computed in fp32, and
the run is repeated in a second process to show it loads from the cache without compiling.
Prints one JSON document and a table; exits non-zero if any check fails.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time


def run_checks() -> list[dict]:
    import torch

    import jitkern
    from jitkern.library.qk_norm_rope import cos_sin_table

    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    results = []

    def record(name, out, ref, atol, rtol, seconds):
        err = (out.float() - ref.float()).abs()
        ok = bool(torch.allclose(out.float(), ref.float(), atol=atol, rtol=rtol))
        results.append({"check": name, "ok": ok, "max_abs_err": err.max().item(), "mean_abs_err": err.mean().item(),
                        "atol": atol, "rtol": rtol, "first_call_s": round(seconds, 3)})

    def timed(fn):
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        return out, time.perf_counter() - t

    # gemm 4096^3 bf16
    a = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16, generator=g)
    b = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16, generator=g)
    out, dt = timed(lambda: jitkern.ops.gemm(a, b))
    ref = a.float() @ b.float()
    # bf16 output of a 4096-long fp32 dot product: about 3 significant digits of |ref| (~64)
    record("gemm 4096x4096x4096 bf16", out, ref, atol=0.5, rtol=2e-2, seconds=dt)

    # rms_norm 8192x4096 bf16
    x = torch.randn(8192, 4096, device=dev, dtype=torch.bfloat16, generator=g)
    w = torch.randn(4096, device=dev, dtype=torch.bfloat16, generator=g)
    spec = jitkern.get_op("rms_norm")
    out, dt = timed(lambda: jitkern.ops.rms_norm(x, w))
    record("rms_norm 8192x4096 bf16", out, spec.reference(x, w), atol=3e-2, rtol=2e-2, seconds=dt)
    r = torch.randn_like(x)
    r_ref = r.clone()
    out, dt = timed(lambda: jitkern.ops.rms_norm(x, w, residual=r))
    ref = spec.reference(x, w, residual=r_ref)
    record("rms_norm+residual 8192x4096 bf16 (out)", out, ref, atol=3e-2, rtol=2e-2, seconds=dt)
    record("rms_norm+residual 8192x4096 bf16 (residual)", r, r_ref, atol=1e-2, rtol=1e-2, seconds=0.0)

    # qk_norm_rope 4096 tokens, 32/8 heads, head dim 128
    t, hq, hkv, d = 4096, 32, 8, 128
    spec = jitkern.get_op("qk_norm_rope")
    table = cos_sin_table(8192, d, device=dev)
    for neox in (True, False):
        qkv = torch.randn(t, (hq + 2 * hkv) * d, device=dev, dtype=torch.bfloat16, generator=g)
        qw = torch.randn(d, device=dev, dtype=torch.bfloat16, generator=g)
        kw = torch.randn(d, device=dev, dtype=torch.bfloat16, generator=g)
        pos = torch.randint(0, 8192, (t,), device=dev, generator=g)
        want = spec.reference(qkv.clone(), qw, kw, table, pos, hq, hkv, d, is_neox=neox)
        out, dt = timed(lambda: jitkern.ops.qk_norm_rope(qkv, qw, kw, table, pos, hq, hkv, d, is_neox=neox))
        record(f"qk_norm_rope 4096 tok 32/8 heads d128 bf16 {'neox' if neox else 'gptj'}", out, want,
               atol=6e-2, rtol=2e-2, seconds=dt)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)
    if args.child:  # one measured process: print results and counters as JSON
        import jitkern

        res = run_checks()
        print(json.dumps({"results": res, "counters": jitkern.stats()}))
        return 0

    import torch

    cache = tempfile.mkdtemp(prefix="jitkern-check-")
    env = {**os.environ, "JITKERN_CACHE_DIR": cache}
    runs = []
    for label in ("cold", "warm"):
        p = subprocess.run([sys.executable, __file__, "--child"], env=env, capture_output=True, text=True)
        if p.returncode != 0:
            print(p.stderr, file=sys.stderr)
            return 1
        runs.append({"process": label, **json.loads(p.stdout.strip().splitlines()[-1])})
    doc = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "runs": runs,
    }
    print(json.dumps(doc, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
    print(f"\n{'process':7} {'check':52} {'ok':5} {'max_abs_err':>12} {'first_call_s':>12}")
    for run in runs:
        for r in run["results"]:
            print(f"{run['process']:7} {r['check']:52} {str(r['ok']):5} {r['max_abs_err']:12.4g} {r['first_call_s']:12.3f}")
        print(f"{run['process']:7} counters: {run['counters']}")
    ok = all(r["ok"] for run in runs for r in run["results"]) and runs[1]["counters"]["compiles"] == 0
    print("ALL OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
