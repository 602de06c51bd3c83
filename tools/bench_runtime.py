"""Runtime benchmark for jitkern's fast path, with Triton's own anchors measured in the same run.

    python tools/bench_runtime.py [--runs 3] [--json-out FILE]

Needs a CUDA GPU (run it from the repo root with PYTHONPATH=$PWD).
Prints one JSON object (also written to --json-out) and a table of the floors:

1. warm start: a fresh process gets the first results of 16 matmul tile variants (the kernel and tiles of
   ../shared/tools/triton_baseline.py) from a warm jitkern cache, against the same 16 through Triton's JIT
   with Triton's own warm cache. Both clocks start after ``import torch, triton``, ``torch.cuda.init()`` and
   the inputs' allocation, and stop when the 16 variants' results are done (load, launch, synchronize:
   the same work in both). ``baseline_style_s`` also counts what triton_baseline.py's clock counts
   (allocating the inputs and the reference matmul, i.e. CUDA context and cuBLAS start-up). Triton's
   cache is warmed first (one cold process), then jitkern's (one cold process, sharing TRITON_CACHE_DIR,
   where Triton keeps the gcc-built C launcher stub and its cuda_utils module). Also reported: jitkern
   warm with an EMPTY Triton cache dir, which pays gcc for those two stubs; with JITKERN_DIRECT_LAUNCH=0
   (Triton's own CompiledKernel); and the split of jitkern's time into its steps.
2. dispatch: steady-state CPU time per call of ``jitkern.ops.rms_norm`` on a tiny bf16 input with
   ``out=``, against the Triton JIT launch of the very same kernel (imported from jitkern's cache entry),
   Triton's CompiledKernel called directly, and ``torch.add(out=)``. Two clocks, best of 2 passes x 5 x
   20000 calls: back to back (triton_baseline.py's method) and CPU-only (``*_cpu``: batches of 200, GPU
   drained between; the floors are judged on these). Also the jitkern figure with
   JITKERN_DIRECT_LAUNCH=0 and the parts of a call, each timed alone.
3. every op: CPU time per call of each built-in op and the README's third-party example op on tiny
   inputs, against torch.add(out=) per kernel the call launches (same clock, same process).
4. import: ``import jitkern`` in a fresh interpreter (best of 5), and whether it imported torch.
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

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TILES = [(bm, bn, bk) for bm in (32, 64, 128) for bn in (32, 64, 128) for bk in (32, 64)][:16]
MNK = 512
#: jitkern with its direct C launch and shared launchers switched off: Triton's CompiledKernel path.
TRITON_LAUNCHER = {"JITKERN_DIRECT_LAUNCH": "0"}


# ---------------------------------------------------------------------------------------------------
# children (each runs in a fresh process)
# ---------------------------------------------------------------------------------------------------
def _matmul_spec():
    import torch

    from jitkern.spec import Arg, Config, OpSpec, Variant

    def configs(arch):
        for bm, bn, bk in TILES:
            yield Config.make("triton", bm=bm, bn=bn, bk=bk, num_warps=4)

    ints = [Arg(n, "i32") for n in ("M", "N", "K", "sam", "sak", "sbk", "sbn", "scm", "scn")]
    return OpSpec(
        name="bench_matmul",
        variants=(Variant(name="triton", template="triton.py.j2", kernel="matmul_kernel",
                          args=(Arg("a", "*bf16"), Arg("b", "*bf16"), Arg("c", "*bf16"), *ints)),),
        template_dir=HERE / "templates" / "bench_matmul",
        fn=lambda *a: None,
        reference=lambda a, b: (a.float() @ b.float()).to(torch.bfloat16),
        configs=configs,
    )


def child_warmstart(which: str) -> dict:
    t0 = time.perf_counter()
    import torch
    import triton
    import triton.language as tl

    t_import = time.perf_counter() - t0
    torch.cuda.init()
    M = N = K = MNK
    if which == "triton":
        @triton.jit
        def matmul(a, b, c, M, N, K, sam, sak, sbk, sbn, scm, scn,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
            pid = tl.program_id(0)
            npn = tl.cdiv(N, BN)
            pm = pid // npn
            pn = pid % npn
            rm = pm * BM + tl.arange(0, BM)
            rn = pn * BN + tl.arange(0, BN)
            rk = tl.arange(0, BK)
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for k in range(0, tl.cdiv(K, BK)):
                ak = k * BK + rk
                x = tl.load(a + rm[:, None] * sam + ak[None, :] * sak,
                            mask=(rm[:, None] < M) & (ak[None, :] < K), other=0.)
                y = tl.load(b + ak[:, None] * sbk + rn[None, :] * sbn,
                            mask=(ak[:, None] < K) & (rn[None, :] < N), other=0.)
                acc += tl.dot(x, y)
            tl.store(c + rm[:, None] * scm + rn[None, :] * scn, acc.to(tl.bfloat16),
                     mask=(rm[:, None] < M) & (rn[None, :] < N))

        t = time.perf_counter()
        a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(K, N, device="cuda", dtype=torch.bfloat16)
        c = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        for bm, bn, bk in TILES:
            grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
            matmul[grid](a, b, c, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                         c.stride(0), c.stride(1), BM=bm, BN=bn, BK=bk)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        return _finish(t, t1, t2, a, b, c, {"import_s": t_import})

    import jitkern
    from jitkern import runtime
    from jitkern.spec import Config

    t_import = time.perf_counter() - t0
    spec = _matmul_spec()
    t = time.perf_counter()
    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(K, N, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    dev = a.device
    for bm, bn, bk in TILES:
        k = runtime.kernel(spec, Config.make("triton", bm=bm, bn=bn, bk=bk, num_warps=4), dev)
        k.run(triton.cdiv(M, bm) * triton.cdiv(N, bn), 1, 1, a, b, c, M, N, K, a.stride(0), a.stride(1),
              b.stride(0), b.stride(1), c.stride(0), c.stride(1))
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return _finish(t, t1, t2, a, b, c, {"import_s": t_import, "stats": jitkern.stats()})


def _finish(t, t1, t2, a, b, c, extra) -> dict:
    """``seconds``: the 16 variants' first results (load + launch + synchronize); ``baseline_style_s``:
    with triton_baseline.py's boundaries (input allocation and the reference matmul included)."""
    t3 = time.perf_counter()
    ref = a.float() @ b.float()
    err = (c.float() - ref).abs().max().item()
    t4 = time.perf_counter()
    return {"seconds": t2 - t1, "baseline_style_s": (t2 - t) + (t4 - t3), "max_err": err, **extra}


def _best_per_call(fn, iters=20000, reps=5, batch=None) -> float:
    """Microseconds per call, best of ``reps`` runs of ``iters`` calls.

    Back to back (``batch=None``, triton_baseline.py's method), a call that issues faster than the GPU
    runs its tiny kernel eventually waits for room in the launch queue, so the figure can be the GPU's
    pace rather than the CPU's. With ``batch=B``, the clock runs only while B calls are issued and is
    stopped while the GPU drains between batches: CPU time per call, whatever the GPU does."""
    import torch

    for _ in range(500):
        fn()
    torch.cuda.synchronize()
    best = 1e9
    for _ in range(reps):
        if batch is None:
            t = time.perf_counter()
            for _ in range(iters):
                fn()
            dt = (time.perf_counter() - t) / iters
        else:
            spent = 0.0
            for _ in range(iters // batch):
                t = time.perf_counter()
                for _ in range(batch):
                    fn()
                spent += time.perf_counter() - t
                torch.cuda.synchronize()
            dt = spent / (iters // batch * batch)
        torch.cuda.synchronize()
        best = min(best, dt)
    return best * 1e6


#: Calls per batch for the CPU-only figures: well inside the driver's queue of pending launches.
BATCH = 200


def child_dispatch() -> dict:
    import torch
    import triton
    import triton.language as tl

    os.environ.pop("TRITON_INTERPRET", None)
    import jitkern
    from jitkern import runtime
    from jitkern.builders.triton import SOURCE_FILE, import_source
    from jitkern.library import rms_norm as rn

    @triton.jit
    def add(x, y, out, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        tl.store(out + offs, tl.load(x + offs, mask=m) + tl.load(y + offs, mask=m), mask=m)

    rows, n = 4, 256
    x = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
    o = torch.empty_like(x)
    f = jitkern.ops.rms_norm
    f(x, w, out=o)
    torch.testing.assert_close(o, rn.reference(x, w), atol=2e-2, rtol=2e-2)
    # the very kernel jitkern launched, through Triton's JIT
    block, single = rn.block_for(n)
    cfg = rn.config("bf16", False, True, block, single)
    k = runtime.kernel(rn.SPEC, cfg, x.device)
    jit_fn = getattr(import_source(k.entry.file(SOURCE_FILE), "bench_rms_norm_jit"), rn.SPEC.variants[0].kernel)
    nw = cfg.p["num_warps"]
    ck = jit_fn[(rows,)](x, w, x, o, n, n, 0, n, 1e-6, num_warps=nw)
    xs = torch.randn(rows * n, device="cuda", dtype=torch.bfloat16)
    ys, outs = torch.randn_like(xs), torch.empty_like(xs)
    ack = add[(1,)](xs, ys, outs, rows * n, BLOCK=1024)
    torch.cuda.synchronize()
    cases = [
        ("jitkern_rms_norm_out", lambda: f(x, w, out=o)),
        ("jitkern_rms_norm_residual_out", lambda: f(x, w, residual=r, out=o)),
        ("jitkern_rms_norm_alloc", lambda: f(x, w)),
        ("torch_ops_jitkern_rms_norm_out", lambda: torch.ops.jitkern.rms_norm(x, w, 1e-6, None, o)),
        ("triton_jit_rms_norm", lambda: jit_fn[(rows,)](x, w, x, o, n, n, 0, n, 1e-6, num_warps=nw)),
        ("triton_compiled_kernel_rms_norm", lambda: ck[(rows, 1, 1)](x, w, x, o, n, n, 0, n, 1e-6)),
        ("torch_add_out", lambda: torch.add(xs, ys, out=outs)),
        ("triton_jit_add_4args", lambda: add[(1,)](xs, ys, outs, rows * n, BLOCK=1024)),
        ("triton_compiled_kernel_add", lambda: ack[(1, 1, 1)](xs, ys, outs, rows * n, 1024)),
    ]
    t_end = time.perf_counter() + 1.0  # let clocks settle before the first case
    while time.perf_counter() < t_end:
        torch.add(xs, ys, out=outs)
    torch.cuda.synchronize()
    before = jitkern.stats()
    res = {}
    for _ in range(2):  # two passes in the same order; the best of both (order effects show as a gap)
        for name, fn in cases:
            res[name + "_us"] = round(min(res.get(name + "_us", 1e9), _best_per_call(fn)), 3)
            res[name + "_cpu_us"] = round(min(res.get(name + "_cpu_us", 1e9), _best_per_call(fn, batch=BATCH)), 3)
    after = jitkern.stats()
    res["kernel_lookups_during_timing"] = after["memory_hits"] - before["memory_hits"]
    res["diagnostics"] = _dispatch_parts(f, k, x, w, o, rows, n, rn)
    torch.cuda.synchronize()
    torch.testing.assert_close(o, rn.reference(x, w), atol=2e-2, rtol=2e-2)
    res["input"] = f"x[{rows},{n}] bf16, weight[{n}], out= given"
    return res


def op_cases(dev: str):
    """``{name: call}`` for every built-in op and the README's third-party example op on tiny inputs
    on ``dev`` (each call is a hot-path call: outputs given, no host sync), and their specs."""
    import torch

    import jitkern
    from jitkern.library import moe_gemm_stage1 as moe

    sys.path.insert(0, str(REPO / "tests" / "example_pkg"))
    sys.path.insert(0, str(HERE))
    import jitkern_example
    from bench_seed_ops import paged_decode_inputs

    bf = torch.bfloat16
    torch.manual_seed(0)
    ops = jitkern.ops
    x, w = torch.randn(4, 256, device=dev, dtype=bf), torch.randn(256, device=dev, dtype=bf)
    o = torch.empty_like(x)
    a, wt = torch.randn(16, 256, device=dev, dtype=bf), torch.randn(256, 256, device=dev, dtype=bf)
    c = torch.empty(16, 256, device=dev, dtype=bf)
    b_nk = wt.t()  # B = w.t(), as nn.Linear stores weights (the view is made once, as a model does)
    hq, hkv, d = 4, 1, 128
    qkv = torch.randn(2, (hq + 2 * hkv) * d, device=dev, dtype=bf)
    qw, kw = torch.ones(d, device=dev, dtype=bf), torch.ones(d, device=dev, dtype=bf)
    cs = torch.randn(64, d, device=dev, dtype=torch.float32)
    pos = torch.arange(2, device=dev)
    q, kc, vc, bt, lens = paged_decode_inputs(torch, dev, 2, 64, 4, 1, 128, 16)
    pa_out = torch.empty_like(q)
    cache = torch.randn(8, 16, 64, device=dev, dtype=bf)
    gbt = torch.arange(8, device=dev, dtype=torch.int32).view(2, 4)
    cu = torch.tensor([0, 30, 64], device=dev, dtype=torch.int32)
    g_out = torch.empty(64, 64, device=dev, dtype=bf)
    mq = torch.randn(2, 1, 16, 64, device=dev, dtype=bf)
    mkv = torch.randn(8, 16, 64, device=dev, dtype=bf)
    mw = torch.rand(2, 16, device=dev)
    mlens = torch.tensor([40, 64], device=dev, dtype=torch.int32)
    m_out = torch.empty(2, 64, device=dev, dtype=torch.float32)
    experts, topk, hidden, n = 4, 2, 128, 64
    mx = torch.randn(4, hidden, device=dev, dtype=bf)
    mw1 = torch.randn(experts, 2 * n, hidden, device=dev, dtype=bf) / 16
    tid = torch.stack([torch.randperm(experts, device=dev)[:topk] for _ in range(4)]).int()
    ids, eids, npad = moe.moe_align(tid, experts, 16)
    moe_out = moe.moe_gemm_stage1(mx, mw1, ids, eids, npad, topk)
    xs = torch.randn(1024, device=dev, dtype=bf)
    ys, ex_out = torch.randn_like(xs), torch.empty_like(xs)
    cases = {
        "rms_norm": lambda: ops.rms_norm(x, w, out=o),
        "gemm": lambda: ops.gemm(a, b_nk, out=c),
        "qk_norm_rope": lambda: ops.qk_norm_rope(qkv, qw, kw, cs, pos, hq, hkv, d),
        "paged_attention_decode": lambda: ops.paged_attention_decode(q, kc, vc, bt, lens, 0.1, 64, out=pa_out),
        "gather_kv_cache": lambda: ops.gather_kv_cache(cache, gbt, cu, num_tokens=64, out=g_out),
        "paged_mqa_logits": lambda: ops.paged_mqa_logits(mq, mkv, mw, mlens, gbt, 64, out=m_out),
        "moe_gemm_stage1": lambda: ops.moe_gemm_stage1(mx, mw1, ids, eids, npad, topk, out=moe_out),
        "example_scale_add": lambda: jitkern_example.scale_add(xs, ys, 0.5, out=ex_out),
    }
    specs = {name: (jitkern.get_op(name) if name in jitkern.registry.names() else jitkern_example.SPEC)
             for name in cases}
    return cases, specs


def child_ops() -> dict:
    """CPU time per call of every built-in op and the README's third-party example op on tiny inputs
    (batches of BATCH calls, GPU drained between), with torch.add(out=) timed the same way in the same
    process; ``kernels``: how many kernels the call launches (the floor scales with it)."""
    import torch

    os.environ.pop("TRITON_INTERPRET", None)
    import jitkern

    cases, specs = op_cases("cuda")
    xs = torch.randn(1024, device="cuda", dtype=torch.bfloat16)
    ys, outs = torch.randn_like(xs), torch.empty_like(xs)
    res = {}
    for name, fn in cases.items():  # first calls: plan, load (compiles on a cold cache)
        fn()
    torch.cuda.synchronize()
    from jitkern import fastcall

    # the C path's C++ tensor reader (built in the background on first use): timed once it is loaded
    res["torch_reader"] = fastcall.use_torch_signatures(wait=True)
    for name in cases:
        routes = [r for r in jitkern.dispatcher(specs[name])._routes.values() if r is not None and r.active]
        cand = routes[-1].active_candidate
        res[name] = {"kernels": len(cand.launches), "variant": cand.name}
    anchor = lambda: torch.add(xs, ys, out=outs)  # noqa: E731
    for _ in range(2):
        res["torch_add_out_cpu_us"] = min(res.get("torch_add_out_cpu_us", 1e9), _best_per_call(anchor, batch=BATCH))
        for name, fn in cases.items():
            us = _best_per_call(fn, iters=10000, reps=3, batch=BATCH)
            res[name]["cpu_us"] = round(min(res[name].get("cpu_us", 1e9), us), 3)
    for name, fn in cases.items():
        res[name]["parts_us"] = _op_parts(fn, jitkern.dispatcher(specs[name]))
    for name in cases:
        r = res[name]
        r["ratio_per_kernel_vs_torch_add_out"] = round(r["cpu_us"] / (r["kernels"] * res["torch_add_out_cpu_us"]), 3)
    res["torch_add_out_cpu_us"] = round(res["torch_add_out_cpu_us"], 3)
    return res


def _op_parts(fn, d) -> dict:
    """Where one op call's CPU time goes: the dispatcher called with the arguments the op passes it
    (the op function's own Python is the rest), the signature alone, and the decided launch alone."""
    seen = []
    real = d._call
    d._call = lambda args: (seen.append(args), real(args))[1]
    try:
        fn()
    finally:
        d._call = real
    args = seen[-1]
    run = d._memo.get(d.key(args))
    parts = {"dispatcher": lambda: real(args), "signature_python": lambda: d.key(args)}
    if hasattr(real, "key"):
        parts["signature_c"] = lambda: real.key(args)
        from jitkern import fastcall

        fc = fastcall.module()
        if fc.compact_key(real, args) is not None:  # read through the C++ tensor reader
            parts["signature_c_compact"] = lambda: fc.compact_key(real, args)
    if run is not None:
        parts["decided_launch"] = lambda: run(args)
    out = {k: round(_best_per_call(f, iters=4000, reps=3, batch=BATCH), 3) for k, f in parts.items()}
    out["memo_holds"] = type(run).__name__
    return out


def _dispatch_parts(f, k, x, w, o, rows, n, rn) -> dict:
    """Where a call's time goes: the parts of the op's hot path, each timed alone."""
    import torch

    from jitkern import dispatcher as jitkern_dispatcher

    xp, wp, op = x.data_ptr(), w.data_ptr(), o.data_ptr()
    stream = torch._C._cuda_getCurrentRawStream
    parts = {
        "signature_tuple": lambda: (x.shape, x.stride(), x.dtype, x.device, w.shape, w.stride(), w.dtype, w.device,
                                    o.shape, o.stride(), o.dtype, o.device, None),
        "four_data_ptrs": lambda: (x.data_ptr(), w.data_ptr(), o.data_ptr(), x.data_ptr()),
        "current_stream": lambda: stream(0),
        "kernel_run_int_pointers": lambda: k.run(rows, 1, 1, xp, wp, xp, op, n, n, 0, n, 1e-6),
        "kernel_run_tensors": lambda: k.run(rows, 1, 1, x, w, x, o, n, n, 0, n, 1e-6),
        "kernel_launch_via_triton_launcher": lambda: k.launch((rows, 1, 1), x, w, x, o, n, n, 0, n, 1e-6),
        "jitkern_ops_rms_norm": lambda: f(x, w, out=o),
    }
    dev = k._device
    if hasattr(k, "_run"):  # Triton's driver: its generated C launch with every argument given, and with an
        # empty grid (argument parsing only: its C code skips cuLaunchKernelEx when the grid is empty)
        c_launch, function = k._run.launch, k._function
        fixed = (k._run.launch_cooperative_grid, k._run.launch_pdl, None, None, k._packed, None, None, None)
        parts["c_launch_all_args_given"] = lambda: c_launch(rows, 1, 1, stream(dev), function, *fixed, xp, wp, xp, op,
                                                            n, n, 0, n, 1e-6)
        parts["c_launch_empty_grid"] = lambda: c_launch(0, 1, 1, stream(dev), function, *fixed, xp, wp, xp, op, n, n,
                                                        0, n, 1e-6)
    else:  # the CUDA driver through jitkern.fastcall (DriverKernel): cuLaunchKernel with every argument given
        fc = k._fc
        parts["c_launch_all_args_given"] = lambda: fc.launch(k._launch_fn, k._function, (rows, 1, 1), k._block,
                                                             k._shared, stream(dev), k._codes,
                                                             (xp, wp, xp, op, n, n, 0, n, 1e-6, 0, 0))
    d = jitkern_dispatcher(rn.SPEC)
    parts["dispatcher_signature"] = lambda: d.key((x, w, 1e-6, None, o))
    if hasattr(d._call, "key"):
        parts["dispatcher_signature_c"] = lambda: d._call.key((x, w, 1e-6, None, o))
    out = {name + "_us": round(_best_per_call(fn, iters=10000, reps=3), 3) for name, fn in parts.items()}
    # the op's Python alone: the kernel's launch swapped for a no-op builtin that takes any arguments
    # (the dispatcher's decisions are forgotten so the next call binds the no-op)
    from jitkern import dispatch

    real = k.run
    k.run = "".format
    dispatch.clear_memory()
    try:
        out["jitkern_ops_python_only_us"] = round(_best_per_call(lambda: f(x, w, out=o), 10000, 3), 3)
    finally:
        k.run = real
        dispatch.clear_memory()
    out["takes_addresses"] = k.takes_addresses
    out["signatures"] = d.signatures
    def calls():
        for _ in range(5000):
            f(x, w, out=o)

    _, out["profile"] = _profiled(calls, sort="tottime", top=12, keep=22)
    torch.cuda.synchronize()
    return out


def _profiled(fn, sort: str, top: int, keep: int):
    """``(fn(), the last `keep` lines of cProfile's table of the `top` entries by `sort`)``."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    result = fn()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats(sort).print_stats(top)
    return result, buf.getvalue().splitlines()[-keep:]


def child_warm_phases() -> dict:
    """Where a warm jitkern start's time goes: the steps ``runtime.kernel`` takes for each of the 16
    variants, each summed over them (plan from the index, cache lookup + verify, load into the driver,
    first launch), then the synchronize; plus a cProfile of the same window (one more fresh process)."""
    import torch
    import triton

    from jitkern.build import get_entry
    from jitkern.load import load
    from jitkern.plan import plan
    from jitkern.runtime import arches_for
    from jitkern.spec import Config

    torch.cuda.init()
    spec = _matmul_spec()
    M = N = K = MNK
    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(K, N, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    phases = dict.fromkeys(("arch", "plan", "lookup", "load", "launch", "sync"), 0.0)
    firsts = {}

    def timed(name, fn):
        t = time.perf_counter()
        r = fn()
        dt = time.perf_counter() - t
        phases[name] += dt
        firsts.setdefault(name, dt)
        return r

    def run():
        arch = timed("arch", lambda: arches_for(a.device)[1])
        for bm, bn, bk in TILES:
            job = timed("plan", lambda: plan(spec, Config.make("triton", bm=bm, bn=bn, bk=bk, num_warps=4), arch))
            entry = timed("lookup", lambda: get_entry(job)[0])
            k = timed("load", lambda: load(entry, job))
            timed("launch", lambda: k.run(triton.cdiv(M, bm) * triton.cdiv(N, bn), 1, 1, a, b, c, M, N, K,
                                          a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1)))
        timed("sync", torch.cuda.synchronize)

    t = time.perf_counter()
    if os.environ.get("BENCH_PROFILE"):
        _, lines = _profiled(run, sort="cumulative", top=40, keep=50)
        return {"profile": lines}
    run()
    return {"seconds": time.perf_counter() - t, "phases_ms": {k: round(v * 1e3, 2) for k, v in phases.items()},
            "first_of_each_ms": {k: round(v * 1e3, 2) for k, v in firsts.items()}}


def child_import() -> dict:
    t = time.perf_counter()
    import jitkern  # noqa: F401

    dt = time.perf_counter() - t
    return {"import_jitkern_s": dt, "torch_imported": "torch" in sys.modules, "triton_imported": "triton" in sys.modules}


CHILDREN = {"warm-triton": lambda: child_warmstart("triton"), "warm-jitkern": lambda: child_warmstart("jitkern"),
            "dispatch": child_dispatch, "import": child_import, "warm-jitkern-phases": child_warm_phases,
            "ops": child_ops}


# ---------------------------------------------------------------------------------------------------
# parent
# ---------------------------------------------------------------------------------------------------
def _child(mode: str, env_extra: dict, timeout=600) -> dict:
    env = {**os.environ, **env_extra}
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    r = subprocess.run([sys.executable, __file__, "--child", mode], env=env, capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"child {mode} failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_all(runs: int) -> dict:
    import torch
    import triton

    out = {"date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "python": sys.version.split()[0],
           "torch": torch.__version__, "triton": triton.__version__,
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "runs": runs}
    with tempfile.TemporaryDirectory(prefix="bench-runtime-") as d:
        d = Path(d)
        tc, jc, tc_empty = d / "triton-cache", d / "jitkern-cache", d / "triton-cache-empty-{}"
        # Python bytecode kept as a deployed install keeps it (see bench_model_load.bytecode_env): one
        # shared PYTHONPYCACHEPREFIX, filled by the cold children before any warm one runs
        env = {"TRITON_CACHE_DIR": str(tc), "JITKERN_CACHE_DIR": str(jc), "PYTHONDONTWRITEBYTECODE": "",
               "PYTHONPYCACHEPREFIX": str(d / "pycache")}
        out["triton_cold"] = _child("warm-triton", env)
        out["triton_warm"] = [_child("warm-triton", env) for _ in range(runs)]
        out["jitkern_cold"] = _child("warm-jitkern", env)
        out["jitkern_warm"] = [_child("warm-jitkern", env) for _ in range(runs)]
        out["jitkern_warm_empty_triton_cache"] = [
            _child("warm-jitkern", {**env, "TRITON_CACHE_DIR": str(tc_empty).format(i)}) for i in range(runs)]
        out["jitkern_warm_triton_launcher"] = [_child("warm-jitkern", {**env, **TRITON_LAUNCHER}) for _ in range(runs)]
        out["jitkern_warm_phases"] = [_child("warm-jitkern-phases", env) for _ in range(runs)]
        out["jitkern_warm_profile"] = _child("warm-jitkern-phases", {**env, "BENCH_PROFILE": "1"})["profile"]
        out["dispatch"] = _child("dispatch", env)
        out["dispatch_triton_launcher"] = _child("dispatch", {**env, **TRITON_LAUNCHER})
        out["ops"] = _child("ops", env)
        out["ops_python_hot_path"] = _child("ops", {**env, "JITKERN_FAST_CALL": "0"})
        out["import"] = [_child("import", env) for _ in range(5)]
    return out


def summarize(res: dict) -> dict:
    tw = [r["seconds"] for r in res["triton_warm"]]
    jw = [r["seconds"] for r in res["jitkern_warm"]]
    je = [r["seconds"] for r in res["jitkern_warm_empty_triton_cache"]]
    d = res["dispatch"]
    imp = [r["import_jitkern_s"] for r in res["import"]]
    s = {
        "warm_triton_baseline_style_s_median": statistics.median(r["baseline_style_s"] for r in res["triton_warm"]),
        "warm_jitkern_baseline_style_s_median": statistics.median(r["baseline_style_s"] for r in res["jitkern_warm"]),
        "warm_triton_s_median": statistics.median(tw),
        "warm_jitkern_s_median": statistics.median(jw),
        "warm_ratio_jitkern_over_triton": statistics.median(jw) / statistics.median(tw),
        "warm_jitkern_empty_triton_cache_s_median": statistics.median(je),
        "warm_jitkern_compiles": [r["stats"]["compiles"] for r in res["jitkern_warm"]],
        "warm_jitkern_triton_launcher_s_median": statistics.median(
            r["seconds"] for r in res["jitkern_warm_triton_launcher"]),
        "warm_phases_ms": {k: statistics.median(r["phases_ms"][k] for r in res["jitkern_warm_phases"])
                           for k in res["jitkern_warm_phases"][0]["phases_ms"]},
        "dispatch_triton_launcher_us": res["dispatch_triton_launcher"]["jitkern_rms_norm_out_us"],
        "dispatch_ratio_vs_triton_jit": d["jitkern_rms_norm_out_cpu_us"] / d["triton_jit_rms_norm_cpu_us"],
        "dispatch_ratio_vs_torch_add_out": d["jitkern_rms_norm_out_cpu_us"] / d["torch_add_out_cpu_us"],
        "back_to_back_ratio_vs_triton_jit": d["jitkern_rms_norm_out_us"] / d["triton_jit_rms_norm_us"],
        "back_to_back_ratio_vs_torch_add_out": d["jitkern_rms_norm_out_us"] / d["torch_add_out_us"],
        "import_jitkern_ms_best": min(imp) * 1e3,
        "import_jitkern_ms_median": statistics.median(imp) * 1e3,
        "import_pulls_torch": any(r["torch_imported"] for r in res["import"]),
        "ops_ratio_per_kernel": {k: v["ratio_per_kernel_vs_torch_add_out"] for k, v in res["ops"].items()
                                 if isinstance(v, dict)},
    }
    s["floors"] = {
        "warm_start_le_0.1": s["warm_ratio_jitkern_over_triton"] <= 0.1,
        "dispatch_le_0.5_triton_jit": s["dispatch_ratio_vs_triton_jit"] <= 0.5,
        "dispatch_le_1.2_torch_add_out": s["dispatch_ratio_vs_torch_add_out"] <= 1.2,
        "import_le_50ms_no_torch": s["import_jitkern_ms_median"] <= 50 and not s["import_pulls_torch"],
        "every_op_le_1.1_torch_add_out_per_kernel": all(v <= 1.1 for v in s["ops_ratio_per_kernel"].values()),
    }
    return s


def table(res: dict, s: dict) -> str:
    d = res["dispatch"]
    rows = [
        ("warm start, 16 matmul variants (median of %d fresh processes)" % res["runs"], "", ""),
        ("  Triton JIT, Triton cache warm", f"{s['warm_triton_s_median'] * 1e3:9.1f} ms", "anchor"),
        ("  jitkern, jitkern cache warm", f"{s['warm_jitkern_s_median'] * 1e3:9.1f} ms",
         f"{s['warm_ratio_jitkern_over_triton']:.3f}x  (floor <= 0.1)"),
        ("  jitkern, JITKERN_DIRECT_LAUNCH=0 (Triton's launcher)",
         f"{s['warm_jitkern_triton_launcher_s_median'] * 1e3:9.1f} ms",
         f"{s['warm_jitkern_triton_launcher_s_median'] / s['warm_triton_s_median']:.3f}x"),
        ("  jitkern, empty Triton cache (gcc builds 2 stubs)", f"{s['warm_jitkern_empty_triton_cache_s_median'] * 1e3:9.1f} ms",
         f"{s['warm_jitkern_empty_triton_cache_s_median'] / s['warm_triton_s_median']:.3f}x"),
        ("  with triton_baseline.py's clock: Triton / jitkern",
         f"{s['warm_triton_baseline_style_s_median'] * 1e3:.0f} / {s['warm_jitkern_baseline_style_s_median'] * 1e3:.0f} ms",
         f"{s['warm_jitkern_baseline_style_s_median'] / s['warm_triton_baseline_style_s_median']:.3f}x"),
        ("  jitkern warm, by step (median ms): " + ", ".join(f"{k} {v:.1f}" for k, v in s["warm_phases_ms"].items()),
         "", ""),
        ("  Triton cold / jitkern cold", f"{res['triton_cold']['seconds']:.2f} s / {res['jitkern_cold']['seconds']:.2f} s", ""),
        ("dispatch, us per call, " + d["input"] + f"; *_cpu: batches of {BATCH}, GPU drained between", "", ""),
        *[(f"  {k[:-3]}", f"{v:9.2f} us", "") for k, v in d.items() if k.endswith("_us")],
        ("  jitkern_rms_norm_out, JITKERN_DIRECT_LAUNCH=0 (Triton's launcher)",
         f"{s['dispatch_triton_launcher_us']:9.2f} us", ""),
        ("  parts of the jitkern call, each alone:", "", ""),
        *[(f"    {k[:-3]}", f"{v:9.2f} us", "") for k, v in d["diagnostics"].items() if k.endswith("_us")],
        ("  jitkern / Triton JIT (same kernel), CPU-only", "", f"{s['dispatch_ratio_vs_triton_jit']:.3f}x  (floor <= 0.5)"),
        ("  jitkern / torch.add(out=), CPU-only", "", f"{s['dispatch_ratio_vs_torch_add_out']:.3f}x  (floor <= 1.2)"),
        ("  same two, back to back", "",
         f"{s['back_to_back_ratio_vs_triton_jit']:.3f}x, {s['back_to_back_ratio_vs_torch_add_out']:.3f}x"),
        (f"every op, CPU us per call (torch.add(out=) {res['ops']['torch_add_out_cpu_us']:.2f} us per kernel)", "", ""),
        *[(f"  {k} ({v['variant']}, {v['kernels']} kernel{'s' if v['kernels'] > 1 else ''})", f"{v['cpu_us']:9.2f} us",
           f"{v['ratio_per_kernel_vs_torch_add_out']:.3f}x per kernel  (floor <= 1.1)")
          for k, v in res["ops"].items() if isinstance(v, dict)],
        *([(f"same, JITKERN_FAST_CALL=0 (the Python hot path; torch.add(out=) "
            f"{res['ops_python_hot_path']['torch_add_out_cpu_us']:.2f} us)", "", "")] +
          [(f"  {k}", f"{v['cpu_us']:9.2f} us", f"{v['ratio_per_kernel_vs_torch_add_out']:.3f}x per kernel")
           for k, v in res["ops_python_hot_path"].items() if isinstance(v, dict)] if "ops_python_hot_path" in res else []),
        ("import jitkern (best / median of 5)", f"{s['import_jitkern_ms_best']:.1f} / {s['import_jitkern_ms_median']:.1f} ms",
         f"torch imported: {s['import_pulls_torch']}  (floor <= 50 ms, no torch)"),
    ]
    w = max(len(r[0]) for r in rows)
    lines = [f"{res['gpu']}, torch {res['torch']}, triton {res['triton']}, python {res['python']}, {res['date_utc']} UTC"]
    lines += [f"{a:<{w}}  {b:>18}  {c}" for a, b, c in rows]
    lines.append("floors: " + ", ".join(f"{k}={'PASS' if v else 'FAIL'}" for k, v in s["floors"].items()))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    ap.add_argument("--runs", type=int, default=3, help="fresh processes per warm-start measurement")
    ap.add_argument("--json-out", type=Path)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(CHILDREN[a.child](), default=str))
        return 0
    res = run_all(a.runs)
    res["summary"] = summarize(res)
    text = json.dumps(res, indent=1, default=str)
    print(text)
    if a.json_out:
        a.json_out.write_text(text)
    print()
    print(table(res, res["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
