"""Per-kernel GPU time of one decode step: the jitkern model replayed from a CUDA graph, and the PyTorch
reference under ``torch.compile(mode="reduce-overhead")`` (GPU only).

    PYTHONPATH=$PWD python3 tools/profile_decode.py --layers 4 --batches 1,32,128 --out FILE.json
                                                   [--prompt 128] [--steps 10] [--top 20]
                                                   [--impls jitkern_cuda_graph,reference_torch_compile]

The models are built as ``tools/bench_model_load.py``'s decode figures build them (its ``_cfg`` and
``_graph``): examples/jitkern_decoder at Qwen3-8B shapes cut to ``--layers`` layers (every second one
MoE-shaped), bf16, random weights, a ``--prompt``-token prefill per sequence, then one decode step
per sequence at position ``--prompt``. For each batch and each case (``--impls``):

* ``jitkern_cuda_graph``: ``JitkernDecoder.decode`` captured in one CUDA graph, replayed;
* ``reference_torch_compile``: ``ReferenceDecoder.decode`` (bf16) through
  ``torch.compile(mode="reduce-overhead")`` (Inductor's kernels, cuBLAS, CUDA graphs), after 3 warm
  calls (record, then replays);
* ``jitkern_eager`` / ``reference_eager`` (not in the default): the same steps without graphs.

``--steps`` steps run under ``torch.profiler`` (CUDA activity only); every GPU record (kernels,
memcpy, memset) of those steps is summed by name and divided by ``--steps``: per step, each
kernel's launch count, total us and share of the step's summed GPU time; the top ``--top`` rows per
case are printed and written, the rest summed as ``other``. ``step_ms`` is the step's wall time
outside the profiler (CUDA events, mean of ``--steps`` steps): next to ``gpu_us`` (the summed kernel
time), it shows how much of the step the GPU sat idle. The JSON is rewritten after every case.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent

IMPLS = ("jitkern_cuda_graph", "reference_torch_compile", "jitkern_eager", "reference_eager")
DEFAULT_IMPLS = ("jitkern_cuda_graph", "reference_torch_compile")
#: Chrome-trace categories of GPU work (torch.profiler / Kineto).
GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def _int_list(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def _impl_list(s: str) -> list[str]:
    out = [x for x in s.split(",") if x]
    bad = [x for x in out if x not in IMPLS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown case(s) {bad}; choose from {', '.join(IMPLS)}")
    return out


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batches", type=_int_list, default=[1, 32, 128])
    ap.add_argument("--prompt", type=int, default=128, help="prefill tokens per sequence (the decode context)")
    ap.add_argument("--steps", type=int, default=10, help="decode steps profiled per case (figures are per step)")
    ap.add_argument("--top", type=int, default=20, help="kernels listed per case")
    ap.add_argument("--impls", type=_impl_list, default=list(DEFAULT_IMPLS), help=f"cases, of {', '.join(IMPLS)}")
    ap.add_argument("--out", type=Path, required=True, help="JSON written here")
    # smoke test of the script on a CPU (tests): the tiny config, eager cases, CPU ops in place of kernels
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help=argparse.SUPPRESS)
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.steps < 1 or args.top < 1 or not args.batches:
        ap.error("--steps and --top must be >= 1 and --batches non-empty")
    if args.device == "cpu" and (not args.tiny or set(args.impls) - {"jitkern_eager", "reference_eager"}):
        ap.error("--device cpu is a smoke test: --tiny, and only the eager cases")
    return args


def gpu_records(trace: dict, categories=GPU_CATEGORIES) -> list[tuple[str, float]]:
    """``(name, duration us)`` of every GPU record in a Chrome trace (``export_chrome_trace``'s JSON)."""
    events = trace.get("traceEvents", trace) if isinstance(trace, dict) else trace
    return [(e["name"], float(e.get("dur", 0.0))) for e in events
            if e.get("ph") == "X" and e.get("cat") in categories]


def kernel_table(records, steps: int, top: int) -> dict:
    """Per step: ``{"gpu_us", "kernels": [{"name", "count", "total_us", "share"}, ...top], "other":
    {...}, "distinct"}`` from ``records`` of ``steps`` steps, largest total first."""
    count, total = defaultdict(int), defaultdict(float)
    for name, dur in records:
        count[name] += 1
        total[name] += dur
    gpu = sum(total.values())
    rows = [{"name": n, "count": count[n] / steps, "total_us": total[n] / steps,
             "share": (total[n] / gpu) if gpu else 0.0} for n in sorted(total, key=lambda n: (-total[n], n))]
    rest = rows[top:]
    return {"gpu_us": gpu / steps, "distinct": len(rows), "launches": sum(count.values()) / steps,
            "kernels": [_rounded(r) for r in rows[:top]],
            "other": _rounded({"name": f"({len(rest)} others)", "count": sum(r["count"] for r in rest),
                               "total_us": sum(r["total_us"] for r in rest),
                               "share": sum(r["share"] for r in rest)})}


def _rounded(r: dict) -> dict:
    return {**r, "count": round(r["count"], 2), "total_us": round(r["total_us"], 2), "share": round(r["share"], 4)}


def format_case(case: dict, width: int = 96) -> str:
    t = case["table"]
    head = (f"batch {case['batch']} {case['impl']}: {t['gpu_us']:.1f} us GPU per step in {t['launches']:.0f} "
            f"launches, step {case['step_ms'] * 1e3:.1f} us wall")
    lines = [head, f"  {'kernel':{width}} {'count':>6} {'total us':>10} {'share':>7}"]
    for r in t["kernels"] + ([t["other"]] if t["other"]["count"] else []):
        name = r["name"] if len(r["name"]) <= width else r["name"][:width - 3] + "..."
        lines.append(f"  {name:{width}} {r['count']:6.1f} {r['total_us']:10.2f} {r['share'] * 100:6.1f}%")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------
def profile_step(step, steps: int, top: int, device: str = "cuda") -> tuple[dict, float]:
    """Run ``step()`` ``steps`` times under torch.profiler: (kernel table, wall ms of a step outside it)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t = time.perf_counter()
    if cuda:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
    for _ in range(steps):
        step()
    if cuda:
        b.record()
        b.synchronize()
        step_ms = a.elapsed_time(b) / steps
    else:
        step_ms = (time.perf_counter() - t) * 1e3 / steps
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
        sync()
    with tempfile.TemporaryDirectory(prefix="profile-decode-") as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    return kernel_table(gpu_records(trace, GPU_CATEGORIES if cuda else ("cpu_op",)), steps, top), step_ms


def _case_steps(impl: str, model, ref, tok, pos, graph):
    import functools

    import torch

    if impl == "jitkern_cuda_graph":
        return graph(model, tok, pos)
    if impl == "jitkern_eager":
        return lambda: model.decode(tok, pos)
    if impl == "reference_eager":
        return lambda: ref.decode(tok, pos)
    return functools.partial(torch.compile(ref.decode, mode="reduce-overhead"), tok, pos)


def run(args) -> dict:
    import torch

    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("profile_decode.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    sys.path.insert(0, str(HERE))
    from bench_model_load import _cfg, _graph, decode_setup  # the same set-up as the decode figures there

    t_start = time.perf_counter()
    cfg = _cfg(args)
    from jitkern_decoder import make_weights, rel_err

    import triton

    res = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__, "triton": triton.__version__,
           "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "argv": sys.argv[1:],
           "config": {"layers": cfg.layers, "hidden": cfg.hidden, "vocab": cfg.vocab, "prompt": args.prompt,
                      "experts": cfg.experts, "topk": cfg.topk}, "steps": args.steps, "cases": []}

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1) + "\n")

    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    if dev == "cuda":  # start the profiler (CUPTI) once before any graph is captured, so it sees them made
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]):
            torch.zeros(1, device="cuda").add_(1)
            sync()
    w = make_weights(cfg, device=dev, seed=0)
    for b in args.batches:
        model, ref, tok, pos, want = decode_setup(cfg, w, b, args.prompt, dev)
        for impl in args.impls:
            t = time.perf_counter()
            case = {"batch": b, "impl": impl}
            try:
                step = _case_steps(impl, model, ref, tok, pos, _graph)
                for _ in range(3):
                    got = step()
                sync()
                case["setup_s"] = round(time.perf_counter() - t, 2)
                case["rel_err_vs_ref_eager"] = rel_err(got, want)
                case["table"], case["step_ms"] = profile_step(step, args.steps, args.top, dev)
                if not case["table"]["kernels"]:
                    case["error"] = "the profiler recorded no GPU work for these steps (CUPTI activity missing?)"
            except Exception as e:  # report it; the other cases still run
                case["error"] = f"{type(e).__name__}: {e}"[:2000]
                traceback.print_exc()
            res["cases"].append(case)
            save()
            print(format_case(case) if "table" in case else f"batch {b} {impl}: {case['error']}", flush=True)
            print(flush=True)
        del model, ref
        if dev == "cuda":
            torch.cuda.empty_cache()
    res["wall_s"] = round(time.perf_counter() - t_start, 1)
    save()
    return res


def main(argv=None) -> int:
    args = parse_args(argv)
    res = run(args)
    print(f"{len(res['cases'])} cases in {res['wall_s']} s; results: {args.out}", flush=True)
    return 1 if any("error" in c for c in res["cases"]) else 0


if __name__ == "__main__":
    sys.exit(main())
