"""moe_align: sort a MoE layer's (token, slot) pairs by expert, the tables ``moe_gemm_stage1`` reads.

``topk_ids`` [tokens, topk] (int32 or int64, contiguous): each token's experts, in ``[0, num_experts)``.
Returns ``(sorted_token_ids, expert_ids, num_tokens_post_padded)``, all int32:

* ``sorted_token_ids`` [sorted_size]: pair ids ``token * topk + slot`` grouped by expert (experts in
  order, each expert's pairs in pair order), each expert's run padded to a multiple of ``align_m``
  with the sentinel ``tokens * topk``; ``sorted_size = roundup(pairs + num_experts * (align_m - 1),
  align_m)``, the worst case (``sorted_size()``), so the sizes depend on the shapes only;
* ``expert_ids`` [sorted_size // align_m]: the expert of each run block (0 past the used blocks);
* ``num_tokens_post_padded`` [1]: how many leading entries are in use.

The layout of vLLM's ``moe_align_block_size``. One Triton program does it all on the device (no
host sync, so a CUDA graph can capture it; one launch instead of the dozen torch ops of
``reference``). Under ``JITKERN_DEBUG=checks`` every ``topk_ids`` value is checked to lie in
``[0, num_experts)`` before the launch; an expert id outside it is undefined behaviour otherwise.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import checks, registry, table_checks
from ..dispatch import dispatcher
from ..render import builtin_template_dir
from ..spec import Arg, Candidate, Config, In, Launch, OpSpec, Variant

OP = "moe_align"
ID_DTYPES = (torch.int32, torch.int64)
#: Expert counts the kernel is built for: one histogram bin per expert, a power of two.
EXPERT_BINS = (8, 16, 32, 64, 128, 256, 512)
#: Pairs per step of the kernel's loops, at the most and at the least: ``block_for`` keeps the
#: per-step rank of a chunk to 4096 elements ([block, bins] one-hot, or [64, 64] pairwise for more than
#: 64 bins), so few experts take few steps (a batch-128 decode with top-2 of 8: one step, not four).
MAX_BLOCK, BLOCK = 512, 64
OUTPUTS = ("sorted_token_ids", "expert_ids", "num_tokens_post_padded")


def sorted_size(pairs: int, num_experts: int, align_m: int) -> int:
    """Length of ``sorted_token_ids``: every expert's run padded, in the worst case."""
    return -(-(pairs + num_experts * (align_m - 1)) // align_m) * align_m


def reference(topk_ids, num_experts: int, align_m: int, sorted_token_ids=None, expert_ids=None,
              num_tokens_post_padded=None):
    """The tables in torch (``torch.bincount``: a host sync on CUDA)."""
    dev = topk_ids.device
    flat = topk_ids.reshape(-1).long()
    pairs = flat.numel()
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + align_m - 1) // align_m * align_m
    starts = torch.cumsum(padded, 0) - padded
    order = torch.argsort(flat, stable=True)
    first = torch.cumsum(counts, 0) - counts
    e_sorted = flat[order]
    pos = starts[e_sorted] + torch.arange(pairs, device=dev) - first[e_sorted]
    size = sorted_size(pairs, num_experts, align_m)
    ids = torch.full((size,), pairs, dtype=torch.int32, device=dev)
    ids[pos] = order.to(torch.int32)
    used = padded.sum()
    blocks = torch.arange(size // align_m, device=dev) * align_m
    eids = torch.searchsorted(torch.cumsum(padded, 0), blocks, right=True)
    eids = torch.where(blocks < used, eids, 0).to(torch.int32)
    got = (ids, eids, used.reshape(1).to(torch.int32))
    given = (sorted_token_ids, expert_ids, num_tokens_post_padded)
    for g, v in zip(given, got):
        if g is not None:
            g.copy_(v)
    return tuple(v if g is None else g for g, v in zip(given, got))


def expert_bins(num_experts: int) -> int:
    return next(b for b in EXPERT_BINS if b >= num_experts)


def block_for(bins: int) -> int:
    return max(BLOCK, min(MAX_BLOCK, 4096 // bins))


def config(id_dtype: str, bins: int, num_warps: int = 4) -> Config:
    return Config.make("triton", id_dtype=id_dtype, expert_bins=bins, block=block_for(bins), num_warps=num_warps)


def configs(arch):
    for id_dtype in ("i32", "i64"):
        for bins in EXPERT_BINS:
            yield config(id_dtype, bins)


def plan(call):
    """Validate one call signature and decide its launch."""
    topk_ids, num_experts, align_m, ids, eids, npad = call.args
    checks.tensor(OP, "topk_ids", topk_ids, dtypes=ID_DTYPES)
    checks.contiguous(OP, "topk_ids", topk_ids)
    num_experts = checks.integer(OP, "num_experts", num_experts, minimum=1)
    if num_experts > EXPERT_BINS[-1]:
        raise checks.ArgumentError(f"{OP}: num_experts={num_experts} is more than the {EXPERT_BINS[-1]} the kernel "
                                   f"is built for")
    align_m = checks.integer(OP, "align_m", align_m, minimum=1)
    pairs = topk_ids.numel()
    size = sorted_size(pairs, num_experts, align_m)
    for name, t, shape in (("sorted_token_ids", ids, (size,)), ("expert_ids", eids, (size // align_m,)),
                           ("num_tokens_post_padded", npad, (1,))):
        checks.tensor(OP, name, t, dtypes=(torch.int32,), like=topk_ids)
        checks.shape(OP, name, t, shape)
        checks.contiguous(OP, name, t)
    checks.fits_i32(OP, "sorted_size", size)
    tile = call.tiles([{"num_warps": 4}])[0]
    cfg = config(checks.TRITON_TYPE[topk_ids.dtype], expert_bins(num_experts), **tile)
    return Candidate(Launch(cfg, (1,), (In("topk_ids"), In("sorted_token_ids"), In("expert_ids"),
                                        In("num_tokens_post_padded"), pairs, num_experts, size, align_m)))


def check_tables(call):
    """JITKERN_DEBUG=checks: every expert id in ``[0, num_experts)`` (``TableError``)."""
    topk_ids, num_experts = call.args[:2]
    table_checks.within(OP, "topk_ids", table_checks.host(topk_ids), 0, num_experts,
                        what="num_experts, the number of experts")


def moe_align(topk_ids: torch.Tensor, num_experts: int, align_m: int,
              sorted_token_ids: Optional[torch.Tensor] = None, expert_ids: Optional[torch.Tensor] = None,
              num_tokens_post_padded: Optional[torch.Tensor] = None):
    """The sorted pair tables of ``topk_ids`` (see the module doc); given output tensors are filled and
    returned, missing ones allocated. Returns ``(sorted_token_ids, expert_ids, num_tokens_post_padded)``."""
    given = {"sorted_token_ids": sorted_token_ids, "expert_ids": expert_ids,
             "num_tokens_post_padded": num_tokens_post_padded}
    bufs = {n: t for n, t in given.items() if t is not None} | alloc(topk_ids, num_experts, align_m, **given)
    tables = tuple(bufs[n] for n in OUTPUTS)
    _dispatch(topk_ids, num_experts, align_m, *tables)
    return tables


def alloc(topk_ids, num_experts, align_m, sorted_token_ids=None, expert_ids=None, num_tokens_post_padded=None):
    """The outputs moe_align allocates (those not given; also the torch.compile path)."""
    dev = topk_ids.device if isinstance(topk_ids, torch.Tensor) else None
    try:
        size = sorted_size(topk_ids.numel(), int(num_experts), int(align_m))
        shapes = (size,), (size // int(align_m),), (1,)
    except (AttributeError, TypeError, ValueError, ZeroDivisionError):  # bad arguments: the plan says why
        shapes = (0,), (0,), (0,)
    given = (sorted_token_ids, expert_ids, num_tokens_post_padded)
    return {n: torch.empty(s, dtype=torch.int32, device=dev) for n, s, g in zip(OUTPUTS, shapes, given) if g is None}


SPEC = registry.register(OpSpec(
    name=OP,
    variants=(Variant(
        name="triton",
        template="triton.py.j2",
        kernel="moe_align_kernel",
        args=(
            Arg("topk_ptr", "*{id_dtype}"), Arg("ids_ptr", "*i32"), Arg("eids_ptr", "*i32"), Arg("npad_ptr", "*i32"),
            Arg("pairs", "i32"), Arg("experts", "i32"), Arg("size", "i32"), Arg("align_m", "i32"),
        ),
    ),),
    template_dir=builtin_template_dir() / OP,
    fn=moe_align,
    reference=reference,
    configs=configs,
    plan=plan,
    tunables={"num_warps": (1, 2, 4, 8)},
    doc=__doc__,
    outputs=OUTPUTS,
    alloc=alloc,
    debug_checks=check_tables,
))
_dispatch = dispatcher(SPEC)
