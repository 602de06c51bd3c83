"""Probe: does programmatic dependent launch (PDL) shorten a CUDA-graph chain of Triton kernels? (GPU only)

    python3 tools/probe_pdl.py

A graph of 20 x (one [M, 4096] x [4096, 4096]^T gemm, then three row RMS norms), captured with and
without ``launch_pdl=True`` (each kernel then calls ``gdc_wait`` and ``gdc_launch_dependents`` first),
at M = 1, 32 and 128 rows. Prints the replay time per kernel (median of 30 replays) with and without,
and whether both give the same bits. Measured 2026-12-03 on an H200 (docs/benchmarks.md, model load):
0.81x and 0.84x at 1 and 32 rows, 1.32x at 128 rows, so jitkern does not launch with PDL.
"""
import torch
import triton
import triton.language as tl
from triton.language.extra import cuda as tlcuda


@triton.jit
def mm(a, b, c, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        tlcuda.gdc_wait()
        tlcuda.gdc_launch_dependents()
    pm, pn = tl.program_id(0), tl.program_id(1)
    rm = pm * BM + tl.arange(0, BM); rn = pn * BN + tl.arange(0, BN); rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), tl.float32)
    for k in range(0, K, BK):
        x = tl.load(a + rm[:, None] * K + (k + rk)[None, :])
        w = tl.load(b + rn[:, None] * K + (k + rk)[None, :])
        acc = tl.dot(x, tl.trans(w), acc)
    tl.store(c + rm[:, None] * N + rn[None, :], acc.to(tl.bfloat16))


@triton.jit
def norm(x, y, N, BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        tlcuda.gdc_wait()
        tlcuda.gdc_launch_dependents()
    r = tl.program_id(0)
    o = tl.arange(0, BLOCK)
    v = tl.load(x + r * N + o).to(tl.float32)
    v = v * tl.rsqrt(tl.sum(v * v) / N + 1e-6)
    tl.store(y + r * N + o, v.to(tl.bfloat16))


def chain(pdl, xs, w, M, N, reps):
    x, h = xs
    for _ in range(reps):
        mm[(M // 128, N // 64)](x, w, h, M, N, N, 128, 64, 64, pdl, num_warps=4, num_stages=4, launch_pdl=pdl)
        norm[(M,)](h, x, N, 4096, pdl, num_warps=8, launch_pdl=pdl)
        norm[(M,)](x, h, N, 4096, pdl, num_warps=8, launch_pdl=pdl)
        norm[(M,)](h, x, N, 4096, pdl, num_warps=8, launch_pdl=pdl)


def run(M, pdl, reps=20):
    N = 4096
    torch.manual_seed(0)
    x = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    h = torch.empty_like(x)
    w = torch.randn(N, N, device="cuda", dtype=torch.bfloat16) / 64
    x0 = x.clone()
    chain(pdl, (x, h), w, M, N, 1)
    torch.cuda.synchronize()
    x.copy_(x0)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        chain(pdl, (x, h), w, M, N, 1)
        torch.cuda.synchronize()
        with torch.cuda.graph(g, stream=s):
            chain(pdl, (x, h), w, M, N, reps)
    x.copy_(x0)
    g.replay(); torch.cuda.synchronize()
    out = x.clone()
    st, en = torch.cuda.Event(True), torch.cuda.Event(True)
    ts = []
    for _ in range(30):
        st.record(); g.replay(); en.record(); torch.cuda.synchronize(); ts.append(st.elapsed_time(en))
    ts.sort()
    return ts[len(ts) // 2] * 1000 / (reps * 4), out


def main():
    for M in (1, 32, 128):
        a, oa = run(M, False)
        b, ob = run(M, True)
        print(f"M={M}: per kernel {a:.2f} us without PDL, {b:.2f} us with; ratio {b / a:.3f}; same result: {torch.equal(oa, ob)}")


if __name__ == "__main__":
    main()
