"""Benchmark ``prefill_attention`` against torch's SDPA (its fastest backend on the device) at prefill shapes.

Run on a GPU machine from the repo root::

    PYTHONPATH=$PWD python tools/bench_prefill_attention.py [--out prefill_attention.json]

Shapes: Llama-3-8B / Qwen3-8B attention (32 q heads, 8 kv heads, head dim 128), bf16, causal, q/k/v as
views of one fused QKV projection (what a decoder's prefill hands over), batches of equal sequences
(``cu_seqlens`` packed) from 1 x 512 to 16 x 2048 tokens, and one variable-length batch. The anchor is
``torch.nn.functional.scaled_dot_product_attention`` over the same sequences as [batch, heads, seq, d]
(``enable_gqa``; one call per distinct length for the variable-length batch), in the same run.
Times are ``triton.testing.do_bench`` medians; ratio = SDPA time / jitkern time (>= 1.0: jitkern is
faster). TFLOP/s counts the causal half of QK^T and PV (4 * sum(len^2) / 2 * heads * d), as a fraction of
the device's dense bf16 peak (``tools/gpu_peaks.py``). Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_peaks  # noqa: E402

HQ, HKV, D = 32, 8, 128
#: (name, sequence lengths)
CASES = [("1x512", [512]), ("1x4096", [4096]), ("8x1024", [1024] * 8), ("16x2048", [2048] * 16),
         ("varlen 8", [100, 2000, 512, 1024, 37, 3000, 768, 1500])]


def _qkv(torch, tokens: int):
    qkv = torch.randn(tokens, (HQ + 2 * HKV) * D, dtype=torch.bfloat16, device="cuda")
    q = qkv[:, : HQ * D].view(tokens, HQ, D)
    k = qkv[:, HQ * D: (HQ + HKV) * D].view(tokens, HKV, D)
    v = qkv[:, (HQ + HKV) * D:].view(tokens, HKV, D)
    return q, k, v


def _sdpa(torch, q, k, v, lens, scale):
    """SDPA per group of equal lengths, on [batch, heads, seq, d] copies made outside the timing."""
    groups, start = {}, 0
    for n in lens:
        groups.setdefault(n, []).append(start)
        start += n
    batches = []
    for n, starts in groups.items():
        qb, kb, vb = (torch.stack([z[s: s + n] for s in starts]).transpose(1, 2).contiguous() for z in (q, k, v))
        batches.append((qb, kb, vb))
    f = torch.nn.functional.scaled_dot_product_attention

    def run():
        for qb, kb, vb in batches:
            f(qb, kb, vb, is_causal=True, scale=scale, enable_gqa=True)
    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="JSON written here")
    args = ap.parse_args(argv)
    import torch
    from triton.testing import do_bench

    import jitkern

    rep = gpu_peaks.device_report(torch, do_bench, copy=False)
    peak = rep["peak"]
    scale = D ** -0.5
    rows = []
    for name, lens in CASES:
        tokens = sum(lens)
        q, k, v = _qkv(torch, tokens)
        cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device="cuda")
        out = torch.empty(tokens, HQ, D, dtype=torch.bfloat16, device="cuda")

        def jk(q=q, k=k, v=v, cu=cu, m=max(lens), out=out):
            jitkern.ops.prefill_attention(q, k, v, cu, m, scale, out=out)
        t0 = time.perf_counter()
        jk()
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        ref = _sdpa(torch, q, k, v, lens, scale)
        # correctness against SDPA on the first sequence
        n0 = lens[0]
        want = torch.nn.functional.scaled_dot_product_attention(
            q[:n0].transpose(0, 1)[None], k[:n0].transpose(0, 1)[None], v[:n0].transpose(0, 1)[None],
            is_causal=True, scale=scale, enable_gqa=True)[0].transpose(0, 1)
        err = float((out[:n0].float() - want.float()).abs().max())
        jk_ms = do_bench(jk, warmup=10, rep=100, return_mode="median")
        ref_ms = do_bench(ref, warmup=10, rep=100, return_mode="median")
        flops = 2 * sum(n * n for n in lens) * HQ * D  # 4 * len^2 / 2 (causal) per head
        row = {"case": name, "tokens": tokens, "jitkern_ms": jk_ms, "sdpa_ms": ref_ms, "ratio": ref_ms / jk_ms,
               "jitkern_tflops": flops / jk_ms / 1e9, "sdpa_tflops": flops / ref_ms / 1e9,
               "frac_of_peak": gpu_peaks.frac(flops / jk_ms * 1e3, peak, "bf16_flop_per_s"),
               "max_abs_err_vs_sdpa": err, "first_call_s": first}
        rows.append(row)
        print(f"{name:>9} {tokens:6d} tok  jitkern {jk_ms * 1e3:8.1f} us {row['jitkern_tflops']:6.1f} TF/s  "
              f"SDPA {ref_ms * 1e3:8.1f} us {row['sdpa_tflops']:6.1f} TF/s  ratio {row['ratio']:.2f}  "
              f"err {err:.3g}", flush=True)
    print(gpu_peaks.describe(rep))
    doc = {"date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), **rep, "torch": torch.__version__,
           "heads": [HQ, HKV, D], "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
