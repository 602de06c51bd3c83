#!/usr/bin/env python3
"""Throughput of ``jitkern.ops.gemm`` against ``torch.matmul`` (cuBLAS) in the same run, plus a
correctness check of both against an fp32 reference.

    python tools/bench_gemm.py [--shapes 4096x4096x4096,1x4096x4096,...] [--dtype bf16] [--out bench.json]

For each shape and B layout (row-major [K, N], and ``w.t()`` of a row-major weight [N, K]) it
times both with ``triton.testing.do_bench`` (median of repeated launches, L2 flushed between
runs), alternating jitkern and torch ``--rounds`` times and keeping each one's best median, then
prints TFLOP/s and the ratio torch time / jitkern time (1.0 = as fast as cuBLAS), the fraction of
the device's dense bf16 peak (``tools/gpu_peaks.py``, keyed by the device name; a device copy measured
in the same run is printed beside the bandwidth peak), and the time of the same kernel launched
through Triton's own JIT (``tools/jit_twin.py``; jit/jk > 1 means jitkern's launch is faster). The
configuration gemm chose (tuned record, shipped table or candidate order) is printed with each row.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_peaks  # noqa: E402
import jit_twin  # noqa: E402
import tune_gemm  # noqa: E402

DEFAULT_SHAPES = ("4096x4096x4096,1x4096x4096,16x4096x4096,64x4096x4096,128x4096x4096,"
                  "1x8192x8192,16x8192x8192,64x8192x8192,128x8192x8192")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=DEFAULT_SHAPES)
    p.add_argument("--dtype", default="bf16", help="bf16, fp16 or both (bf16,fp16)")
    p.add_argument("--layouts", default="kn,nk", help="kn: B row-major [K, N]; nk: B = w.t(), w [N, K] (default both)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rep", type=int, default=300, help="do_bench repeat time per measurement, ms")
    p.add_argument("--out", metavar="FILE")
    args = p.parse_args(argv)

    import torch
    from triton.testing import do_bench

    import jitkern
    from jitkern import tuning
    from jitkern.library import gemm

    dev = torch.device("cuda")
    gpu = gpu_peaks.device_report(torch, do_bench)
    print(gpu_peaks.describe(gpu))
    peak = gpu["peak"]
    rows, results = [], []
    for dname, m, n, k, layout in [(d_, *s_, lay) for d_ in args.dtype.split(",")
                                   for s_ in tuning.parse_shapes(args.shapes) for lay in args.layouts.split(",")]:
        dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[dname]
        torch.manual_seed(0)
        a = torch.randn(m, k, device=dev, dtype=dt)
        b = torch.randn(k, n, device=dev, dtype=dt) if layout == "kn" else torch.randn(n, k, device=dev, dtype=dt).t()
        t0 = time.perf_counter()
        c = jitkern.ops.gemm(a, b)
        torch.cuda.synchronize()
        first_ms = (time.perf_counter() - t0) * 1e3
        ref = a.float() @ b.float()
        c_torch = torch.matmul(a, b)
        scale = ref.abs().max().item()
        err = (c.float() - ref).abs().max().item()
        err_torch = (c_torch.float() - ref).abs().max().item()
        ok = err <= max(2 * err_torch, 1e-2 * scale)
        out = torch.empty_like(c)
        jk_ms, th_ms = float("inf"), float("inf")
        for _ in range(args.rounds):
            jk_ms = min(jk_ms, do_bench(lambda: jitkern.ops.gemm(a, b, out=out), warmup=25, rep=args.rep,
                                        return_mode="median"))
            th_ms = min(th_ms, do_bench(lambda: torch.matmul(a, b, out=out), warmup=25, rep=args.rep,
                                        return_mode="median"))
        flop = 2 * m * n * k
        try:
            tw = jit_twin.compare(lambda: jitkern.ops.gemm(a, b, out=out), do_bench, warmup=25, rep=args.rep,
                                  return_mode="median")
        except Exception as e:  # the comparison must not hide the main figures
            tw = {"twin_error": f"{type(e).__name__}: {str(e)[:200]}"}
        route = jitkern.dispatcher(gemm.SPEC).route_for(a, b, out)
        chosen = route.active_candidate if route is not None else None
        cfg = chosen.launches[0].config.p if chosen is not None else {}
        tile = tune_gemm.tile_text(cfg) if cfg else "?"
        rec = {"m": m, "n": n, "k": k, "layout": layout, "dtype": dname, "jitkern_ms": jk_ms,
               "torch_ms": th_ms, "jitkern_tflops": flop / jk_ms / 1e9, "torch_tflops": flop / th_ms / 1e9,
               "ratio": th_ms / jk_ms, "max_abs_err": err, "torch_max_abs_err": err_torch, "ref_max": scale,
               "correct": ok, "config": cfg, "first_call_ms": first_ms, "triton_jit": tw,
               "jitkern_frac_of_bf16_peak": gpu_peaks.frac(flop / jk_ms * 1e3, peak, "bf16_flop_per_s"),
               "torch_frac_of_bf16_peak": gpu_peaks.frac(flop / th_ms * 1e3, peak, "bf16_flop_per_s")}
        results.append(rec)
        fr = rec["jitkern_frac_of_bf16_peak"]
        jit_x = f"{tw['jit_over_jitkern']:.3f}" if "jit_over_jitkern" in tw else "-"
        rows.append([dname, f"{m}x{n}x{k}", layout, tile, f"{jk_ms * 1e3:.1f}", f"{th_ms * 1e3:.1f}",
                     f"{rec['jitkern_tflops']:.1f}", f"{rec['torch_tflops']:.1f}", f"{rec['ratio']:.3f}",
                     f"{fr * 100:.0f}%" if fr is not None else "-", jit_x,
                     f"{err:.3g}/{err_torch:.3g}", "ok" if ok else "WRONG"])
    header = ["dtype", "MxNxK", "B", "config", "jitkern us", "torch us", "jk TF/s", "torch TF/s", "ratio",
              "jk/peak", "jit/jk", "err jk/torch", "check"]
    cells = [header] + rows
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for j, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))
    print(gpu_peaks.describe(gpu))
    doc = {"device": torch.cuda.get_device_name(), "gpu": gpu, "torch": torch.__version__,
           "triton": __import__("triton").__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "results": results, "stats": jitkern.stats()}
    text = json.dumps(doc, indent=1, default=str)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0 if all(r["correct"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
