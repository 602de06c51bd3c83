"""silu_and_mul: ``out = silu(x[..., :D]) * x[..., D:]``, the gated activation of a SwiGLU MLP.

``x`` [..., 2D] is the fused gate/up projection (gate first); ``out`` [..., D] is what the down
projection reads. One kernel reads ``x`` once and writes ``out`` once (torch needs a silu kernel, a
multiply and a temporary). bf16/fp16/fp32; fp32 arithmetic, one rounding to the output's dtype.
``x`` may be any view whose rows are contiguous in the last dimension.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import checks, registry
from ..dispatch import dispatcher
from ..render import builtin_template_dir
from ..spec import Arg, Candidate, Config, In, Launch, OpSpec, Variant

OP = "silu_and_mul"
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
#: Columns per program (a row of D wider than the block is split over several programs).
BLOCKS = (256, 512, 1024, 2048)


def reference(x, out=None):
    d = x.shape[-1] // 2
    y = (torch.nn.functional.silu(x[..., :d].float()) * x[..., d:].float()).to(x.dtype)
    if out is not None:
        out.copy_(y)
        return out
    return y


def block_for(d: int) -> int:
    return min(BLOCKS[-1], max(BLOCKS[0], 1 << max(0, (d - 1).bit_length())))


def config(dtype: str, aligned: bool, block: int, num_warps: int = 4) -> Config:
    return Config.make("triton", dtype=dtype, aligned=aligned, block=block, num_warps=num_warps)


def configs(arch):
    for dtype in checks.FLOAT_TYPES:
        for aligned in (True, False):
            for b in BLOCKS:
                yield config(dtype, aligned, b)


def plan(call):
    """Validate one call signature and decide its launch."""
    x, out = call.args
    checks.tensor(OP, "x", x, dtypes=DTYPES)
    if x.dim() == 0 or x.shape[-1] % 2:
        raise checks.ShapeError(f"{OP}: x's last dimension holds gate and up halves and must be even; got shape "
                                f"{tuple(x.shape)}")
    d = x.shape[-1] // 2
    checks.tensor(OP, "out", out, like=x)
    checks.same_dtype(OP, "out", out, x, "x")
    checks.shape(OP, "out", out, (*x.shape[:-1], d))
    x2, o2 = checks.rows(OP, "x", x), checks.rows(OP, "out", out)
    m = x2.shape[0]
    if m == 0 or d == 0:
        return None
    checks.fits_i32(OP, "the number of rows", m)
    checks.fits_i32(OP, "x.shape[-1]", 2 * d)
    strides = (x2.stride(0), o2.stride(0))
    aligned = d % 16 == 0 and all(s % 16 == 0 for s in strides)
    block = block_for(d)
    tile = call.tiles([{"num_warps": 4}])[0]
    cfg = config(checks.TRITON_TYPE[x.dtype], aligned, block, **tile)
    return Candidate(Launch(cfg, (m, -(-d // block)), (In("x"), In("out"), d, *strides)))


def silu_and_mul(x: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``silu(gate) * up`` of ``x = [gate | up]`` along the last dimension (see the module doc).
    ``out``: [..., D], x's dtype; allocated if not given. Returns ``out``."""
    if out is None:
        out = alloc(x)["out"]
    _dispatch(x, out)
    return out


def alloc(x, out=None):
    """The output ``silu_and_mul`` allocates when ``out`` is None (also the torch.compile path)."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return {"out": None}
    return {"out": x.new_empty((*x.shape[:-1], x.shape[-1] // 2))}


SPEC = registry.register(OpSpec(
    name=OP,
    variants=(Variant(
        name="triton",
        template="triton.py.j2",
        kernel="silu_and_mul_kernel",
        args=(
            Arg("x_ptr", "*{dtype}"), Arg("out_ptr", "*{dtype}"), Arg("D", "i32", divisible_if="aligned"),
            Arg("stride_x", "i64", divisible_if="aligned"), Arg("stride_out", "i64", divisible_if="aligned"),
        ),
    ),),
    template_dir=builtin_template_dir() / OP,
    fn=silu_and_mul,
    reference=reference,
    configs=configs,
    plan=plan,
    tunables={"num_warps": (1, 2, 4, 8)},
    doc=__doc__,
    outputs=("out",),
    alloc=alloc,
))
_dispatch = dispatcher(SPEC)
