"""Record the example manifest: the call signatures of the example decoder at Qwen3-8B shapes.

    PYTHONPATH=$PWD python tools/record_example_manifest.py [-o examples/manifests/qwen3_8b.jsonl]
        [--phases 1x16,8x16] [--layers 2] [--steps 1] [--vocab N] [--device cuda]

examples/jitkern_decoder (issue 16) at ``qwen3_8b_shapes`` runs on the CPU through Triton's
interpreter with ``JITKERN_ARCH=sm_90`` and ``JITKERN_RECORD=OUT``: every op call the model makes is
real (its results are the model's), and each distinct signature is appended once per process. Each
phase ``BxT`` is its own process (they run in parallel and append to one file): batch ``B``, a
``T``-token prompt (prefill: gemm M = B*T) then ``--steps`` decode steps (M = B). Two layers (one
dense, one MoE) give every signature a deeper model makes: all layers of a kind have the same shapes.

The manifest holds no arch and no tile: ``jitkern prebuild --manifest OUT --arch gfx942,gfx950,sm_90``
decides those per arch with each op's own plan. Interpreted kernels at these shapes are slow (the
LM head alone takes minutes on one core); ``--device cuda`` records on a GPU instead (seconds; the
signatures are the same: they hold shapes, strides and dtypes, not the device). Run once per change
of the model, and commit its output.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "examples" / "manifests" / "qwen3_8b.jsonl"


def phase(batch: int, prompt: int, steps: int, layers: int, vocab: int | None, device: str = "cpu"):
    """One recording process: the model's prefill and decode steps (real calls; interpreted on the CPU).
    Returns the logits of every step, stacked."""
    sys.path.insert(0, str(REPO / "examples"))
    import torch
    from jitkern_decoder import JitkernDecoder, make_weights, qwen3_8b_shapes

    cfg = qwen3_8b_shapes(layers=layers)
    if vocab:
        cfg = cfg.with_(vocab=vocab)
    t0 = time.time()
    model = JitkernDecoder(cfg, make_weights(cfg, device=device), batch)
    g = torch.Generator().manual_seed(batch * 1000 + prompt)
    tokens = torch.randint(0, cfg.vocab, (batch, prompt), generator=g).to(device)
    logits = [model.prefill(tokens)]
    pos = torch.full((batch,), prompt, dtype=torch.int64, device=device)
    for _ in range(steps):
        logits.append(model.decode(logits[-1].float().argmax(-1), pos))
        pos = pos + 1
    out = torch.stack([x.float().cpu() for x in logits])
    assert torch.isfinite(out).all()
    print(f"phase {batch}x{prompt}: {time.time() - t0:.0f} s", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-o", "--out", default=str(DEFAULT_OUT), help="manifest to write (replaced)")
    ap.add_argument("--phases", default="1x16,8x16", help="comma-separated BATCHxPROMPT, one process each")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=1, help="decode steps after each prefill")
    ap.add_argument("--vocab", type=int, help="override the vocabulary size (default: Qwen3-8B's 151936)")
    ap.add_argument("--device", default="cpu", help="cpu (Triton's interpreter) or cuda")
    ap.add_argument("--phase", help=argparse.SUPPRESS)  # internal: run one phase in this process
    args = ap.parse_args(argv)
    if args.phase:
        b, t = (int(v) for v in args.phase.split("x"))
        phase(b, t, args.steps, args.layers, args.vocab, args.device)
        return 0
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    where = "Triton interpreter" if args.device == "cpu" else f"on {args.device}"
    header = (f"# jitkern manifest: examples/jitkern_decoder at qwen3_8b_shapes(layers={args.layers}"
              + (f", vocab={args.vocab}" if args.vocab else "") + f"), bf16, phases {args.phases} (batch x prompt, "
              f"then {args.steps} decode step(s))\n# recorded by tools/record_example_manifest.py on "
              f"{time.strftime('%Y-%m-%d', time.gmtime())} ({where}, JITKERN_ARCH=sm_90); "
              "one JSON line per call signature, no arch, no tile\n")
    out.write_text(header)
    env = dict(os.environ, JITKERN_ARCH="sm_90", JITKERN_RECORD=str(out))
    env["TRITON_INTERPRET"] = "1" if args.device == "cpu" else "0"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("JITKERN_STRICT", None)
    t0 = time.time()
    extra = ["--layers", str(args.layers), "--steps", str(args.steps), "--device", args.device] + (["--vocab", str(args.vocab)] if args.vocab else [])
    procs = [subprocess.Popen([sys.executable, __file__, "--phase", p, *extra], env=env)
             for p in args.phases.split(",")]
    rcs = [p.wait() for p in procs]
    if any(rcs):
        print(f"record_example_manifest: a phase failed (exit codes {rcs})", file=sys.stderr)
        return 1
    sys.path.insert(0, str(REPO))
    from jitkern import manifest

    m = manifest.read(out)
    lines = sum(1 for ln in out.read_text().splitlines() if ln.strip() and not ln.startswith("#"))
    print(f"{out}: {len(m)} distinct signatures ({lines} lines from {len(procs)} processes) of "
          f"{', '.join(m.ops())} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
