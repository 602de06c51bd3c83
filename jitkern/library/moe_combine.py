"""moe_combine: a MoE layer's weighted sum over each token's top-k expert outputs, in one launch.

``y`` [tokens * topk, hidden] (bf16, fp16 or fp32; any row stride, last dimension contiguous): row
``t * topk + j`` is token ``t``'s output of its ``j``-th expert (the pair order of ``moe_align`` and
``moe_gemm_stage1``). ``topk_weights`` [tokens, topk] (fp32 or ``y``'s dtype, contiguous), e.g. from
``moe_topk_softmax``. ``out`` [tokens, hidden] (``y``'s dtype, contiguous; allocated when None):

    out[t] = sum_j topk_weights[t, j] * y[t * topk + j]

accumulated in fp32 and cast once. What ``(y.view(t, k, h) * w[..., None]).sum(1)`` costs in torch (two
kernels) as one Triton kernel over (tokens, hidden blocks), each program loading its token's top-k rows
as one [block_k, block_h] tile. No host sync, so a CUDA graph can capture it; no tokens: nothing runs.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import checks, registry
from ..dispatch import dispatcher
from ..render import builtin_template_dir
from ..spec import Arg, Candidate, Config, In, Launch, OpSpec, Variant

OP = "moe_combine"
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
#: Rows of ``y`` a program reads per step (a power of two >= topk, up to the largest; more loop).
K_BLOCKS = (1, 2, 4, 8, 16)
#: Elements of a program's [block_k, block_h] tile: block_h is 1024 up to topk 4, 512 for 8, 256 for 16.
TILE = 4096
MAX_BLOCK_H = 1024
#: The block of a narrow row (hidden <= SMALL_BLOCK_H).
SMALL_BLOCK_H = 256


def reference(y, topk_weights, out=None):
    """torch: the products in fp32, summed over each token's top-k rows."""
    t, k = topk_weights.shape
    got = (y.float().view(t, k, -1) * topk_weights.float()[..., None]).sum(1).to(y.dtype)
    if out is not None:
        out.copy_(got)
        return out
    return got


def block_k_for(topk: int) -> int:
    return next((b for b in K_BLOCKS if b >= topk), K_BLOCKS[-1])


def block_hs(block_k: int) -> tuple[int, ...]:
    """The hidden blocks built for ``block_k``: a narrow row's and the widest the tile allows."""
    return tuple(sorted({SMALL_BLOCK_H, max(SMALL_BLOCK_H, min(MAX_BLOCK_H, TILE // block_k))}))


def block_h_for(hidden: int, block_k: int) -> int:
    return block_hs(block_k)[0] if hidden <= SMALL_BLOCK_H else block_hs(block_k)[-1]


def config(dtype: str, w_dtype: str, aligned: bool, block_k: int, block_h: int, num_warps: int = 4) -> Config:
    return Config.make("triton", dtype=dtype, w_dtype=w_dtype, aligned=aligned, block_k=block_k, block_h=block_h,
                       num_warps=num_warps)


def configs(arch):
    for dtype in checks.FLOAT_TYPES:
        for w_dtype in dict.fromkeys(("fp32", dtype)):
            for aligned in (True, False):
                for block_k in K_BLOCKS:
                    for block_h in block_hs(block_k):
                        yield config(dtype, w_dtype, aligned, block_k, block_h)


def plan(call):
    """Validate one call signature and decide its launch."""
    y, w, out = call.args
    checks.tensor(OP, "y", y, dtypes=DTYPES, ndim=2)
    checks.unit_last_stride(OP, "y", y)
    checks.tensor(OP, "topk_weights", w, dtypes=tuple(dict.fromkeys((torch.float32, y.dtype))), ndim=2, like=y)
    checks.contiguous(OP, "topk_weights", w)
    tokens, topk = w.shape
    pairs, hidden = y.shape
    if topk < 1:
        raise checks.ShapeError(f"{OP}: topk_weights has shape {tuple(w.shape)}: no experts per token; it must be "
                                f"[tokens, topk] with topk >= 1")
    if pairs != tokens * topk:
        raise checks.ShapeError(f"{OP}: y has {pairs} rows but topk_weights {tuple(w.shape)} needs tokens * topk = "
                                f"{tokens * topk}: row t * topk + j of y is token t's j-th expert output")
    checks.tensor(OP, "out", out, like=y)
    checks.same_dtype(OP, "out", out, y, "y")
    checks.shape(OP, "out", out, (tokens, hidden))
    checks.contiguous(OP, "out", out)
    if tokens == 0 or hidden == 0:
        return None
    checks.fits_i32(OP, "the number of tokens (topk_weights.shape[0])", tokens)
    checks.fits_i32(OP, "the row length (y.shape[1])", hidden)
    stride_y = y.stride(0) if pairs > 1 else hidden
    aligned = hidden % 16 == 0 and stride_y % 16 == 0
    block_k = block_k_for(topk)
    block_h = block_h_for(hidden, block_k)
    tile = call.tiles([{"num_warps": 4}])[0]
    cfg = config(checks.TRITON_TYPE[y.dtype], checks.TRITON_TYPE[w.dtype], aligned, block_k, block_h, **tile)
    grid = (tokens, -(-hidden // block_h))
    return Candidate(Launch(cfg, grid, (In("y"), In("topk_weights"), In("out"), hidden, stride_y, topk)))


def moe_combine(y: torch.Tensor, topk_weights: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out[t] = sum_j topk_weights[t, j] * y[t * topk + j]`` (see the module doc); ``out`` is
    allocated when not given. Returns ``out``."""
    if out is None:
        out = alloc(y, topk_weights)["out"]
    _dispatch(y, topk_weights, out)
    return out


def alloc(y, topk_weights, out=None):
    """The output moe_combine allocates when ``out`` is None (also the torch.compile path)."""
    dev = y.device if isinstance(y, torch.Tensor) else None
    try:
        shape, dtype = (topk_weights.shape[0], y.shape[-1]), y.dtype
    except (AttributeError, IndexError, TypeError):  # bad arguments: the plan says why
        shape, dtype = (0, 0), torch.float32
    return {"out": torch.empty(shape, dtype=dtype, device=dev)}


SPEC = registry.register(OpSpec(
    name=OP,
    variants=(Variant(
        name="triton",
        template="triton.py.j2",
        kernel="moe_combine_kernel",
        args=(
            Arg("y_ptr", "*{dtype}"), Arg("w_ptr", "*{w_dtype}"), Arg("out_ptr", "*{dtype}"),
            Arg("hidden", "i32", divisible_if="aligned"), Arg("stride_y", "i64", divisible_if="aligned"),
            Arg("topk", "i32"),
        ),
    ),),
    template_dir=builtin_template_dir() / OP,
    fn=moe_combine,
    reference=reference,
    configs=configs,
    plan=plan,
    tunables={"num_warps": (1, 2, 4, 8)},
    doc=__doc__,
    outputs=("out",),
    alloc=alloc,
))
_dispatch = dispatcher(SPEC)
