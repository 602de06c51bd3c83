"""A small in-place op (x = 2x + 1) with host C++ and Triton variants, for the fallback tests.

Imported by tests/test_fallback.py and by the second processes it starts. Variants: ``broken`` (C++
including a header that does not exist), ``raises`` (C++ that writes into x, then returns an error),
``good`` (working C++), ``triton``.
"""
from pathlib import Path

import torch

from jitkern import fallback
from jitkern.spec import Arg, Config, OpSpec, Variant

TEMPLATES = Path(__file__).resolve().parent / "fallback_templates"
BLOCK = 128
ARGS = (Arg("x_ptr", "*fp32"), Arg("n", "i32"))
VARIANTS = {
    "broken": Variant("broken", "broken.cpp.j2", "fb_kernel", ARGS, kind="cpp"),
    "raises": Variant("raises", "raises.cpp.j2", "fb_kernel", ARGS, kind="cpp"),
    "good": Variant("good", "good.cpp.j2", "fb_kernel", ARGS, kind="cpp"),
    "triton": Variant("triton", "triton.py.j2", "fb_kernel", ARGS),
}


def reference(x):
    return x.mul_(2).add_(1)


def make_spec(name: str, order, tag: str = "a") -> OpSpec:
    return OpSpec(name=name, variants=tuple(VARIANTS[v] for v in order), template_dir=TEMPLATES,
                  fn=reference, reference=reference,
                  configs=lambda arch: [Config.make(v, block=BLOCK, tag=tag) for v in order],
                  extra={"fallback": True, "guards": {"good": "plain tensors"}})


def _launch(k, x):
    k[(-(-x.numel() // BLOCK),)](x, x.numel())


def plain(x) -> bool:
    return type(x) is torch.Tensor


def make_route(spec: OpSpec, guarded=(), tag: str = "a") -> fallback.Route:
    cands = []
    for v in spec.variants:
        cfg = Config.make(v.name, block=BLOCK, tag=tag)
        cands.append(fallback.Candidate(cfg, _launch, guard=plain if v.name in guarded else None,
                                        guard_doc="plain tensors" if v.name in guarded else ""))
    return fallback.route(spec, cands, torch.device("cpu"), inplace=(0,))


def run(name: str, order, tag: str = "a") -> dict:
    """Run the op once on fresh data; report the variant used, correctness and counters."""
    from jitkern import counters

    x = torch.linspace(-3, 3, 1000)
    want = reference(x.clone())
    used = make_route(make_spec(name, order), tag=tag)(x)
    return {"variant": used, "ok": bool(torch.equal(x, want)), "counters": counters.snapshot()}
