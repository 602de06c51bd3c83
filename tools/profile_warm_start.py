"""jitkern's own cost of a warm process's first calls (issue 16), on the CPU or a GPU.

    PYTHONPATH=$PWD python3 tools/profile_warm_start.py [--layers 4] [--runs 5] [--gemms 24]
                                                        [--arch sm_90] [--profile FILE] [--out FILE.json]

A first child fills a fresh jitkern cache (``--cache-dir``, default a temporary directory) by running the
example decoder's prefill (examples/jitkern_decoder, the tiny CPU config with ``--layers`` layers) and
``--gemms`` distinct gemm signatures once. Then ``--runs`` fresh children each run the same calls on
that warm cache and time only jitkern's own work on the first call of each signature:

* ``decide``: ``Dispatcher._settle`` (the op's plan, the arch's rules, the route), and
* ``acquire``: ``Route._acquire`` (``jitkern.runtime.kernel``: plan, cache lookup, load; and the bind),

never the kernels' execution (on the CPU: Triton's interpreter), nor torch's own ops. On the CPU, Triton
is imported before the clock (the interpreter needs it; a warm GPU load imports none). ``kernel`` is the
part of ``acquire`` inside ``jitkern.runtime.kernel``, ``load`` the part of that loading entries (on the
CPU: executing the kernel module for Triton's interpreter, a cost GPU loads do not have; so
``*_own_but_load_ms`` is the closer figure for what a GPU process spends deciding and looking up).

Figures are medians over the runs, in ms, for the decoder's first forward (``decoder_*``) and for the
gemm signatures (``gemm_*``); on a busy machine the fastest run is the steadier figure (printed too).
``--profile`` writes a cProfile of those regions only (one more child, not counted). ``--jitkern
CHECKOUT`` runs another checkout's jitkern on the same cache (before/after comparisons; plan-index
records are per checkout, since they hash the template paths: an uncounted first child writes them).

Triton's interpreter is switched on (``TRITON_INTERPRET=1``) for CPU runs (``--device cpu``, the
default). ``--arch sm_90`` (``JITKERN_ARCH``) chooses configurations as for that GPU (its tile lists and
rules; the selected config's artifact is also built and looked up for that arch, for its budget check),
which is closer to what a GPU process decides; the filling child then compiles GPU binaries (no GPU
needed). The children keep Python bytecode as an installed package does (one shared
``PYTHONPYCACHEPREFIX``, filled by the filling child).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


# ---------------------------------------------------------------------------------------------------
# child
# ---------------------------------------------------------------------------------------------------
class Regions:
    """Time (and optionally cProfile) the first-call regions: ``Dispatcher._settle``,
    ``Route._acquire`` and ``runtime.kernel`` inside it."""

    def __init__(self, profile=None):
        from jitkern import dispatch, fallback, runtime

        self.acc = {"decide": [0.0, 0], "acquire": [0.0, 0], "kernel": [0.0, 0], "load": [0.0, 0]}
        self.prof, self.depth = profile, 0
        self._wrap(dispatch.Dispatcher, "_settle", "decide")
        self._wrap(fallback.Route, "_acquire", "acquire")
        self._wrap(runtime, "kernel", "kernel")
        self._wrap(runtime, "load", "load")  # what runtime.kernel calls to load an entry

    def _wrap(self, owner, name, what):
        inner, acc, perf = getattr(owner, name), self.acc[what], time.perf_counter

        def timed(*a, **kw):
            if self.depth == 0 and self.prof is not None:
                self.prof.enable()
            self.depth += 1
            t = perf()
            try:
                return inner(*a, **kw)
            finally:
                acc[0] += perf() - t
                acc[1] += 1
                self.depth -= 1
                if self.depth == 0 and self.prof is not None:
                    self.prof.disable()
        setattr(owner, name, timed)

    def snapshot(self) -> dict:
        return {k: list(v) for k, v in self.acc.items()}


def _diff(after: dict, before: dict) -> dict:
    out = {}
    for k in after:
        out[f"{k}_ms"] = (after[k][0] - before[k][0]) * 1e3
        out[f"{k}_calls"] = after[k][1] - before[k][1]
    return out


def gemm_shapes(n: int) -> list:
    """``n`` distinct gemm signatures: (M, N, K, b_trans) over the M buckets, both B layouts,
    aligned and unaligned N/K (so several distinct kernels, and many signatures per kernel)."""
    ms, nks = (1, 8, 16, 32, 64, 100, 128, 200), ((64, 64), (96, 64), (128, 128), (72, 40), (64, 128), (48, 80))
    out = []
    for i in range(n):
        m = ms[i % len(ms)]
        nn, k = nks[(i // len(ms)) % len(nks)]
        out.append((m, nn + 16 * (i // (len(ms) * len(nks))), k, bool(i % 2)))
    return out


def child(args) -> dict:
    import torch

    dev = args.device
    sys.path.insert(0, str(EXAMPLES))
    from jitkern_decoder import TINY, JitkernDecoder, make_weights

    import jitkern

    if dev == "cpu":  # the interpreter's Triton import is a CPU-only cost (a warm GPU load imports no Triton)
        from jitkern.triton_import import ensure_imported

        ensure_imported()
    prof = None
    if args.profile:
        import cProfile

        prof = cProfile.Profile()
    regions = Regions(prof)
    cfg = TINY.with_(layers=args.layers)
    w = make_weights(cfg, device=dev, seed=0)
    model = JitkernDecoder(cfg, w, 1)
    prompt = torch.randint(0, cfg.vocab, (1, 16), generator=torch.Generator().manual_seed(1)).to(dev)
    out = {}
    s0 = regions.snapshot()
    t = time.perf_counter()
    model.prefill(prompt).float().cpu()
    out["decoder_first_forward_ms"] = (time.perf_counter() - t) * 1e3
    s1 = regions.snapshot()
    out.update({f"decoder_{k}": v for k, v in _diff(s1, s0).items()})
    gemm = jitkern.ops.gemm
    for m, n, k, b_trans in gemm_shapes(args.gemms):
        a = torch.randn(m, k, dtype=torch.bfloat16, device=dev)
        b = torch.randn(n, k, dtype=torch.bfloat16, device=dev).t() if b_trans else \
            torch.randn(k, n, dtype=torch.bfloat16, device=dev)
        gemm(a, b)
    s2 = regions.snapshot()
    out.update({f"gemm_{k}": v for k, v in _diff(s2, s1).items()})
    for part in ("decoder", "gemm"):
        out[f"{part}_own_ms"] = out[f"{part}_decide_ms"] + out[f"{part}_acquire_ms"]
        out[f"{part}_own_but_load_ms"] = out[f"{part}_own_ms"] - out[f"{part}_load_ms"]
    out["stats"] = {k: v for k, v in jitkern.stats().items() if v}
    if prof is not None:
        import io
        import pstats

        text = io.StringIO()
        for key in ("cumulative", "tottime"):
            pstats.Stats(prof, stream=text).sort_stats(key).print_stats(60)
        Path(args.profile).write_text(text.getvalue())
    return out


# ---------------------------------------------------------------------------------------------------
# parent
# ---------------------------------------------------------------------------------------------------
def _env(args, cache: Path, pycache: Path) -> dict:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (args.jitkern or str(REPO), env.get("PYTHONPATH", "")) if p)
    env["JITKERN_CACHE_DIR"] = str(cache)
    if args.device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    if args.arch:
        env["JITKERN_ARCH"] = args.arch
    else:
        env.pop("JITKERN_ARCH", None)
    return env


def _run_child(args, env, extra=()) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", "--device", args.device, "--layers",
            str(args.layers), "--gemms", str(args.gemms), *extra]
    p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1800)
    if p.returncode != 0:
        raise SystemExit(f"child failed (rc {p.returncode}):\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--arch", default=None, help="JITKERN_ARCH for the children (e.g. sm_90 on the CPU)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--gemms", type=int, default=24, help="distinct gemm signatures after the decoder")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--cache-dir", default=None, help="the warm cache (filled first if it does not exist)")
    ap.add_argument("--profile", default=None, help="also one child under cProfile (first-call regions only)")
    ap.add_argument("--out", default=None, help="write the figures as JSON")
    ap.add_argument("--jitkern", default=None, metavar="CHECKOUT",
                    help="the jitkern the children import (default: this checkout), to compare two on one cache")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="jk-warm-start-"))
    try:
        cache = Path(args.cache_dir) if args.cache_dir else tmp / "cache"
        env = _env(args, cache, tmp / "pycache")
        fill = None
        if not cache.exists():
            t = time.perf_counter()
            fill = _run_child(args, env)
            print(f"filled {cache} in {time.perf_counter() - t:.1f} s ({fill['stats']})", flush=True)
        else:  # a first child, not counted, compiles the modules' bytecode (as filling the cache does)
            _run_child(args, env)
        runs = [_run_child(args, env) for _ in range(args.runs)]
        if args.profile:
            _run_child(args, env, ["--profile", str(Path(args.profile).absolute())])
        keys = [k for k, v in runs[0].items() if isinstance(v, (int, float))]
        med = {k: statistics.median(r[k] for r in runs) for k in keys}
        res = {"device": args.device, "arch": args.arch, "layers": args.layers, "gemms": args.gemms,
               "runs": args.runs, "median": med, "all": runs, "fill_stats": fill and fill["stats"],
               "warm_stats": runs[0]["stats"]}
        for part in ("decoder", "gemm"):
            print(f"{part}: jitkern's own first-call time {med[f'{part}_own_ms']:.2f} ms "
                  f"(decide {med[f'{part}_decide_ms']:.2f} ms over {med[f'{part}_decide_calls']:.0f} signatures, "
                  f"acquire {med[f'{part}_acquire_ms']:.2f} ms over {med[f'{part}_acquire_calls']:.0f}, "
                  f"of which runtime.kernel {med[f'{part}_kernel_ms']:.2f} ms over "
                  f"{med[f'{part}_kernel_calls']:.0f} calls, load {med[f'{part}_load_ms']:.2f} ms); fastest run "
                  f"{min(r[f'{part}_own_ms'] for r in runs):.2f} ms; without loads {med[f'{part}_own_but_load_ms']:.2f} ms "
                  f"(fastest {min(r[f'{part}_own_but_load_ms'] for r in runs):.2f})", flush=True)
        print(f"warm run stats: {runs[0]['stats']}")
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=1))
    finally:
        if not args.cache_dir:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(tmp / "pycache", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
