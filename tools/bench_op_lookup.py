"""What looking up every built-in op costs a fresh process (``jitkern.ops.<name>``), CPU or GPU.

    PYTHONPATH=$PWD python3 tools/bench_op_lookup.py [--runs 5] [--out FILE.json]

Each run is a fresh ``python3`` child that imports torch and jitkern, then times, per built-in op:
``spec`` (importing the op's module, ``jitkern.registry.get``), ``lookup`` (``jitkern.ops.<name>``:
what the framework adds, the ``torch.library`` side included), and after all of them once
``register_all`` (``jitkern.torch_ops.register_all()``, what registering every op as a
``torch.library`` custom op costs when something asks for it: a ``torch.compile`` trace, or a
direct ``torch.ops.jitkern.<name>``). Medians over the runs, in ms, are printed and written as JSON.
Nothing is compiled, loaded or launched. The children keep Python bytecode as an installed package
does (one shared ``PYTHONPYCACHEPREFIX``, filled by a first child that is not counted).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
import torch
import jitkern
from jitkern import registry
names = sorted(registry.BUILTIN)
out = {"spec": {}, "lookup": {}}
for n in names:
    t0 = time.perf_counter(); registry.get(n); t1 = time.perf_counter()
    getattr(jitkern.ops, n); t2 = time.perf_counter()
    out["spec"][n] = (t1 - t0) * 1e3
    out["lookup"][n] = (t2 - t1) * 1e3
from jitkern import torch_ops
out["registered_after_lookup"] = sorted(n for n in names if torch_ops.registered(n) is not None)
t0 = time.perf_counter(); torch_ops.register_all(names); out["register_all"] = (time.perf_counter() - t0) * 1e3
out["torch"] = torch.__version__
print(json.dumps(out))
"""


def run_child(pycache: Path) -> dict:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=300)
    if r.returncode != 0:
        raise SystemExit(f"child failed ({r.returncode}):\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict]) -> dict:
    names = sorted(runs[0]["lookup"])
    med = statistics.median
    res = {"torch": runs[0]["torch"], "runs": len(runs),
           "registered_after_lookup": runs[0]["registered_after_lookup"],
           "per_op_ms": {n: {"spec": round(med(r["spec"][n] for r in runs), 3),
                             "lookup": round(med(r["lookup"][n] for r in runs), 3)} for n in names},
           "lookup_total_ms": round(med(sum(r["lookup"].values()) for r in runs), 2),
           "spec_total_ms": round(med(sum(r["spec"].values()) for r in runs), 2),
           "register_all_ms": round(med(r["register_all"] for r in runs), 2)}
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="fresh processes (median)")
    ap.add_argument("--out", type=Path, help="write the summary as JSON here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="jitkern-lookup-") as tmp:
        run_child(Path(tmp))  # writes the bytecode
        res = summarize([run_child(Path(tmp)) for _ in range(args.runs)])
    print(f"torch {res['torch']}, median of {res['runs']} fresh processes (ms)")
    print(f"{'op':24} {'spec import':>12} {'jitkern.ops':>12}")
    for n, v in res["per_op_ms"].items():
        print(f"{n:24} {v['spec']:12.3f} {v['lookup']:12.3f}")
    print(f"{'total':24} {res['spec_total_ms']:12.2f} {res['lookup_total_ms']:12.2f}")
    print(f"registered by the lookups: {len(res['registered_after_lookup'])} of {len(res['per_op_ms'])}; "
          f"register_all afterwards: {res['register_all_ms']:.2f} ms")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
