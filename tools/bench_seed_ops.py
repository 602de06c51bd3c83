"""Benchmark the seeds' ops (issue 7) against their eager PyTorch references at decode shapes.

Run on a GPU machine from the repo root::

    PYTHONPATH=$PWD python tools/bench_seed_ops.py --out seed_ops_bench.json

Shapes (realistic decode):
  paged_attention_decode  Llama-3-8B attention (32 q heads, 8 kv heads, head dim 128, page 16), bf16,
                          batch 32-256, every sequence at context 2K-32K
  gather_kv_cache         DeepSeek MLA latent cache (entry 576 bf16, page 64) and an 8x128 KV cache,
                          batch 32-128, context 2K-8K
  moe_gemm_stage1         DeepSeek-V3 at TP8: 256 experts, top 8, hidden 7168 -> 2x256, 32-256 tokens;
                          and its stage 2 (activation "none", topk 1 over the pairs' rows): 256 -> 7168
  paged_mqa_logits        DeepSeek-V3.2 indexer: 64 heads, head dim 128, page 64, next_n 1-2,
                          batch 32-128, context == max_model_len 8K-32K

Times are ``triton.testing.do_bench`` medians (L2 flushed between runs) of the op as users call it
(validation, contract allocation and launches included) and of the eager PyTorch reference in the
same run (the anchor). ratio = reference time / jitkern time (>= 1.0 means jitkern is faster).
Bandwidth counts the bytes each op must move at least once (inputs read, outputs written), divided
by the jitkern time, as a fraction of the device's datasheet HBM peak (``tools/gpu_peaks.py``, keyed
by the device name; 3.35 TB/s on an H100 SXM, 4.8 TB/s on an H200). A device-to-device copy of 1 GiB
in the same run is printed beside the peak as the achievable-bandwidth anchor, and each shape is
judged against a copy moving its own bytes (``gpu_peaks.floor_row``: the 80% floor applies where
that copy reaches it; either way the op's share of that copy is printed). Each op's kernels are
also replayed through Triton's own JIT from the same rendered source (``tools/jit_twin.py``): the
``jit`` column is that time over jitkern's (>= 1.0: jitkern's launch is no slower).
Prints a table and writes JSON.

``--sweep`` times tile settings through the ops' ``JITKERN_<OP>_<PARAM>`` overrides instead
(``--sweep-ops pa,moe,mqa,gkv``) and writes them as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_peaks  # noqa: E402
import jit_twin  # noqa: E402


def paged_decode_inputs(torch, dev, bsz: int, ctx: int, hq: int, hkv: int, d: int, page: int):
    """Random bf16 decode inputs over a paged KV cache: q, k_cache, v_cache, block table, lengths
    (every sequence ``ctx`` tokens long, in ``cdiv(ctx, page)`` pages)."""
    nblk = -(-ctx // page)
    k = torch.randn(bsz * nblk, page, hkv, d, dtype=torch.bfloat16, device=dev)
    v = torch.randn_like(k)
    bt = torch.randperm(bsz * nblk, device=dev).int().view(bsz, nblk)
    lens = torch.full((bsz,), ctx, dtype=torch.int32, device=dev)
    q = torch.randn(bsz, hq, d, dtype=torch.bfloat16, device=dev)
    return q, k, v, bt, lens


#: paged_mqa_logits benchmark shapes: (batch, next_n, context = max_model_len); heads 64, head_dim 128, page 64
MQA_SHAPES = [(32, 1, 8192), (64, 2, 8192), (128, 1, 16384), (32, 2, 32768)]


def mqa_inputs(torch, dev, bsz: int, nn: int, ctx: int, h: int = 64, d: int = 128, pg: int = 64):
    """Random paged_mqa_logits inputs at full context: ``(q, kv_cache, weights, context_lens,
    block_tables, bytes moved)``."""
    nblk = ctx // pg
    kv = torch.randn(bsz * nblk, pg, d, dtype=torch.bfloat16, device=dev)
    bt = torch.randperm(bsz * nblk, device=dev).int().view(bsz, nblk)
    lens = torch.full((bsz,), ctx, dtype=torch.int32, device=dev)
    q = torch.randn(bsz, nn, h, d, dtype=torch.bfloat16, device=dev)
    wt = torch.rand(bsz * nn, h, device=dev)
    return q, kv, wt, lens, bt, kv.numel() * 2 + bsz * nn * ctx * 4 + q.numel() * 2


#: gather_kv_cache benchmark shapes: (batch, context, page size, entry elements)
GKV_SHAPES = [(32, 4096, 64, 576), (128, 2048, 64, 576), (64, 8192, 16, 1024)]


def gkv_inputs(torch, dev, bsz: int, ctx: int, pg: int, e: int):
    """Random gather_kv_cache inputs, each sequence between half and all of ``ctx`` long: ``(kv_cache,
    block_table, cu_seq_lens, tokens)`` (on ``meta``, tokens is 3/4 of the capacity)."""
    nblk = ctx // pg
    cache = torch.randn(bsz * nblk, pg, e, dtype=torch.bfloat16, device=dev)
    bt = torch.randperm(bsz * nblk, device=dev).int().view(bsz, nblk)
    lens = torch.randint(ctx // 2, ctx + 1, (bsz,), device=dev)
    cu = torch.zeros(bsz + 1, dtype=torch.int32, device=dev)
    cu[1:] = torch.cumsum(lens, 0)
    return cache, bt, cu, (int(cu[-1]) if dev != "meta" else bsz * ctx * 3 // 4)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="seed_ops_bench.json")
    ap.add_argument("--quick", action="store_true", help="one shape per op")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--sweep", action="store_true",
                    help="instead: time tile settings of the ops named by --sweep-ops "
                         "(through their JITKERN_<OP>_<PARAM> overrides) and write them as JSON")
    ap.add_argument("--sweep-ops", default="pa,moe", help="pa, moe, mqa, gkv (comma separated)")
    ap.add_argument("--ops", default="pa,gkv,moe,mqa", help="which ops to benchmark (default all)")
    args = ap.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.pop("JITKERN_DEBUG", None)
    os.environ["JITKERN_CACHE_DIR"] = args.cache_dir or os.environ.get("JITKERN_CACHE_DIR") or tempfile.mkdtemp(
        prefix="jitkern-seed-bench-")

    import torch
    from triton.testing import do_bench

    from jitkern.library import gather_kv_cache as gkv
    from jitkern.library import moe_gemm_stage1 as moe
    from jitkern.library import paged_attention_decode as pa
    from jitkern.library import paged_mqa_logits as mqa

    dev = "cuda"
    torch.manual_seed(0)
    rows = []
    if args.sweep:
        return sweep(args, torch, do_bench, pa, moe, mqa, gkv)
    ops = set(args.ops.split(","))
    gpu = gpu_peaks.device_report(torch, do_bench)
    print(gpu_peaks.describe(gpu))
    peak = gpu["peak"]
    PEAK = peak["hbm_bytes_per_s"] if peak else gpu["copy_bytes_per_s"]

    def bench(op, shape, nbytes, fn, ref, check):
        t0 = time.perf_counter()
        y = fn()
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        err = check(y, ref())
        t_jk = do_bench(fn, warmup=25, rep=100, return_mode="median")
        t_ref = do_bench(ref, warmup=5, rep=100, return_mode="median")
        try:
            tw = jit_twin.compare(fn, do_bench, warmup=25, rep=100, return_mode="median")
        except Exception as e:  # the comparison must not hide the main figures
            tw = {"twin_error": f"{type(e).__name__}: {str(e)[:200]}"}
        same_copy = gpu_peaks.same_bytes_copy(torch, do_bench, nbytes)
        rows.append({"op": op, "shape": shape, "jitkern_ms": t_jk, "reference_ms": t_ref, "ratio": t_ref / t_jk,
                     "bytes": nbytes, "bandwidth_TBps": nbytes / t_jk / 1e9, "frac_peak": nbytes / t_jk / 1e9 / PEAK * 1e12,
                     "frac_copy": nbytes / t_jk / 1e9 / gpu["copy_bytes_per_s"] * 1e12,
                     "same_bytes_copy_TBps": same_copy / 1e12,
                     "floor": gpu_peaks.floor_row(nbytes / t_jk * 1e3, same_copy, peak),
                     "max_abs_err": err, "first_call_s": first, "triton_jit": tw,
                     "config": [k.job.config.describe() for k in jit_twin._loaded_kernels()
                                if k.job.spec.name == op][-2:]})
        r = rows[-1]
        jit = f"jit/jk {tw['jit_over_jitkern']:.3f}" if "jit_over_jitkern" in tw else "jit -"
        print(f"{op:24s} {shape:44s} jk {t_jk:8.3f} ms  ref {t_ref:9.3f} ms  x{r['ratio']:7.2f}  "
              f"{r['bandwidth_TBps']:5.2f} TB/s ({gpu_peaks.describe_floor(r['floor'])})  "
              f"{jit}  err {err:.2e}", flush=True)

    def close(y, r):
        return float((y.float() - r.float()).abs().nan_to_num(posinf=0, neginf=0).max())

    copy_bw = gpu["copy_bytes_per_s"] / 1e12

    # ---- paged_attention_decode --------------------------------------------------------------------
    hq, hkv, d, page = 32, 8, 128, 16
    pa_shapes = [(32, 2048), (64, 8192), (256, 2048), (32, 32768), (128, 4096)]
    for bsz, ctx in (pa_shapes[:1] if args.quick else pa_shapes) if "pa" in ops else ():
        q, k, v, bt, lens = paged_decode_inputs(torch, dev, bsz, ctx, hq, hkv, d, page)
        nbytes = 2 * k.numel() * 2 + 2 * q.numel() * 2 + bt.numel() * 4
        bench("paged_attention_decode", f"b={bsz} ctx={ctx} h={hq}/{hkv} d={d}", nbytes,
              lambda q=q, k=k, v=v, bt=bt, lens=lens: pa.paged_attention_decode(q, k, v, bt, lens,
                                                                                 max_context_len=131072),
              lambda q=q, k=k, v=v, bt=bt, lens=lens: pa.reference(q, k, v, bt, lens), close)
        del k, v
        torch.cuda.empty_cache()

    # ---- gather_kv_cache ---------------------------------------------------------------------------
    for bsz, ctx, pg, e in (GKV_SHAPES[:1] if args.quick else GKV_SHAPES) if "gkv" in ops else ():
        cache, bt, cu, total = gkv_inputs(torch, dev, bsz, ctx, pg, e)
        nbytes = 2 * total * e * 2
        bench("gather_kv_cache", f"b={bsz} ctx<={ctx} page={pg} entry={e}", nbytes,
              lambda cache=cache, bt=bt, cu=cu, total=total: gkv.gather_kv_cache(cache, bt, cu, num_tokens=total),
              lambda cache=cache, bt=bt, cu=cu, total=total: gkv.reference(cache, bt, cu, num_tokens=total),
              lambda y, r: close(y, r))
        del cache
        torch.cuda.empty_cache()

    # ---- moe_gemm_stage1 ---------------------------------------------------------------------------
    experts, topk, hidden, n = 256, 8, 7168, 256
    w = torch.randn(experts, 2 * n, hidden, dtype=torch.bfloat16, device=dev) / 64
    w2 = torch.randn(experts, hidden, n, dtype=torch.bfloat16, device=dev) / 16
    for t in ((64,) if args.quick else (32, 64, 128, 256)) if "moe" in ops else ():
        x = torch.randn(t, hidden, dtype=torch.bfloat16, device=dev)
        tid = torch.stack([torch.randperm(experts, device=dev)[:topk] for _ in range(t)]).int()
        ids, eids, npad = moe.moe_align(tid, experts, 16)
        used = int(torch.unique(tid).numel())
        nbytes = used * 2 * n * hidden * 2 + x.numel() * 2 + t * topk * n * 2
        bench("moe_gemm_stage1", f"tokens={t} E={experts} top{topk} {hidden}->2x{n} ({used} hit)", nbytes,
              lambda x=x, w=w, ids=ids, eids=eids, npad=npad: moe.moe_gemm_stage1(x, w, ids, eids, npad, topk),
              lambda x=x, w=w, ids=ids, eids=eids, npad=npad: moe.reference(x, w, ids, eids, npad, topk), close)
        # stage 2: the plain grouped GEMM of each pair's row against its expert's w2 [hidden, n]
        h = moe.reference(x, w, ids, eids, npad, topk)
        nbytes = used * hidden * n * 2 + h.numel() * 2 + t * topk * hidden * 2
        bench("moe_gemm_stage1", f"stage2 tokens={t} E={experts} top{topk} {n}->{hidden} ({used} hit)", nbytes,
              lambda h=h, ids=ids, eids=eids, npad=npad: moe.moe_gemm_stage1(h, w2, ids, eids, npad, 1, "none"),
              lambda h=h, ids=ids, eids=eids, npad=npad: moe.reference(h, w2, ids, eids, npad, 1, "none"), close)
    del w, w2
    torch.cuda.empty_cache()

    # ---- paged_mqa_logits --------------------------------------------------------------------------
    for bsz, nn, ctx in (MQA_SHAPES[:1] if args.quick else MQA_SHAPES) if "mqa" in ops else ():
        q, kv, wt, lens, bt, nbytes = mqa_inputs(torch, dev, bsz, nn, ctx)
        bench("paged_mqa_logits", f"b={bsz} next_n={nn} ctx=max_len={ctx} h=64 d=128", nbytes,
              lambda q=q, kv=kv, wt=wt, lens=lens, bt=bt, ctx=ctx: mqa.paged_mqa_logits(q, kv, wt, lens, bt, ctx),
              lambda q=q, kv=kv, wt=wt, lens=lens, bt=bt, ctx=ctx: mqa.reference(q, kv, wt, lens, bt, ctx), close)
        del kv
        torch.cuda.empty_cache()

    print(gpu_peaks.describe(gpu))
    report = {"device": torch.cuda.get_device_name(), "gpu": gpu, "torch": torch.__version__,
              "triton": __import__("triton").__version__, "date_utc": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
              "peak_TBps": PEAK / 1e12, "peak_from": "datasheet" if peak else "measured copy",
              "anchor_copy_TBps": copy_bw, "rows": rows,
              "min_ratio": min(r["ratio"] for r in rows)}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({"min_ratio": report["min_ratio"], "out": args.out}))
    return 0


def sweep(args, torch, do_bench, pa, moe, mqa, gkv) -> int:
    import itertools

    import jitkern

    dev = "cuda"
    sops = set(args.sweep_ops.split(","))
    out = {"device": torch.cuda.get_device_name(), "date_utc": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime())}

    def timed(fn):
        try:
            fn()
            torch.cuda.synchronize()
            return do_bench(fn, warmup=10, rep=40, return_mode="median")
        except Exception as e:  # a tile that does not fit: record and go on
            return f"{type(e).__name__}: {str(e)[:120]}"

    def with_env(prefix, params):
        for k in [k for k in os.environ if k.startswith(prefix)]:
            del os.environ[k]
        for k, v in params.items():
            os.environ[f"{prefix}{k.upper()}"] = str(v)
        jitkern.reset()  # tiles are chosen once per call signature: decide every signature again

    def run_grid(name, prefix, grid, cases):
        out[name] = []
        for params in grid:
            with_env(prefix, params)
            rec = dict(params)
            for label, fn, nbytes in cases:
                t = timed(fn)
                rec[label] = t
                rec[label + " TB/s"] = nbytes / t / 1e9 if isinstance(t, float) else None
            out[name].append(rec)
            print(name, json.dumps(rec), flush=True)
            with open(args.out, "w") as f:  # as it goes: a run cut short keeps what it measured
                json.dump(out, f, indent=1)
        with_env(prefix, {})

    if "pa" in sops:
        hq, hkv, d, page = 32, 8, 128, 16
        cases = []
        for bsz, ctx in ((32, 2048), (64, 8192), (32, 32768)):
            q, k, v, bt, lens = paged_decode_inputs(torch, dev, bsz, ctx, hq, hkv, d, page)
            cases.append((f"b={bsz} ctx={ctx}", (lambda q=q, k=k, v=v, bt=bt, lens=lens:
                                                 pa.paged_attention_decode(q, k, v, bt, lens)), 2 * k.numel() * 2))
        # first H200 sweep (2026-12-01): partition 256/512/1024 x block_n 32/64 x 4/8 warps x 2/3 stages;
        # partition 1024, block_n 64, 4 warps won everywhere: this grid explores around it
        grid = [dict(partition=part, block_n=bn, num_warps=4, num_stages=ns) for part, bn, ns in
                itertools.product((1024, 2048), (64, 128), (2, 3))]
        run_grid("paged_attention_decode", "JITKERN_PAGED_ATTENTION_DECODE_", grid, cases)
        del cases

    if "mqa" in sops:
        cases = []
        for bsz, nn, ctx in ((32, 1, 8192), (64, 2, 8192), (32, 2, 32768)):
            q, kv, wt, lens, bt, nbytes = mqa_inputs(torch, dev, bsz, nn, ctx)
            cases.append((f"b={bsz} n={nn} ctx={ctx}", (lambda q=q, kv=kv, wt=wt, lens=lens, bt=bt, ctx=ctx:
                                                       mqa.paged_mqa_logits(q, kv, wt, lens, bt, ctx)), nbytes))
        # first H200 sweep: block_t 64/128 x span 1/4/8 x 4/8 warps x 2/3 stages (128 x 8, 4 warps won)
        grid = [dict(block_t=bt_, span=sp, num_warps=nw, num_stages=ns) for bt_, sp, nw, ns in
                itertools.product((64, 128), (4, 8, 16), (4, 8), (2, 3)) if bt_ == 128 or (nw == 4 and ns == 3)]
        run_grid("paged_mqa_logits", "JITKERN_PAGED_MQA_LOGITS_", grid, cases)
        del cases

    if "gkv" in sops:
        cases = []
        for bsz, ctx, pg, e in GKV_SHAPES:
            cache, bt, cu, total = gkv_inputs(torch, dev, bsz, ctx, pg, e)
            cases.append((f"b={bsz} ctx={ctx} e={e}", (lambda cache=cache, bt=bt, cu=cu, total=total:
                                                      gkv.gather_kv_cache(cache, bt, cu, num_tokens=total)),
                          2 * total * e * 2))
        # first H200 sweep: block_t 16/32/64 x block_e 256/1024 x 4/8 warps x max_splits 64/256 (per-token
        # kernel); contiguous caches now copy page runs of block_t x block_e elements per step
        grid = [dict(block_t=bt_, block_e=be, num_warps=nw, max_splits=256) for bt_, be, nw in
                itertools.product((8, 16, 32), (256, 1024), (4, 8))]
        run_grid("gather_kv_cache", "JITKERN_GATHER_KV_CACHE_", grid, cases)
        del cases

    if "moe" in sops:
        experts, topk, hidden, n = 256, 8, 7168, 256
        w = torch.randn(experts, 2 * n, hidden, dtype=torch.bfloat16, device=dev) / 64
        x = torch.randn(64, hidden, dtype=torch.bfloat16, device=dev)
        tid = torch.stack([torch.randperm(experts, device=dev)[:topk] for _ in range(64)]).int()
        ids, eids, npad = moe.moe_align(tid, experts, 16)
        nbytes = int(torch.unique(tid).numel()) * 2 * n * hidden * 2
        grid = [dict(block_n=bn, block_k=bk, num_warps=4, num_stages=ns) for bn, bk, ns in
                itertools.product((32, 64, 128), (64, 128), (3, 4))]
        grid += [dict(block_n=128, block_k=bk, num_warps=8, num_stages=ns) for bk, ns in itertools.product((64, 128), (3, 4))]
        out["moe_gemm_stage1"] = []
        for params in grid:
            with_env("JITKERN_MOE_GEMM_STAGE1_", params)
            for split in (1, 2, 4):
                t = timed(lambda: moe.moe_gemm_stage1(x, w, ids, eids, npad, topk, split_k=split))
                rec = {**params, "split_k": split, "ms": t, "TB/s": nbytes / t / 1e9 if isinstance(t, float) else None}
                out["moe_gemm_stage1"].append(rec)
                print("moe", json.dumps(rec), flush=True)
        with_env("JITKERN_MOE_GEMM_STAGE1_", {})
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
