"""moe_topk_softmax: a MoE router's top-k experts per token, from its logits, in one launch.

``logits`` [tokens, experts] (bf16, fp16 or fp32; any row stride, last dimension contiguous; at most
``MAX_EXPERTS`` experts). Per token, the softmax over the experts in fp32, then its ``topk`` largest
probabilities in descending order (ties: the lower expert index first) and their expert ids; with
``renormalize`` the ``topk`` weights are divided by their sum. ``1 <= topk <= min(experts, MAX_TOPK)``.

Returns ``(topk_weights, topk_ids)``: ``topk_weights`` [tokens, topk] fp32 and ``topk_ids`` [tokens,
topk] int32, both contiguous; given ones are filled and returned (``topk_ids`` may also be int64: the
kernel stores the given tensor's dtype, e.g. for ``moe_align`` or a routes buffer kept as int64).

What ``softmax -> topk -> renormalise`` costs in torch (four kernels), as one Triton kernel: a program
handles ``block_t`` tokens, the experts padded to a power-of-two block with -inf. No host sync, so a
CUDA graph can capture it.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import checks, registry
from ..dispatch import dispatcher
from ..render import builtin_template_dir
from ..spec import Arg, Candidate, Config, In, Launch, OpSpec, Variant

OP = "moe_topk_softmax"
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
ID_DTYPES = (torch.int32, torch.int64)
#: Expert blocks the kernel is built for (a power of two >= experts; the extra columns are -inf).
EXPERT_BLOCKS = (8, 16, 32, 64, 128, 256, 512)
MAX_EXPERTS = EXPERT_BLOCKS[-1]
#: The most experts a token is routed to; the kernel holds its picks in a [block_t, MAX_TOPK] tile.
MAX_TOPK = 16
#: Logits per program: ``block_t = min(16, ROW_ELEMS // block_e)`` tokens of ``block_e`` experts.
ROW_ELEMS = 2048
OUTPUTS = ("topk_weights", "topk_ids")


def reference(logits, topk: int, renormalize: bool = True, topk_weights=None, topk_ids=None):
    """torch: softmax in fp32, ``topk``, then the weights divided by their sum."""
    w, i = torch.softmax(logits.float(), -1).topk(topk, -1)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    got = (w, i.to(torch.int32))
    given = (topk_weights, topk_ids)
    for g, v in zip(given, got):
        if g is not None:
            g.copy_(v)
    return tuple(v if g is None else g for g, v in zip(given, got))


def expert_block(experts: int) -> int:
    return next(b for b in EXPERT_BLOCKS if b >= experts)


def rows_per_program(block_e: int) -> int:
    return max(1, min(16, ROW_ELEMS // block_e))


def num_warps_for(block_e: int) -> int:
    return max(1, min(4, rows_per_program(block_e) * block_e // 512))


def config(dtype: str, id_dtype: str, block_e: int, num_warps: int | None = None) -> Config:
    return Config.make("triton", dtype=dtype, id_dtype=id_dtype, block_e=block_e, block_t=rows_per_program(block_e),
                       block_k=MAX_TOPK, num_warps=num_warps_for(block_e) if num_warps is None else num_warps)


def configs(arch):
    for dtype in checks.FLOAT_TYPES:
        for id_dtype in ("i32", "i64"):
            for block_e in EXPERT_BLOCKS:
                yield config(dtype, id_dtype, block_e)


def plan(call):
    """Validate one call signature and decide its launch."""
    logits, topk, renormalize, weights, ids = call.args
    checks.tensor(OP, "logits", logits, dtypes=DTYPES, ndim=2)
    checks.unit_last_stride(OP, "logits", logits)
    tokens, experts = logits.shape
    if not 1 <= experts <= MAX_EXPERTS:
        raise checks.ShapeError(f"{OP}: logits has {experts} experts (shape {tuple(logits.shape)}); the kernel "
                                f"takes 1 to {MAX_EXPERTS}")
    topk = checks.integer(OP, "topk", topk, minimum=1)
    if topk > min(experts, MAX_TOPK):
        raise checks.ArgumentError(f"{OP}: topk={topk} is more than min(experts={experts}, {MAX_TOPK}); a token is "
                                   f"routed to at most that many experts")
    if not isinstance(renormalize, (bool, int)) or renormalize not in (0, 1):
        raise checks.ArgumentError(f"{OP}: renormalize must be a bool, got {type(renormalize).__name__} "
                                   f"{renormalize!r:.60}")
    for name, t, dtypes in (("topk_weights", weights, (torch.float32,)), ("topk_ids", ids, ID_DTYPES)):
        checks.tensor(OP, name, t, dtypes=dtypes, like=logits)
        checks.shape(OP, name, t, (tokens, topk))
        checks.contiguous(OP, name, t)
    if tokens == 0:
        return None
    checks.fits_i32(OP, "the number of tokens (logits.shape[0])", tokens)
    block_e = expert_block(experts)
    tile = call.tiles([{"num_warps": num_warps_for(block_e)}])[0]
    cfg = config(checks.TRITON_TYPE[logits.dtype], checks.TRITON_TYPE[ids.dtype], block_e, **tile)
    grid = (-(-tokens // rows_per_program(block_e)),)
    return Candidate(Launch(cfg, grid, (In("logits"), In("topk_weights"), In("topk_ids"), tokens, experts,
                                        logits.stride(0), topk, int(renormalize))))


def moe_topk_softmax(logits: torch.Tensor, topk: int, renormalize: bool = True,
                     topk_weights: Optional[torch.Tensor] = None, topk_ids: Optional[torch.Tensor] = None):
    """The ``topk`` experts of each token and their weights (see the module doc); given outputs are
    filled and returned, missing ones allocated. Returns ``(topk_weights, topk_ids)``."""
    given = {"topk_weights": topk_weights, "topk_ids": topk_ids}
    bufs = {n: t for n, t in given.items() if t is not None} | alloc(logits, topk, renormalize, **given)
    outs = tuple(bufs[n] for n in OUTPUTS)
    _dispatch(logits, topk, renormalize, *outs)
    return outs


def alloc(logits, topk, renormalize=True, topk_weights=None, topk_ids=None):
    """The outputs moe_topk_softmax allocates (those not given; also the torch.compile path)."""
    dev = logits.device if isinstance(logits, torch.Tensor) else None
    try:
        shape = (logits.shape[0], checks.integer(OP, "topk", topk, minimum=0))
    except (AttributeError, IndexError, TypeError, checks.ArgumentError):  # bad arguments: the plan says why
        shape = (0, 0)
    given = {"topk_weights": topk_weights, "topk_ids": topk_ids}
    dtypes = {"topk_weights": torch.float32, "topk_ids": torch.int32}
    return {n: torch.empty(shape, dtype=dtypes[n], device=dev) for n in OUTPUTS if given[n] is None}


SPEC = registry.register(OpSpec(
    name=OP,
    variants=(Variant(
        name="triton",
        template="triton.py.j2",
        kernel="moe_topk_softmax_kernel",
        args=(
            Arg("logits_ptr", "*{dtype}"), Arg("w_ptr", "*fp32"), Arg("ids_ptr", "*{id_dtype}"),
            Arg("tokens", "i32"), Arg("experts", "i32"), Arg("stride_l", "i64"), Arg("topk", "i32"),
            Arg("renormalize", "i32"),
        ),
    ),),
    template_dir=builtin_template_dir() / OP,
    fn=moe_topk_softmax,
    reference=reference,
    configs=configs,
    plan=plan,
    tunables={"num_warps": (1, 2, 4, 8)},
    doc=__doc__,
    outputs=OUTPUTS,
    alloc=alloc,
))
_dispatch = dispatcher(SPEC)
