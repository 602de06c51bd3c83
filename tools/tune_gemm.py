#!/usr/bin/env python3
"""Tune jitkern's gemm on this GPU, or show candidates' compiled resource figures offline.

On a GPU (how jitkern/tuned/sm_90.json was made, on an H100)::

    python tools/tune_gemm.py --out tune.json --write-table jitkern/tuned/sm_90.json

times every candidate that passes the arch rules and budget for each M bucket (shapes of one
bucket are timed together), persists the winners as tuning records in the cache (later processes
use them), prints a table and JSON, and with ``--write-table`` merges the winners into a shipped
table. Offline (no GPU)::

    python tools/tune_gemm.py --offline gfx942,gfx950,sm_90

cross-compiles each bucket's candidates for the named arches and prints shared bytes, registers
and budget status: the figures behind the candidate order in ``jitkern/library/gemm.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: issue 19's gemm shapes: 4096^3 and the decode shapes M in {1, 16, 64, 128} at N=K=4096 and 8192 (the
#: two weight sizes are tuned apart in the decode buckets: gemm.tuning_bucket's size class _w8k)
DEFAULT_SHAPES = ("4096x4096x4096,1x4096x4096,16x4096x4096,1x8192x8192,16x8192x8192,64x4096x4096,64x8192x8192,"
                  "128x4096x4096,128x8192x8192")


def table(rows, header):
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for j, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def tile_text(p):
    text = f"{p['block_m']}x{p['block_n']}x{p['block_k']} g{p['group_m']} w{p['num_warps']} s{p['num_stages']}"
    if p.get("tma"):
        text += f" tma{'/p' if p.get('persistent') else ''}{'/ws' if p.get('warp_spec') else ''}/e{p.get('epi_split', 1)}"
    if p.get("split_k", 1) > 1:
        text += f" splitk{p['split_k']}"
    return text


def precompile(shapes, dtype, b_trans, jobs, arch=None, per_weight=False):
    """Build every candidate tune_op will time, ``jobs`` at a time (each build runs in its own
    worker process), so the timing loop only loads kernels; ``arch``: the build arch (default: this
    GPU's). Returns (built, failed, seconds)."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from jitkern import runtime
    from jitkern.build import get_entry
    from jitkern.errors import JitkernError
    from jitkern.library import gemm
    from jitkern.plan import plan

    t0 = time.time()
    if arch is None:
        _, arch = runtime.arches_for(torch.device("cuda", torch.cuda.current_device()))
    cfgs = set()
    groups = {}
    for s in shapes:
        groups.setdefault(gemm.record_bucket(s, b_trans, exact=per_weight), []).append(s)
    for group in groups.values():
        for t in gemm.tune_candidates(arch, dtype, group, b_trans):  # what tune_args will time
            for (m_, n_, k_) in group:  # the tensors tune_args makes are contiguous
                strides = (k_, k_ if b_trans else n_, n_)
                cfgs.add(gemm.config(dtype, b_trans, gemm.tile_aligned(t, n_, k_, strides), t))

    def build(cfg):
        try:
            get_entry(plan(gemm.SPEC, cfg, arch))
            return True
        except JitkernError:  # over budget or failed: tune() records why when it meets it
            return False

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        ok = list(pool.map(build, sorted(cfgs, key=lambda c: c.describe())))
    return sum(ok), len(ok) - sum(ok), time.time() - t0


def offline(arches, dtype):
    os.environ.pop("TRITON_INTERPRET", None)
    from jitkern import arch as _arch, budget
    from jitkern.build import report
    from jitkern.plan import plan
    from jitkern.library import gemm

    out, rows = [], []
    for a in _arch.parse_list(arches):
        for b, _ in gemm.BUCKETS:
            for tile in gemm.candidates(a.name, dtype, b, tuned=False):  # split-K tiles: sm_90's decode buckets
                st = report(plan(gemm.SPEC, gemm.config(dtype, False, True, tile), a))
                out.append({"arch": a.name, "bucket": b, "params": tile, **st})
                rows.append([a.name, b, tile_text(tile), st["shared_bytes"], st["budget_bytes"], st["regs"],
                             st["spills"], st["status"]])
    table(rows, ["arch", "bucket", "tile", "shared B", "budget B", "regs", "spills", "status"])
    return out


def tune(shapes_text, dtype, b_trans, write_table, jobs=8, per_weight=False):
    import torch

    from jitkern import tuning

    shapes = tuning.parse_shapes(shapes_text)
    if jobs > 1:
        built, failed, secs = precompile(shapes, dtype, b_trans, jobs, per_weight=per_weight)
        print(f"precompiled {built} candidates ({failed} over budget or failed) in {secs:.1f} s, {jobs} at a time")
    t0 = time.time()
    records = tuning.tune_op("gemm", shapes, dtype, b_trans=b_trans, force=True, exact=per_weight)
    rows = []
    for rec in records:
        flops = sum(2 * m * n * k for m, n, k in rec["shapes"])
        for r in rec["results"]:
            ms = r.get("ms")
            rows.append([rec["bucket"], tile_text(r["params"]), f"{ms:.4f}" if ms else "-",
                         f"{flops / ms / 1e9:.1f}" if ms else "-",
                         "WINNER" if r["params"] == rec["params"] and ms else
                         ("over budget" if "rejected" in r else ("failed" if "failed" in r else ""))])
    table(rows, ["bucket", "tile", "ms (all shapes)", "TFLOP/s", ""])
    print(f"tuned {len(records)} buckets in {time.time() - t0:.1f} s on {torch.cuda.get_device_name()}")
    if write_table:
        path = Path(write_table)
        arch_name = records[0]["arch"]
        doc = json.loads(path.read_text()) if path.is_file() else {}
        doc["arch"] = arch_name
        doc["source"] = ("tuned with tools/tune_gemm.py (device, shapes, triton version and date per entry; "
                         "<bucket>_nk: B = w.t() of a row-major [N, K] weight; fp16 entries marked from=bf16 reuse "
                         "the bf16 winners: same 16-bit tile economics)")
        ops = doc.setdefault("ops", {}).setdefault("gemm", {})
        for rec in records:
            ops.setdefault(dtype, {})[rec["bucket"]] = tuning.table_entry(rec)
            if dtype == "bf16":
                ops.setdefault("fp16", {})[rec["bucket"]] = {**tuning.table_entry(rec), "from": "bf16"}
        path.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {path}")
    return records


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"MxNxK,... (default {DEFAULT_SHAPES})")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    p.add_argument("--b-trans", action="store_true", help="B is the transpose of a row-major [N, K] weight")
    p.add_argument("--per-weight", action="store_true",
                   help="one record per M bucket and weight shape N x K (<bucket>_n<N>k<K>[_nk]: what a model's "
                        "own shapes look up first) instead of per bucket and size class")
    p.add_argument("--write-table", metavar="PATH", help="merge the winners into this shipped table JSON")
    p.add_argument("--offline", metavar="ARCHES", help="no GPU: compiled figures of every candidate for these arches")
    p.add_argument("--out", metavar="FILE", help="write the records / figures as JSON")
    p.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                   help="candidates compiled in parallel before timing (default min(8, cores)); 1: compile as timed")
    args = p.parse_args(argv)
    result = offline(args.offline, args.dtype) if args.offline else tune(args.shapes, args.dtype, args.b_trans,
                                                                        args.write_table, args.jobs, args.per_weight)
    text = json.dumps(result, indent=1, sort_keys=True, default=str)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
