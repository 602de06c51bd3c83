"""Sweep the memory-bound ops' tiles and variants on one GPU (issue 19, must-have 2), then ship the winners.

On the GPU machine, from the repo root (one command, about 1-2 minutes; builds first, in parallel)::

    PYTHONPATH=$PWD python3 tools/sweep_membw.py --out DIR            (all ops: pa,mqa,gkv,qnr)
    PYTHONPATH=$PWD python3 tools/sweep_membw.py --out DIR --ops mqa   (one op)

Afterwards, anywhere (no GPU)::

    PYTHONPATH=$PWD python3 tools/sweep_membw.py --apply DIR/membw_sweep.json      (writes jitkern/tuned/sm_90.json)

For every op, every tile of its grid (the op's ``JITKERN_<OP>_<PARAM>`` overrides) is timed at every
benchmark shape of ``tools/bench_seed_ops.py`` / ``tools/check_qk_norm_rope_gpu.py`` (same shapes,
same byte counts: inputs read and outputs written once), as the op is called (validation and launch
included; ``triton.testing.do_bench`` medians, L2 flushed between runs). Prints, per op, each
shape's best tile and its fraction of the device's HBM peak (``tools/gpu_peaks.py``), and the
overall winner: the tile whose worst shape is the closest to that shape's best (least
max(time / best time)). Writes ``DIR/membw_sweep.json`` as it goes (a run cut short keeps what it
timed) and ``DIR/membw_summary.json`` at the end.

Every configuration of the sweep is built before anything is timed, by jitkern's prebuild workers
(one per core) into ``JITKERN_CACHE_DIR`` (default: a fresh temporary folder): the timing loop only
loads. ``--apply`` puts each op's overall winner into the shipped table under bucket ``default``
(both 16-bit dtypes: the sweeps are bf16, fp16 moves the same bytes), where the ops' plans look it
up first (``jitkern.tuning``), so ``prebuild`` and every call use it.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

#: env prefix of each op's tile overrides
PREFIX = {"paged_attention_decode": "JITKERN_PAGED_ATTENTION_DECODE_", "paged_mqa_logits": "JITKERN_PAGED_MQA_LOGITS_",
          "gather_kv_cache": "JITKERN_GATHER_KV_CACHE_", "qk_norm_rope": "JITKERN_QK_NORM_ROPE_",
          "moe_gemm_stage1": "JITKERN_MOE_GEMM_STAGE1_"}
SHORT = {"pa": "paged_attention_decode", "mqa": "paged_mqa_logits", "gkv": "gather_kv_cache", "qnr": "qk_norm_rope",
         "moe": "moe_gemm_stage1"}
BUCKET = "default"  # the bucket the ops look up in jitkern/tuned/<arch>.json
#: per op, the shipped-table bucket of each case (ops whose plan looks up per-shape buckets)
CASE_BUCKETS: dict[str, list[str]] = {}


# ---- grids: what is timed (every tile must pass the op's TUNABLES and the sm_90 rules) -------------
def grids() -> dict[str, list[dict]]:
    """Round 4 (after tools/results/issue19_h200_2026-12-02_membw_sweep3.json, whose winners are shipped):
    the shipped tiles and their neighbours for a second reading, and paged_mqa_logits' merge=3 (queries
    along the dot's M, keys along N)."""
    pa = [dict(partition=2048, block_n=bn, num_warps=4, num_stages=ns, head_major=1)
          for bn, ns in ((128, 3), (128, 2), (64, 2), (64, 3))]
    # for the short bucket (capacity <= 512: one partition, a few pages per program): how many programs
    # share an SM (block_n, stages, warps), and split partitions for small batches
    pa += [dict(partition=2048, block_n=bn, num_warps=nw, num_stages=ns, head_major=hm)
           for bn, ns, nw, hm in itertools.product((16, 32, 64, 128), (1, 2, 3), (2, 4), (0, 1))
           if (bn, ns, nw, hm) not in ((128, 3, 4, 1), (128, 2, 4, 1), (64, 2, 4, 1), (64, 3, 4, 1))]
    pa += [dict(partition=64, block_n=bn, num_warps=4, num_stages=2, head_major=1) for bn in (32, 64)]
    mqa = [dict(block_t=64, span=8, num_warps=4, num_stages=2, kv_load=1, merge=2),  # n1s
           dict(block_t=128, span=16, num_warps=8, num_stages=2, merge=0),  # n2s
           dict(block_t=64, span=32, num_warps=4, num_stages=2, kv_load=1, merge=0),  # n1l
           dict(block_t=128, span=32, num_warps=8, num_stages=3, merge=2),  # n2l
           dict(block_t=128, span=8, num_warps=4, num_stages=2, merge=0)]  # default
    mqa += [dict(block_t=bt, span=sp, num_warps=nw, num_stages=ns, merge=3)
            for bt, sp, nw, ns in itertools.product((128, 256), (4, 8, 16, 32), (4, 8), (2, 3))]
    mqa += [dict(block_t=64, span=sp, num_warps=4, num_stages=ns, kv_load=1, merge=3)
            for sp, ns in itertools.product((4, 8, 16, 32), (2, 3))]
    gkv = [dict(block_t=8, block_e=256, num_warps=nw, max_splits=ms) for nw, ms in itertools.product((4, 8), (256, 1024))]
    qnr = [dict(variant="triton", tile=512, num_warps=nw) for nw in (2, 4)]
    qnr += [dict(variant="cuda", cuda_tok=0), dict(variant="cuda", cuda_tok=1, cuda_warps=4),
            dict(variant="cuda", cuda_tok=1, cuda_warps=2)]
    # moe_gemm_stage1 at decode sizes streams its experts' weights: block_m is the sorting block's (each
    # case's), so a tile here is the rest; each bucket (sorting block, gated or plain) ships its own winner
    moe = [dict(block_n=bn, block_k=bk, num_warps=nw, num_stages=ns)
           for bn, (bk, nw, ns) in itertools.product((32, 64, 128), ((128, 4, 3), (128, 4, 4), (64, 4, 4), (128, 8, 3)))
           if not (nw == 8 and bn == 32)]
    # swap_ab: the weight tile on the warpgroup MMA's M side (64 rows per warpgroup: block_n >= 64 with 4
    # warps, >= 128 with 8); over 227 KiB of shared memory is refused by the budget check, not timed
    moe += [dict(block_n=bn, block_k=bk, num_warps=nw, num_stages=ns, swap_ab=1)
            for bn, bk, nw, ns in itertools.product((64, 128, 256), (64, 128), (4, 8), (2, 3, 4))
            if bn >= 64 * nw // 4 and bn * bk * ns <= 128 * 128 * 4]
    return {"paged_attention_decode": pa, "paged_mqa_logits": mqa, "gather_kv_cache": gkv, "qk_norm_rope": qnr,
            "moe_gemm_stage1": moe}


#: moe cases: the example decoder's MoE layer (examples/jitkern_decoder, qwen3_8b_shapes): 8 experts, top 2,
#: hidden 4096 -> 2 x 1536 (stage 1, SiLU) and 1536 -> 4096 (stage 2, "none"), at these token counts and
#: sorting blocks
#: paged_attention_decode cases: 32 query heads over 8 kv heads of 128; the long shapes' capacity; the
#: short-capacity cases (the example decoder's decode batches, 129 tokens each, capacity 192)
PA_HEADS, PA_CAP = 32, 131072
PA_SHORT_BATCHES = (1, 32, 128)
PA_SHORT_CTX, PA_SHORT_CAP = 129, 192
MOE_SHAPE = dict(experts=8, topk=2, hidden=4096, n=1536)
MOE_TOKENS = (1, 32, 128)
MOE_BLOCKS = (16, 32, 64)


def _moe_cases(torch, quick: bool, dev: str):
    from jitkern.library import moe_align
    from jitkern.library import moe_gemm_stage1 as moe

    e, k, hid, n = (MOE_SHAPE[x] for x in ("experts", "topk", "hidden", "n"))
    w1 = torch.randn(e, 2 * n, hid, device=dev).to(torch.bfloat16) / 64
    w2 = torch.randn(e, hid, n, device=dev).to(torch.bfloat16) / 32
    out = []
    for t in MOE_TOKENS[-1:] if quick else MOE_TOKENS:
        x = torch.randn(t, hid, device=dev).to(torch.bfloat16)
        h = torch.randn(t * k, n, device=dev).to(torch.bfloat16)
        g = torch.Generator().manual_seed(t)
        tid = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).int()
        hit = int(torch.unique(tid).numel())
        for align in MOE_BLOCKS:
            if dev == "meta":  # the tables' sizes only (planning)
                size = moe_align.sorted_size(t * k, e, align)
                ids, eids, npad = (torch.empty(m, dtype=torch.int32, device=dev) for m in (size, size // align, 1))
            else:
                ids, eids, npad = moe.moe_align(tid.to(dev), e, align)
            out.append((f"s1 t={t} a={align}", lambda x=x, ids=ids, eids=eids, npad=npad: moe.moe_gemm_stage1(
                x, w1, ids, eids, npad, k), hit * 2 * n * hid * 2 + x.numel() * 2 + t * k * n * 2))
            CASE_BUCKETS.setdefault("moe_gemm_stage1", []).append(moe.bucket(align, "silu"))
            out.append((f"s2 t={t} a={align}", lambda h=h, ids=ids, eids=eids, npad=npad: moe.moe_gemm_stage1(
                h, w2, ids, eids, npad, 1, "none"), hit * n * hid * 2 + h.numel() * 2 + t * k * hid * 2))
            CASE_BUCKETS["moe_gemm_stage1"].append(moe.bucket(align, "none"))
    return out


# ---- cases: (label, fn, bytes moved) per shape, as the benchmarks build them ----------------------
def cases(op: str, torch, quick: bool, dev: str = "cuda"):
    """``dev='meta'``: the same signatures without memory (``--plan-only``)."""
    from bench_seed_ops import GKV_SHAPES, MQA_SHAPES, gkv_inputs, mqa_inputs, paged_decode_inputs

    torch.manual_seed(0)
    out = []
    if op == "paged_attention_decode":
        from jitkern.library import paged_attention_decode as pa

        shapes = [(32, 2048), (64, 8192), (256, 2048), (32, 32768), (128, 4096)]
        for bsz, ctx in shapes[:2] if quick else shapes:
            q, k, v, bt, lens = paged_decode_inputs(torch, dev, bsz, ctx, PA_HEADS, 8, 128, 16)
            nbytes = 2 * k.numel() * 2 + 2 * q.numel() * 2 + bt.numel() * 4
            out.append((f"b={bsz} ctx={ctx}", lambda q=q, k=k, v=v, bt=bt, lens=lens: pa.paged_attention_decode(
                q, k, v, bt, lens, max_context_len=PA_CAP), nbytes))
            CASE_BUCKETS.setdefault(op, []).append(pa.buckets(PA_CAP, bsz * PA_HEADS)[0])
        # the example decoder's decode steps (tools/bench_model_load.py: a 128-token prompt, capacity
        # 192): the short bucket; bytes are the 129 tokens read per sequence, not the pages' 144
        for bsz in () if quick else PA_SHORT_BATCHES:
            q, k, v, bt, lens = paged_decode_inputs(torch, dev, bsz, PA_SHORT_CTX, PA_HEADS, 8, 128, 16)
            nbytes = 2 * bsz * PA_SHORT_CTX * 8 * 128 * 2 + 2 * q.numel() * 2 + bt.numel() * 4
            out.append((f"b={bsz} ctx={PA_SHORT_CTX} cap={PA_SHORT_CAP}", lambda q=q, k=k, v=v, bt=bt, lens=lens:
                        pa.paged_attention_decode(q, k, v, bt, lens, max_context_len=PA_SHORT_CAP), nbytes))
            CASE_BUCKETS[op].append(pa.buckets(PA_SHORT_CAP, bsz * PA_HEADS)[0])
    elif op == "paged_mqa_logits":
        from jitkern.library import paged_mqa_logits as mqa

        for bsz, nn, ctx in MQA_SHAPES[:2] if quick else MQA_SHAPES:
            q, kv, wt, lens, bt, nbytes = mqa_inputs(torch, dev, bsz, nn, ctx)
            out.append((f"b={bsz} n={nn} ctx={ctx}", lambda q=q, kv=kv, wt=wt, lens=lens, bt=bt, ctx=ctx:
                        mqa.paged_mqa_logits(q, kv, wt, lens, bt, ctx), nbytes))
            CASE_BUCKETS.setdefault(op, []).append(mqa.buckets(nn, bsz * ctx)[0])
    elif op == "gather_kv_cache":
        from jitkern.library import gather_kv_cache as gkv

        for bsz, ctx, pg, e in GKV_SHAPES[:2] if quick else GKV_SHAPES:
            cache, bt, cu, total = gkv_inputs(torch, dev, bsz, ctx, pg, e)
            out.append((f"b={bsz} ctx={ctx} page={pg} e={e}", lambda cache=cache, bt=bt, cu=cu, total=total:
                        gkv.gather_kv_cache(cache, bt, cu, num_tokens=total), 2 * total * e * 2))
    elif op == "moe_gemm_stage1":
        out = _moe_cases(torch, quick, dev)
    elif op == "qk_norm_rope":
        from jitkern.library import qk_norm_rope as qnr

        t, hq, hkv, d = 4096, 32, 8, 128
        g = torch.Generator(device=dev).manual_seed(0) if dev != "meta" else None
        qkv = torch.randn(t, (hq + 2 * hkv) * d, device=dev, generator=g).to(torch.bfloat16)
        qw = (1 + 0.5 * torch.randn(d, device=dev, generator=g)).to(torch.bfloat16)
        kw = (1 + 0.5 * torch.randn(d, device=dev, generator=g)).to(torch.bfloat16)
        cs = qnr.cos_sin_table(8192, d, device=dev) if dev != "meta" else torch.empty(8192, d, device=dev)
        pos = torch.randint(0, 8192, (t,), device=dev, generator=g)
        nbytes = 2 * t * (hq + hkv) * d * qkv.element_size()
        for neox in (True, False):
            out.append((f"t={t} h={hq}/{hkv} d={d} {'neox' if neox else 'gptj'}",
                        (qkv, qw, kw, cs, pos, hq, hkv, d, 1e-6, neox), nbytes))  # args: bound per variant
    return out


def set_tile(op: str, tile: dict) -> None:
    import jitkern

    prefix = PREFIX[op]
    for k in [k for k in os.environ if k.startswith(prefix)]:
        del os.environ[k]
    for k, v in tile.items():
        if k != "variant":
            os.environ[f"{prefix}{k.upper()}"] = str(v)
    jitkern.reset()  # tiles are chosen once per call signature: decide every signature again


def qnr_fire(case_args, variant: str, arch):
    """The launch function of one qk_norm_rope variant (as tools/check_qk_norm_rope_gpu.py times it)."""
    import jitkern
    from jitkern import runtime
    from jitkern.library import qk_norm_rope as qnr

    disp = jitkern.dispatcher(qnr.SPEC)
    cand = [c for c in disp.candidates(case_args, arch, case_args[0].device) if c.variant == variant][0]
    fire = disp.bind(cand, [runtime.kernel(qnr.SPEC, la.config, case_args[0].device) for la in cand.launches])
    return lambda: fire(case_args), cand


# ---- build everything first ---------------------------------------------------------------------
def configs_of(op: str, spec, arch, tile: dict, op_cases) -> list:
    """The Configs the op's plan picks for ``tile`` at every case (planning only, nothing built)."""
    import jitkern

    disp = jitkern.dispatcher(spec)
    set_tile(op, tile)
    cfgs = []
    for label, fn, _ in op_cases:
        if op == "qk_norm_rope":
            cands = [c for c in disp.candidates(fn, arch, fn[0].device) if c.variant == tile["variant"]]
        else:
            cands = _record_plan(disp, fn, arch)
        for c in cands:
            cfgs += [la.config for la in c.launches]
    return cfgs


def _record_plan(disp, fn, arch):
    """Candidates of the call ``fn`` makes: the dispatcher's plan for its arguments (captured by
    intercepting the one dispatch of the call; nothing is launched)."""
    import jitkern.library  # noqa: F401

    got = []

    class Captured(Exception):
        pass

    mod = sys.modules[disp.spec.fn.__module__]
    real = mod._dispatch

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        def __call__(self, *args):
            got.extend(real.candidates(args, arch, args[0].device) or [])
            raise Captured()

    mod._dispatch = Spy()
    try:
        fn()
    except Captured:
        pass
    finally:
        mod._dispatch = real
    return got


def build_all(pairs, arch, jobs) -> dict:
    """Build ``(spec, config)`` pairs with prebuild's workers; returns status counts."""
    from jitkern import prebuild as pb
    from jitkern.cache import Store, check_dirs, configured_layers
    from jitkern.key import recorded
    from jitkern.plan import plan

    layers = check_dirs(configured_layers(None))
    store = Store(layers)
    tasks, seen = [], set()
    for spec, cfg in pairs:
        job = plan(spec, cfg, arch, store)
        if job.key in seen:
            continue
        seen.add(job.key)
        tasks.append(pb.Task(spec.name, getattr(spec.fn, "__module__", "") or "", cfg.variant, cfg.params, arch.name,
                             job.key, recorded(job.parts)))
        pb._jobs[job.key] = job
    t0 = time.perf_counter()
    records, _, _ = pb.run(tasks, store, jobs, None, os.pathsep.join(str(p) for p in layers))
    counts: dict = {}
    for r in records:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    counts["seconds"] = round(time.perf_counter() - t0, 1)
    failed = [r for r in records if r["status"] not in ("built", "cached")]
    for r in failed[:5]:
        print("  build", r["status"], r.get("op"), r.get("params"), str(r.get("error", ""))[:200], flush=True)
    return counts


# ---- time ----------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="folder for membw_sweep.json and membw_summary.json")
    ap.add_argument("--ops", default="pa,mqa,gkv,qnr", help="pa, mqa, gkv, qnr (comma separated)")
    ap.add_argument("--quick", action="store_true", help="two shapes per op")
    ap.add_argument("--rep", type=float, default=20.0, help="do_bench rep (ms) per tile and shape")
    ap.add_argument("--budget-s", type=float, default=150.0, help="stop timing (keeping what was timed) after this")
    ap.add_argument("--jobs", type=int, default=None, help="build workers (default: one per core)")
    ap.add_argument("--apply", metavar="SWEEP_JSON", help="no GPU: merge the winners of a sweep into --table")
    ap.add_argument("--table", default=str(Path(__file__).resolve().parents[1] / "jitkern" / "tuned" / "sm_90.json"))
    ap.add_argument("--plan-only", metavar="ARCH", help="no GPU: plan every config of the grids for ARCH (meta "
                    "tensors) and build them into JITKERN_CACHE_DIR (checks the grids; warms a cache)")
    ap.add_argument("--pick", default="", help="with --apply: op=index,... to ship a given grid row instead")
    args = ap.parse_args()
    if args.apply:
        return apply(args.apply, args.table, args.pick)
    if args.plan_only:
        return plan_only(args)
    if not args.out:
        ap.error("--out DIR is needed (or --apply)")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.pop("JITKERN_DEBUG", None)
    os.environ.setdefault("JITKERN_CACHE_DIR", tempfile.mkdtemp(prefix="jitkern-membw-"))

    import torch
    from triton.testing import do_bench

    import gpu_peaks
    from jitkern import arch as _arch
    from jitkern import registry

    t_start = time.perf_counter()
    a = _arch.current()
    gpu = gpu_peaks.device_report(torch, do_bench)
    print(gpu_peaks.describe(gpu), flush=True)
    peak = gpu["peak"]["hbm_bytes_per_s"] if gpu["peak"] else gpu["copy_bytes_per_s"]
    ops = [SHORT.get(o, o) for o in args.ops.split(",") if o]
    allgrids = grids()
    doc = {"device": torch.cuda.get_device_name(), "arch": a.name, "gpu": gpu, "torch": torch.__version__,
           "triton": __import__("triton").__version__,
           "date_utc": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()), "peak_TBps": peak / 1e12,
           "command": " ".join(sys.argv), "ops": {}}
    sweep_path = out_dir / "membw_sweep.json"

    def save():
        sweep_path.write_text(json.dumps(doc, indent=1))

    # cases first (inputs on the GPU), then every config planned and built in parallel
    op_cases = {op: cases(op, torch, args.quick) for op in ops}
    pairs = []
    for op in ops:
        spec = registry.get(op)
        for tile in allgrids[op]:
            try:
                pairs += [(spec, c) for c in configs_of(op, spec, a, tile, op_cases[op])]
            except Exception as e:  # a tile the rules refuse: it is recorded when timed
                print(f"  plan {op} {tile}: {type(e).__name__}: {str(e)[:160]}", flush=True)
    built = build_all(pairs, a, args.jobs)
    doc["build"] = built
    print(f"built {len(pairs)} configs: {built}", flush=True)
    save()

    qnr_want = {}
    if "qk_norm_rope" in ops:
        from jitkern.library import qk_norm_rope as qnr

        for label, fn, _ in op_cases["qk_norm_rope"]:
            qnr_want[label] = qnr.reference(fn[0].clone(), *fn[1:])
    for op in ops:
        rows = []
        doc["ops"][op] = {"shapes": [c[0] for c in op_cases[op]], "bytes": [c[2] for c in op_cases[op]], "rows": rows,
                          "copy_frac_peak": [gpu_peaks.same_bytes_copy(torch, do_bench, c[2]) / peak for c in op_cases[op]],
                          "buckets": CASE_BUCKETS.get(op)}
        print(f"{op}: a device copy of each shape's bytes reaches "
              + " ".join(f"{f * 100:5.1f}%" for f in doc["ops"][op]["copy_frac_peak"]) + " of peak", flush=True)
        for tile in allgrids[op]:
            if time.perf_counter() - t_start > args.budget_s:
                doc["ops"][op]["cut_short"] = True
                print(f"{op}: time budget spent, stopping here", flush=True)
                break
            set_tile(op, tile)
            rec = {"tile": tile, "ms": [], "TBps": [], "config": None}
            for label, fn, nbytes in op_cases[op]:
                try:
                    if op == "qk_norm_rope":  # in place on a copy, checked against the reference first
                        x = fn[0].clone()
                        call, cand = qnr_fire((x, *fn[1:]), tile["variant"], a)
                        rec["config"] = cand.launches[0].config.describe()
                        call()
                        err = float((x.float() - qnr_want[label].float()).abs().max())
                        rec.setdefault("max_abs_err", []).append(err)
                        rec["matches"] = rec.get("matches", True) and bool(torch.allclose(
                            x.float(), qnr_want[label].float(), atol=2e-2, rtol=2e-2))
                    else:
                        call = fn
                    call()
                    torch.cuda.synchronize()
                    ms = float(do_bench(call, warmup=5, rep=args.rep, return_mode="median"))
                    rec["ms"].append(ms)
                    rec["TBps"].append(nbytes / ms / 1e9)
                except Exception as e:  # a tile that does not build or launch: recorded, the sweep goes on
                    rec["ms"].append(None)
                    rec["TBps"].append(None)
                    rec.setdefault("errors", {})[label] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(rec)
            fr = " ".join(f"{t / peak * 1e12 * 100:5.1f}%" if t else "  -   " for t in rec["TBps"])
            print(f"{op:22s} {json.dumps(tile):70s} {fr}", flush=True)
            save()
        set_tile(op, {})
    doc["summary"] = summarize(doc, peak)
    doc["seconds"] = round(time.perf_counter() - t_start, 1)
    save()
    (out_dir / "membw_summary.json").write_text(json.dumps(doc["summary"], indent=1))
    print_summary(doc["summary"])
    print(json.dumps({"out": str(sweep_path), "seconds": doc["seconds"]}))
    return 0


def plan_only(args) -> int:
    import torch

    from jitkern import arch as _arch
    from jitkern import registry

    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("JITKERN_CACHE_DIR", tempfile.mkdtemp(prefix="jitkern-membw-"))
    a = _arch.get(args.plan_only)
    allgrids = grids()
    pairs, bad = [], 0
    for op in [SHORT.get(o, o) for o in args.ops.split(",") if o]:
        spec = registry.get(op)
        op_cases = cases(op, torch, args.quick, "meta")
        n0 = len(pairs)
        for tile in allgrids[op]:
            try:
                pairs += [(spec, c) for c in configs_of(op, spec, a, tile, op_cases)]
            except Exception as e:
                bad += 1
                print(f"  plan {op} {tile}: {type(e).__name__}: {str(e)[:160]}", flush=True)
        print(f"{op}: {len(allgrids[op])} tiles, {len(pairs) - n0} configs", flush=True)
    set_tile("qk_norm_rope", {})
    built = build_all(pairs, a, args.jobs)
    print(json.dumps({"arch": a.name, "configs": len(pairs), "plan_errors": bad, "build": built}))
    return 1 if bad or any(k not in ("built", "cached", "seconds") for k in built) else 0


def summarize(doc: dict, peak: float) -> dict:
    """Per op: each shape's best tile and its fraction of peak; the overall winner (least worst
    ratio to the per-shape best) with its per-shape fractions; the shipped tile's row if it was timed."""
    out = {}
    for op, d in doc["ops"].items():
        rows = [r for r in d["rows"] if r["ms"] and all(isinstance(m, float) for m in r["ms"])
                and r.get("matches", True)]  # a variant that does not match the reference never wins
        if not rows and not d.get("buckets"):
            out[op] = {"error": "no tile timed at every shape"}
            continue
        n = len(d["shapes"])
        out[op] = {"shapes": d["shapes"], "copy_frac_peak": d.get("copy_frac_peak")}
        if rows:  # the overall winner: the tile closest to each shape's best at every shape
            best = [min(r["ms"][i] for r in rows) for i in range(n)]
            per_shape = []
            for i, label in enumerate(d["shapes"]):
                r = min(rows, key=lambda r: r["ms"][i])
                per_shape.append({"shape": label, "tile": r["tile"], "ms": r["ms"][i],
                                  "frac_peak": round(d["bytes"][i] / r["ms"][i] / 1e9 / peak * 1e12, 4)})
            def pick(rs):
                return min(rs, key=lambda r: (max(r["ms"][i] / best[i] for i in range(n)), sum(r["ms"])))

            win = pick(rows)
            out[op] |= {"winner": win["tile"], "winner_index": d["rows"].index(win),
                        "winner_frac_peak": [round(d["bytes"][i] / win["ms"][i] / 1e9 / peak * 1e12, 4)
                                             for i in range(n)],
                        "winner_worst_over_best": round(max(win["ms"][i] / best[i] for i in range(n)), 4),
                        "winner_ms": win["ms"], "best_per_shape": per_shape}
        if d.get("buckets"):  # each bucket's own winner, over the shapes in it
            out[op]["by_bucket"] = {}
            for bk in dict.fromkeys(d["buckets"]):
                idx = [i for i in range(n) if d["buckets"][i] == bk]
                # a tile that fails elsewhere (over budget at a larger block) may still win its own bucket
                rows_b = [r for r in d["rows"] if r["ms"] and all(isinstance(r["ms"][i], float) for i in idx)
                          and r.get("matches", True)]
                if not rows_b:
                    continue
                best_b = {i: min(r["ms"][i] for r in rows_b) for i in idx}
                w = min(rows_b, key=lambda r: (max(r["ms"][i] / best_b[i] for i in idx), sum(r["ms"][i] for i in idx)))
                out[op]["by_bucket"][bk] = {"tile": w["tile"], "index": d["rows"].index(w),
                                            "shapes": [d["shapes"][i] for i in idx],
                                            "ms": [w["ms"][i] for i in idx],
                                            "frac_peak": [round(d["bytes"][i] / w["ms"][i] / 1e9 / peak * 1e12, 4)
                                                          for i in idx]}
        variants = sorted({r["tile"]["variant"] for r in rows if "variant" in r["tile"]})
        if variants:  # qk_norm_rope: each variant's own winner (each one's parameters apply only to it)
            out[op]["by_variant"] = {}
            for v in variants:
                w = pick([r for r in rows if r["tile"].get("variant") == v])
                out[op]["by_variant"][v] = {"tile": w["tile"], "index": d["rows"].index(w), "ms": w["ms"],
                                            "frac_peak": [round(d["bytes"][i] / w["ms"][i] / 1e9 / peak * 1e12, 4)
                                                          for i in range(n)]}
    return out


def print_summary(summary: dict) -> None:
    print("\n== winners (fraction of HBM peak per shape)")
    for op, s in summary.items():
        if "error" in s:
            print(f"{op}: {s['error']}")
            continue
        if "winner" in s:
            print(f"{op}: overall {json.dumps(s['winner'])} (row {s['winner_index']}, worst shape "
                  f"{s['winner_worst_over_best']:.3f}x its best)")
        else:
            print(f"{op}: no tile timed at every shape; per bucket:")
        for i, b in enumerate(s.get("best_per_shape", ())):
            cp = f"copy {s['copy_frac_peak'][i] * 100:5.1f}%  " if s.get("copy_frac_peak") else ""
            print(f"   {b['shape']:32s} {cp}winner {s['winner_frac_peak'][i] * 100:5.1f}%   best {b['frac_peak'] * 100:5.1f}% "
                  f"{json.dumps(b['tile'])}")
        for bk, w in s.get("by_bucket", {}).items():
            print(f"   bucket {bk} winner {json.dumps(w['tile'])}: " + " ".join(f"{f * 100:5.1f}%" for f in w["frac_peak"]))
        for v, w in s.get("by_variant", {}).items():
            print(f"   {v} winner {json.dumps(w['tile'])}: " + " ".join(f"{f * 100:5.1f}%" for f in w["frac_peak"]))


def _label_fields(label: str) -> dict[str, str]:
    """``{"b": "32", "ctx": "2048"}`` of a shape label ``b=32 ctx=2048``."""
    return dict(part.split("=", 1) for part in label.split() if "=" in part)


def _mqa_buckets(labels: list[str]) -> list[str]:
    """paged_mqa_logits buckets of shape labels ``b=B n=N ctx=C`` (sweeps written before the tool
    recorded them)."""
    from jitkern.library import paged_mqa_logits as mqa

    out = []
    for kv in map(_label_fields, labels):
        if not {"b", "n", "ctx"} <= set(kv):
            return None
        out.append(mqa.buckets(int(kv["n"]), int(kv["b"]) * int(kv["ctx"]))[0])
    return out


def _pa_buckets(labels: list[str]) -> list[str]:
    """paged_attention_decode buckets of shape labels ``b=B ctx=C [cap=N]`` as today's rules give them
    (``PA_HEADS`` query heads; no cap: ``PA_CAP``), so a sweep timed under older buckets ships today's."""
    from jitkern.library import paged_attention_decode as pa

    return [pa.buckets(int(kv.get("cap", PA_CAP)), int(kv["b"]) * PA_HEADS)[0] for kv in map(_label_fields, labels)]


def apply(sweep_json: str, table: str, pick: str) -> int:
    """Merge each op's overall winner (or the ``--pick`` rows), and each bucket's, into the shipped table.
    The summary is recomputed from the timed rows (so an older sweep gets today's selection)."""
    doc = json.loads(Path(sweep_json).read_text())
    mq = doc.get("ops", {}).get("paged_mqa_logits")
    if mq and not mq.get("buckets"):
        mq["buckets"] = _mqa_buckets(mq["shapes"])
    pad = doc.get("ops", {}).get("paged_attention_decode")
    if pad:
        pad["buckets"] = _pa_buckets(pad["shapes"])
    summary = summarize(doc, doc["peak_TBps"] * 1e12) if doc.get("peak_TBps") else (doc.get("summary") or {})
    picks = dict(p.split("=") for p in pick.split(",") if p)
    path = Path(table)
    tab = json.loads(path.read_text()) if path.is_file() else {"arch": doc.get("arch", "sm_90")}
    ops_tab = tab.setdefault("ops", {})
    for op, s in summary.items():
        short = {v: k for k, v in SHORT.items()}[op]
        if short in picks or op in picks:
            row = doc["ops"][op]["rows"][int(picks.get(short, picks.get(op)))]
        elif "winner" in s:
            row = doc["ops"][op]["rows"][s["winner_index"]]
        elif s.get("by_bucket"):
            row = doc["ops"][op]["rows"][next(iter(s["by_bucket"].values()))["index"]]
        else:
            continue
        params = {k: v for k, v in row["tile"].items() if k != "variant"}
        if "by_variant" in s and not (short in picks or op in picks):  # every variant's own winner, merged
            params = {}
            for v in s["by_variant"].values():
                params.update({k: x for k, x in v["tile"].items() if k != "variant"})
        entry = {"params": params, "ms": row["ms"], "shapes": doc["ops"][op]["shapes"], "device": doc.get("device"),
                 "triton": doc.get("triton"), "tuned": doc.get("date_utc"),
                 "source": "tools/sweep_membw.py " + Path(sweep_json).name}
        # moe_gemm_stage1's tiles leave block_m to each case's sorting block: only its buckets ship, each
        # with the block_m of its sorting block
        per_bucket = {} if op == "moe_gemm_stage1" else {BUCKET: entry}
        for bk, w in ({} if (short in picks or op in picks) else s.get("by_bucket", {})).items():
            per_bucket[bk] = dict(entry, params={k: v for k, v in w["tile"].items() if k != "variant"}, ms=w["ms"],
                                  shapes=w["shapes"])
            if op == "moe_gemm_stage1":
                from jitkern.library import moe_gemm_stage1 as moe

                per_bucket[bk]["params"]["block_m"] = moe.bucket_block_m(bk)
        for dt in ("bf16", "fp16"):
            for bk, e in per_bucket.items():
                ops_tab.setdefault(op, {}).setdefault(dt, {})[bk] = dict(e, **({"from": "bf16"} if dt == "fp16" else {}))
        for bk, e in per_bucket.items():
            print(f"{op} [{bk}]: shipping {e['params']}")
    path.write_text(json.dumps(tab, indent=1, sort_keys=False) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
