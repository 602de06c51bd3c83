"""A small in-place op (x = 2x + 1) with host C++ and Triton variants, for the fallback tests.

Declared the way a third-party op is (``OpSpec(plan=...)`` and the dispatcher). Imported by
tests/test_fallback.py and by the second processes it starts. Variants: ``broken`` (C++ including a
header that does not exist), ``raises`` (C++ that writes into x, then returns an error), ``good``
(working C++), ``triton``.
"""
from pathlib import Path

import torch

import jitkern
from jitkern import Candidate, Config, In, Launch
from jitkern.spec import Arg, OpSpec, Variant

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


def plain(x) -> bool:
    return type(x) is torch.Tensor


def make_spec(name: str, order, tag: str = "a", guarded=(), extra_candidates=()) -> OpSpec:
    """The op ``name`` with variants ``order``; ``guarded`` variants take plain tensors only;
    ``extra_candidates`` (Candidates) follow the variants' ones."""

    def plan(call):
        (x,) = call.args
        n = x.numel()
        cands = [Candidate(Launch(Config.make(v, block=BLOCK, tag=tag), (-(-n // BLOCK),), (In("x"), n)),
                           guard=plain if v in guarded else None, guard_doc="plain tensors" if v in guarded else "")
                 for v in order]
        return cands + list(extra_candidates)

    def op(x: torch.Tensor) -> torch.Tensor:
        return jitkern.dispatcher(spec)(x)

    spec = OpSpec(name=name, variants=tuple(VARIANTS[v] for v in order), template_dir=TEMPLATES,
                  fn=op, reference=reference, plan=plan, mutates=("x",),
                  configs=lambda arch: [Config.make(v, block=BLOCK, tag=tag) for v in order],
                  extra={"fallback": True, "guards": {"good": "plain tensors"}})
    return spec


def make_route(spec: OpSpec):
    """``call(x) -> name of the candidate that ran``: the op's dispatcher."""
    return jitkern.dispatcher(spec)


def run(name: str, order, tag: str = "a") -> dict:
    """Run the op once on fresh data; report the variant used, correctness and counters."""
    from jitkern import counters

    x = torch.linspace(-3, 3, 1000)
    want = reference(x.clone())
    used = make_route(make_spec(name, order, tag=tag))(x)
    return {"variant": used, "ok": bool(torch.equal(x, want)), "counters": counters.snapshot()}
