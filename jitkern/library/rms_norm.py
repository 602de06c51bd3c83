"""rms_norm: ``out = x * rsqrt(mean(x², -1) + eps) * weight``, optionally fused with a residual add.

With ``residual``, ``residual += x`` is written back in place (as serving engines' fused add+norm
does) and the sum is what gets normalised. bf16/fp16/fp32 in, fp32 accumulation.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import checks, registry
from ..dispatch import dispatcher
from ..render import builtin_template_dir
from ..spec import Arg, Candidate, Config, In, Launch, OpSpec, Scalar, Variant

OP = "rms_norm"
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
#: Rows up to this many elements are normalised in one pass held in registers; longer rows loop.
MAX_SINGLE_PASS = 8192
BLOCKS = (256, 512, 1024, 2048, 4096, 8192)
LOOP_BLOCK = 4096


def reference(x, weight, eps=1e-6, residual=None, out=None):
    h = x.float()
    if residual is not None:
        h = h + residual.float()
        residual.copy_(h.to(residual.dtype))
    y = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
    if out is not None:
        out.copy_(y)
        return out
    return y


def block_for(n: int) -> tuple[int, bool]:
    """(block_n, single_pass) for a row of ``n`` elements."""
    if n <= MAX_SINGLE_PASS:
        return max(BLOCKS[0], 1 << max(0, (n - 1).bit_length())), True
    return LOOP_BLOCK, False


def num_warps_for(block_n: int) -> int:
    return max(4, min(16, block_n // 256))


def config(dtype: str, residual: bool, aligned: bool, block_n: int, single_pass: bool) -> Config:
    return Config.make("triton", dtype=dtype, residual=residual, aligned=aligned, block_n=block_n,
                       single_pass=single_pass, num_warps=num_warps_for(block_n))


def configs(arch):
    for dtype in checks.FLOAT_TYPES:
        for residual in (False, True):
            for aligned in (True, False):
                for b in BLOCKS:
                    yield config(dtype, residual, aligned, b, True)
                yield config(dtype, residual, aligned, LOOP_BLOCK, False)


def plan(call):
    """Validate one call signature and decide its launch (runs once per signature)."""
    x, weight, eps, residual, out = call.args
    checks.tensor(OP, "x", x, dtypes=DTYPES)
    if x.dim() == 0:
        raise checks.ShapeError(f"{OP}: x must have at least 1 dimension, got a scalar")
    n = x.shape[-1]
    checks.tensor(OP, "weight", weight, ndim=1, like=x)
    checks.same_dtype(OP, "weight", weight, x, "x")
    checks.shape(OP, "weight", weight, (n,))
    checks.unit_last_stride(OP, "weight", weight)
    x2 = checks.rows(OP, "x", x)
    r2 = None
    if residual is not None:
        checks.tensor(OP, "residual", residual, like=x)
        checks.same_dtype(OP, "residual", residual, x, "x")
        checks.shape(OP, "residual", residual, x.shape)
        r2 = checks.rows(OP, "residual", residual)
    checks.tensor(OP, "out", out, like=x)
    checks.same_dtype(OP, "out", out, x, "x")
    checks.shape(OP, "out", out, x.shape)
    o2 = checks.rows(OP, "out", out)
    m = x2.shape[0]
    if m == 0 or n == 0:
        return None
    checks.fits_i32(OP, "the row length (x.shape[-1])", n)
    checks.fits_i32(OP, "the number of rows (x.numel() // x.shape[-1])", m)
    strides = (x2.stride(0), r2.stride(0) if r2 is not None else 0, o2.stride(0))
    aligned = n % 16 == 0 and all(s % 16 == 0 for s in strides)
    block_n, single = block_for(n)
    tile = call.tiles([{"num_warps": num_warps_for(block_n)}])[0]
    cfg = Config.make("triton", dtype=checks.TRITON_TYPE[x.dtype], residual=residual is not None, aligned=aligned,
                      block_n=block_n, single_pass=single, **tile)
    res = In("x") if residual is None else In("residual")
    return Candidate(Launch(cfg, (m,), (In("x"), In("weight"), res, In("out"), n, *strides, In("eps"))))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: Optional[torch.Tensor] = None,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RMSNorm over the last dimension of ``x`` (any leading shape).

    ``weight``: [N], same dtype as ``x``. ``residual``: like ``x``; updated in place to ``x + residual``.
    ``out``: like ``x``; allocated if not given. Returns ``out``.
    """
    if out is None:
        out = torch.empty_like(x) if isinstance(x, torch.Tensor) else None
    _dispatch(x, weight, eps, residual, out)
    return out


def alloc(x, weight, eps=1e-6, residual=None, out=None):
    """The output buffer ``rms_norm`` allocates when ``out`` is None (torch.compile path)."""
    return {"out": torch.empty_like(x)}


SPEC = registry.register(OpSpec(
    name=OP,
    variants=(Variant(
        name="triton",
        template="triton.py.j2",
        kernel="rms_norm_kernel",
        args=(
            Arg("x_ptr", "*{dtype}"), Arg("w_ptr", "*{dtype}"), Arg("res_ptr", "*{dtype}"),
            Arg("out_ptr", "*{dtype}"), Arg("N", "i32", divisible_if="aligned"),
            Arg("stride_x", "i64", divisible_if="aligned"), Arg("stride_res", "i64", divisible_if="aligned"),
            Arg("stride_out", "i64", divisible_if="aligned"), Arg("eps", "fp32"),
        ),
    ),),
    template_dir=builtin_template_dir() / OP,
    fn=rms_norm,
    reference=reference,
    configs=configs,
    plan=plan,
    tunables={"num_warps": (1, 2, 4, 8, 16)},
    scalars={"eps": Scalar(float, min=0.0)},
    doc=__doc__,
    mutates=("residual",),
    outputs=("out",),
    alloc=alloc,
))
_dispatch = dispatcher(SPEC)
