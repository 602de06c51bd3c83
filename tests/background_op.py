"""A registered in-place op (x = 2x + 1) whose preferred variant builds slowly, for the background-build
tests: variant ``slow`` is Triton source built by a builder (kind ``slow_triton``) that sleeps
``BG_OP_BUILD_SLEEP`` seconds first; variant ``triton`` is the same kernel built the usual way.
Both give bit-identical results. Imported by tests/test_background.py and, to build ``slow``, by
jitkern's background worker process.
"""
import os
import time

import torch

import jitkern
from jitkern import Candidate, Config, In, Launch, builders
from jitkern.builders import triton as triton_builder
from jitkern.spec import Arg, OpSpec, Variant

from fallback_op import TEMPLATES

NAME = "bg_scale"
BLOCK = 128
ARGS = (Arg("x_ptr", "*fp32"), Arg("n", "i32"))


class SlowTriton:
    """Triton's builder, after a sleep; ``BG_OP_BUILT`` (a file) gets one line per build."""

    def fingerprint(self, arch):
        return {**triton_builder.fingerprint(arch), "builder": "slow_triton (tests)"}

    def build(self, job):
        time.sleep(float(os.environ.get("BG_OP_BUILD_SLEEP", "0")))
        log = os.environ.get("BG_OP_BUILT")
        if log:
            with open(log, "a") as f:
                f.write(f"{os.getpid()} {job.config.describe()}\n")
        return triton_builder.build(job)

    def load(self, entry, job):
        return triton_builder.load(entry, job)


SLOW_BUILDER = SlowTriton()
builders.KINDS["slow_triton"] = (__name__, "SLOW_BUILDER")


def reference(x):
    return x.mul_(2).add_(1)


def plan(call):
    (x,) = call.args
    n = x.numel()
    grid = (-(-n // BLOCK),)
    return [Candidate(Launch(Config.make(v, block=BLOCK), grid, (In("x"), n))) for v in ("slow", "triton")]


def bg_scale(x: torch.Tensor) -> torch.Tensor:
    jitkern.dispatcher(SPEC)(x)
    return x


SPEC = jitkern.register(OpSpec(
    name=NAME,
    variants=(Variant("slow", "triton.py.j2", "fb_kernel", ARGS, kind="slow_triton"),
              Variant("triton", "triton.py.j2", "fb_kernel", ARGS)),
    template_dir=TEMPLATES, fn=bg_scale, reference=reference, plan=plan, mutates=("x",),
    configs=lambda arch: [Config.make(v, block=BLOCK) for v in ("slow", "triton")],
))
