"""An op library outside jitkern: declares `scale_add` (out = alpha * x + y) with its own template."""
from pathlib import Path
from typing import Optional

import torch

import jitkern
from jitkern import Candidate, Config, In, Launch, checks

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def reference(x, y, alpha=1.0, out=None):
    return (alpha * x.float() + y.float()).to(x.dtype)


def configs(arch):  # everything prebuild builds for an arch
    for dtype in ("bf16", "fp16", "fp32"):
        yield Config.make("triton", dtype=dtype, block=1024, num_warps=4)


def plan(call):  # once per call signature: validate, then say what to launch
    x, y, alpha, out = call.args
    for name, t in (("x", x), ("y", y), ("out", out)):
        checks.tensor("scale_add", name, t, dtypes=DTYPES, like=x)
        checks.same_dtype("scale_add", name, t, x, "x")
        checks.shape("scale_add", name, t, x.shape)
        checks.contiguous("scale_add", name, t)
    n = x.numel()
    if n == 0:
        return None
    tile = call.tiles([{"block": 1024, "num_warps": 4}])[0]  # arch rules, JITKERN_SCALE_ADD_* overrides
    cfg = Config.make("triton", dtype=checks.TRITON_TYPE[x.dtype], **tile)
    return Candidate(Launch(cfg, grid=(-(-n // tile["block"]),), args=(In("x"), In("y"), In("out"), n, In("alpha"))))


def scale_add(x: torch.Tensor, y: torch.Tensor, alpha: float = 1.0,
              out: Optional[torch.Tensor] = None) -> torch.Tensor:
    if out is None:
        out = torch.empty_like(x)
    _dispatch(x, y, alpha, out)
    return out


SPEC = jitkern.register(jitkern.OpSpec(
    name="scale_add",
    variants=(jitkern.Variant("triton", "scale_add.py.j2", "scale_add_kernel", args=(
        jitkern.Arg("x", "*{dtype}"), jitkern.Arg("y", "*{dtype}"), jitkern.Arg("out", "*{dtype}"),
        jitkern.Arg("n", "i32"), jitkern.Arg("alpha", "fp32"))),),
    template_dir=Path(__file__).parent / "templates",
    fn=scale_add, reference=reference, configs=configs, plan=plan,
    tunables={"block": (256, 512, 1024, 2048), "num_warps": (1, 2, 4, 8)},
    scalars={"alpha": jitkern.Scalar(float)},
    outputs=("out",), alloc=lambda x, y, alpha=1.0, out=None: {"out": torch.empty_like(x)},
))
_dispatch = jitkern.dispatcher(SPEC)
