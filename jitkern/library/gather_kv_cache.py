"""gather_kv_cache: copy the committed tokens of every sequence out of a paged KV cache.

``kv_cache`` [num_blocks, page_size, *entry] (any trailing layout that is contiguous per token),
``block_table`` [batch, max_blocks] int32, ``cu_seq_lens`` [batch + 1] int32 (prefix sums of the
sequences' token counts). Returns ``out`` [num_tokens, *entry] with sequence b's tokens at rows
``cu_seq_lens[b] : cu_seq_lens[b+1]``. Zero tokens (an empty prefill, as in seed 003) is valid input
and returns an empty tensor without a launch.

Table contract (the caller's; checked before the launch under ``JITKERN_DEBUG=checks``):
``cu_seq_lens`` starts at 0, never decreases and ends at ``num_tokens``; no sequence is longer than
``block_table`` addresses (``max_blocks * page_size``); the block-table entries a sequence reads
(its first ``ceil(len / page_size)``) lie in ``[0, num_blocks)``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import checks, constraints, tuning, redzone, registry, table_checks
from ..contracts import Buffer, Contract
from ..render import builtin_template_dir
from ..dispatch import dispatcher
from ..spec import Arg, Candidate, Config, In, Launch, OpSpec, Variant

OP = "gather_kv_cache"
DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.uint8, torch.int8)
PAGE_SIZES = (1, 16, 32, 64, 128, 256)
#: Tile parameters (values ``JITKERN_GATHER_KV_CACHE_<PARAM>`` may set): tokens and entry elements per
#: step, warps, and the most programs per sequence (max_splits).
TUNABLES = {"block_t": (8, 16, 32, 64), "block_e": (64, 128, 256, 512, 1024), "num_warps": (1, 2, 4, 8),
            "max_splits": (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)}
TILES = {  # H200 (tools/sweep_membw.py, 2026-12-02): units of 8 x 256 elements, 72-81% of HBM peak; larger
    # units and more programs were within 1-2% or slower (shipped in jitkern/tuned/sm_90.json too)
    "sm_90": {"block_t": 8, "block_e": 256, "num_warps": 4, "max_splits": 256}}
DEFAULT_TILES = {"block_t": 16, "block_e": 256, "num_warps": 4, "max_splits": 64}


#: The bucket of this op's winners in the shipped tables (``jitkern/tuned/<arch>.json``, written by
#: ``tools/sweep_membw.py --apply``): one tile per arch and dtype, looked up before ``TILES``.
TUNED_BUCKET = "default"


def _listed(arch_name: str, dtype: str) -> list[dict]:
    """The tile candidates before rules and overrides: the shipped winner (if any), then ``TILES``."""
    base = TILES.get(arch_name, DEFAULT_TILES)
    won = tuning.shipped(arch_name, OP, dtype, TUNED_BUCKET)
    return ([{**base, **won}] if won else []) + [base]
BLOCK_T = DEFAULT_TILES["block_t"]
BLOCK_E = DEFAULT_TILES["block_e"]

#: Written once beside the template: the kernel writes exactly ``out`` [num_tokens, entry].
CONTRACT = Contract(OP, (
    Buffer("out", lambda d: (d.num_tokens, *d.entry), lambda d: d.dtype, role="output",
           doc="gathered tokens, one row per committed token"),
))


def reference(kv_cache, block_table, cu_seq_lens, num_tokens=None, out=None):
    page = kv_cache.shape[1]
    cu = cu_seq_lens.long()
    lens = cu[1:] - cu[:-1]
    total = int(cu[-1]) if num_tokens is None else int(num_tokens)
    batch = torch.repeat_interleave(torch.arange(len(lens), device=cu.device), lens, output_size=total)
    pos = torch.arange(total, device=cu.device) - cu[batch]
    y = kv_cache[block_table.long()[batch, pos // page], pos % page]
    if out is not None:
        out.copy_(y)
        return out
    return y


def tiles(arch_name: str, dtype: str = "bf16") -> dict:
    """block_t, block_e, num_warps, max_splits for an arch, after rules and env overrides (what
    ``call.tiles`` gives the plan; prebuild and tools use this)."""
    return constraints.apply(arch_name, OP, _listed(arch_name, dtype), TUNABLES)[0]


def config(dtype: str, page_size: int, aligned: bool, arch_name: str = "", flat: bool = False,
           tile: dict | None = None) -> Config:
    """``flat``: token rows contiguous in the cache and in ``out`` (copies whole page runs). ``tile``:
    the chosen tile (``max_splits`` is a grid bound, not a build parameter); default:
    ``tiles(arch_name)``."""
    t = tiles(arch_name, dtype) if tile is None else tile
    extra = {"flat": True} if flat else {}  # only flat configs carry the flag (others keep their keys)
    return Config.make("triton", dtype=dtype, page_size=page_size, aligned=aligned, block_t=t["block_t"],
                       block_e=t["block_e"], num_warps=t["num_warps"], **extra)


def configs(arch):
    for dtype in ("bf16", "fp16", "fp32", "u8", "i8"):
        for page in PAGE_SIZES:
            for aligned in (True, False):
                yield config(dtype, page, aligned, arch.name)
                yield config(dtype, page, aligned, arch.name, flat=True)


def plan(call):
    """Validate one call signature and decide its launch (runs once per signature)."""
    kv_cache, block_table, cu_seq_lens, num_tokens, out = call.args
    checks.tensor(OP, "kv_cache", kv_cache, dtypes=DTYPES)
    if kv_cache.dim() < 3:
        raise checks.ShapeError(f"{OP}: kv_cache must be [num_blocks, page_size, *entry], got {tuple(kv_cache.shape)}")
    if kv_cache.numel() == 0:
        raise checks.ShapeError(f"{OP}: kv_cache has no elements (shape {tuple(kv_cache.shape)}); it needs at least "
                                f"one block of one token with a non-empty entry")
    checks.tensor(OP, "block_table", block_table, dtypes=(torch.int32,), ndim=2, like=kv_cache)
    checks.tensor(OP, "cu_seq_lens", cu_seq_lens, dtypes=(torch.int32,), ndim=1, like=kv_cache)
    batch = block_table.shape[0]
    checks.shape(OP, "cu_seq_lens", cu_seq_lens, (batch + 1,))
    checks.contiguous(OP, "cu_seq_lens", cu_seq_lens)
    checks.unit_last_stride(OP, "block_table", block_table)
    page = kv_cache.shape[1]
    if page not in PAGE_SIZES:
        raise checks.ShapeError(f"{OP}: page size {page} is not supported; supported: {PAGE_SIZES}")
    entry = tuple(kv_cache.shape[2:])
    e = math.prod(entry)
    if not kv_cache[0, 0].is_contiguous():
        raise checks.LayoutError(f"{OP}: each token's entry of kv_cache must be contiguous (strides "
                                 f"{tuple(kv_cache.stride())}); pass kv_cache.contiguous()")
    n_tok = checks.integer(OP, "num_tokens", num_tokens, minimum=0)
    if not redzone.enabled():  # the op's hot path passes the caller's out without prepare
        CONTRACT.check_outputs(kv_cache.device, dict(num_tokens=n_tok, entry=entry, dtype=kv_cache.dtype), out=out)
    checks.tensor(OP, "out", out, like=kv_cache)
    checks.same_dtype(OP, "out", out, kv_cache, "kv_cache")
    checks.shape(OP, "out", out, (n_tok, *entry))
    if n_tok and not out[0].is_contiguous():
        raise checks.LayoutError(f"{OP}: each row of out must be contiguous (strides {tuple(out.stride())})")
    if n_tok == 0 or batch == 0:
        return None  # empty work: nothing to launch
    for what, v in (("the entry size", e), ("num_tokens", n_tok), ("the batch", batch)):
        checks.fits_i32(OP, what, v)
    strides = (kv_cache.stride(0), kv_cache.stride(1), block_table.stride(0), out.stride(0) if n_tok > 1 else e)
    aligned = e % 16 == 0 and all(s % 16 == 0 for s in strides)
    flat = strides[1] == e and strides[3] == e  # whole page runs are contiguous: copy them as one
    tile = call.tiles([TILES.get(call.arch.name, DEFAULT_TILES)], dtype=checks.TRITON_TYPE[kv_cache.dtype],
                      bucket=TUNED_BUCKET)[0]
    cfg = config(checks.TRITON_TYPE[kv_cache.dtype], page, aligned, flat=flat, tile=tile)
    if flat:  # units of block_t x block_e elements of a page's run; twice the mean count per sequence
        per_page = -(-page * e // (tile["block_t"] * tile["block_e"]))
        splits = max(1, min(tile["max_splits"], 2 * -(-n_tok // (batch * page)) * per_page))
    else:  # block_t tokens per step
        splits = max(1, min(tile["max_splits"], -(-n_tok // (batch * tile["block_t"]))))
    return Candidate(Launch(cfg, (batch, splits), (In("kv_cache"), In("block_table"), In("cu_seq_lens"), In("out"),
                                                    *strides, e)))


def check_tables(call):
    """JITKERN_DEBUG=checks: the table contract of the module docstring, on the host (``TableError``)."""
    kv_cache, block_table, cu_seq_lens, num_tokens, out = call.args
    cu = table_checks.host(cu_seq_lens)
    if int(cu[0]) != 0:
        table_checks.fail(OP, "cu_seq_lens", (0,), int(cu[0]), "0 (cu_seq_lens are prefix sums of the lengths)")
    table_checks.nondecreasing(OP, "cu_seq_lens", cu)
    if int(cu[-1]) != num_tokens:
        table_checks.fail(OP, "cu_seq_lens", (len(cu) - 1,), int(cu[-1]),
                          f"num_tokens = {num_tokens} (the rows of out)")
    nb, page = kv_cache.shape[0], kv_cache.shape[1]
    max_blocks = block_table.shape[1]
    lens = cu[1:] - cu[:-1]
    long = (lens > max_blocks * page).nonzero()
    if long.numel():
        b = int(long[0])
        table_checks.fail(OP, "cu_seq_lens", (b + 1,), int(cu[b + 1]),
                          f"at most cu_seq_lens[{b}] + {max_blocks * page} (sequence {b} can address "
                          f"block_table.shape[1] = {max_blocks} blocks of {page} tokens)")
    table_checks.within(OP, "block_table", table_checks.host(block_table), 0, nb,
                        used=table_checks.used_blocks(lens, page, max_blocks),
                        what="kv_cache.shape[0], the number of blocks; entries past a sequence's length are not read")


def gather_kv_cache(kv_cache: torch.Tensor, block_table: torch.Tensor, cu_seq_lens: torch.Tensor,
                    num_tokens: Optional[int] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Gather committed tokens; ``num_tokens`` (= ``cu_seq_lens[-1]``) avoids a device sync when given
    (and is needed under torch.compile unless ``out`` is passed)."""
    if out is not None and num_tokens is not None and not redzone.enabled():  # the plan checked out
        _dispatch(kv_cache, block_table, cu_seq_lens, num_tokens, out)
        return out
    if num_tokens is None:
        if isinstance(out, torch.Tensor) and out.dim():
            num_tokens = out.shape[0]
        elif isinstance(cu_seq_lens, torch.Tensor) and cu_seq_lens.dim() == 1 and cu_seq_lens.numel():
            num_tokens = int(cu_seq_lens[-1])
        else:
            num_tokens = 0  # the plan names what is wrong with cu_seq_lens
    num_tokens = checks.integer(OP, "num_tokens", num_tokens, minimum=0)
    if isinstance(kv_cache, torch.Tensor):
        bufs = CONTRACT.prepare(kv_cache.device, dict(num_tokens=num_tokens, entry=tuple(kv_cache.shape[2:]),
                                                      dtype=kv_cache.dtype), out=out)
        args = (kv_cache, block_table, cu_seq_lens, num_tokens, bufs["out"])
        ran = _dispatch(*args)
        bufs.finish(_dispatch.describe_ran(ran, *args) if redzone.enabled() else ran)
        return bufs.result("out")
    _dispatch(kv_cache, block_table, cu_seq_lens, num_tokens, out)  # raises: the plan says why


def alloc(kv_cache, block_table, cu_seq_lens, num_tokens=None, out=None):
    """The ``out`` gather_kv_cache allocates (torch.compile path; traced, so plain torch calls)."""
    n = int(cu_seq_lens[-1]) if num_tokens is None else num_tokens
    return {"out": torch.empty((n, *kv_cache.shape[2:]), dtype=kv_cache.dtype, device=kv_cache.device)}


SPEC = registry.register(OpSpec(
    name=OP,
    variants=(Variant(
        name="triton",
        template="triton.py.j2",
        kernel="gather_kv_cache_kernel",
        args=(
            Arg("cache_ptr", "*{dtype}"), Arg("bt_ptr", "*i32"), Arg("cu_ptr", "*i32"), Arg("out_ptr", "*{dtype}"),
            Arg("stride_blk", "i64", divisible_if="aligned"), Arg("stride_tok", "i64", divisible_if="aligned"),
            Arg("stride_bt", "i64", divisible_if="aligned"), Arg("stride_out", "i64", divisible_if="aligned"),
            Arg("E", "i32", divisible_if="aligned"),
        ),
    ),),
    template_dir=builtin_template_dir() / OP,
    fn=gather_kv_cache,
    reference=reference,
    configs=configs,
    plan=plan,
    tunables=TUNABLES,
    doc=__doc__,
    extra={"contract": CONTRACT},
    outputs=("out",),
    alloc=alloc,
    debug_checks=check_tables,
))
_dispatch = dispatcher(SPEC)
