"""paged_mqa_logits: the lightning-indexer logits of sparse attention (DeepSeek V3.2) over a paged cache.

``q`` [batch, next_n, heads, head_dim]; ``kv_cache`` [num_blocks, page_size, head_dim] (one key
vector per token, e.g. the indexer keys); ``weights`` [batch * next_n, heads] fp32;
``context_lens`` [batch] int32; ``block_tables`` [batch, max_blocks] int32. Returns ``out``
[batch * next_n, max_model_len] fp32 where row ``b * next_n + i``, position ``t`` is
``sum_h weights[r, h] * relu(q[b, i, h] . k[t])`` for ``t < context_lens[b] - next_n + i + 1`` (the
i-th of next_n speculative tokens sees one more position than the one before it) and ``-inf``
elsewhere. Every element of ``out`` is written, none outside it: at ``context_len == max_model_len``
the last tile of a row runs past the row end and its stores are masked (seed 001).

Table contract (the caller's; checked before the launch under ``JITKERN_DEBUG=checks``):
``context_lens`` in ``[0, max_model_len]``; the block-table entries a sequence reads (its first
``ceil(context_len / page_size)``) lie in ``[0, num_blocks)``.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import checks, constraints, tuning, redzone, registry, table_checks
from ..contracts import Buffer, Contract
from ..render import builtin_template_dir
from ..dispatch import dispatcher
from ..spec import Arg, Candidate, Config, In, Launch, OpSpec, Variant

OP = "paged_mqa_logits"
DTYPES = (torch.bfloat16, torch.float16)
PAGE_SIZES = (16, 32, 64)
HEADS = (16, 32, 64, 128)
HEAD_DIMS = (64, 128)
NEXT_N = (1, 2, 3, 4)
#: Tile parameters (values ``JITKERN_PAGED_MQA_LOGITS_<PARAM>`` may set): block_t positions per step,
#: span steps per program (a pipelined loop when > 1), warps and pipeline depth.
TUNABLES = {"block_t": (16, 32, 64, 128, 256), "span": (1, 2, 4, 8, 16, 32), "num_warps": (2, 4, 8),
            "num_stages": (1, 2, 3, 4, 5),
            # how a tile of keys is fetched: 0 one page-table read per row; 1 one per tile (block_t <=
            # page_size); 2 as 1, through a tensor-memory-accelerator descriptor (sm_90, contiguous pages)
            "kv_load": (0, 1, 2),
            # 1: all next_n queries in one dot, the weighted head sum as a second (16-bit) dot; 2: one dot
            # per query as 0, all issued before the head sums; 3: queries along the dot's M (q first,
            # loop-invariant), keys along N, head sums down the columns
            "merge": (0, 1, 2, 3)}
TILES = {"cpu": {"block_t": 16, "span": 1, "num_warps": 4, "num_stages": 2},
         # H200 sweeps (tools/bench_h200.sh, 2026-12-01): span 8 x 128 positions: 1.3-2.3 -> 2.3-3.4 TB/s
         "sm_90": {"block_t": 128, "span": 8, "num_warps": 4, "num_stages": 2}}
DEFAULT_TILES = {"block_t": 64, "span": 1, "num_warps": 4, "num_stages": 2}


#: The bucket of this op's winners in the shipped tables (``jitkern/tuned/<arch>.json``, written by
#: ``tools/sweep_membw.py --apply``): one tile per arch and dtype, looked up before ``TILES``, after the
#: per-shape buckets of ``buckets()``.
TUNED_BUCKET = "default"
#: Positions scanned (batch x max_model_len) from which a launch counts as large (bucket suffix ``l``)
LARGE_TOKENS = 1 << 20


def buckets(next_n: int, tokens: int) -> tuple[str, ...]:
    """Shipped-table buckets for a launch, most specific first: ``n<next_n><s|l>`` (small or large by
    ``tokens`` = batch x max_model_len: few programs want short spans, many want long ones), then
    ``n<next_n>``, then ``default``."""
    return (f"n{next_n}{'l' if tokens >= LARGE_TOKENS else 's'}", f"n{next_n}", TUNED_BUCKET)


def _listed(arch_name: str, dtype: str, bucket: tuple[str, ...] = (TUNED_BUCKET,)) -> list[dict]:
    """The tile candidates before rules and overrides: the shipped winner of the first bucket that has
    one (if any), then ``TILES``."""
    base = TILES.get(arch_name, DEFAULT_TILES)
    won = tuning.shipped(arch_name, OP, dtype, bucket)
    return ([{**base, **won}] if won else []) + [base]
#: Every store masked by ``t < max_model_len``. Only tests turn this off, to show that redzone mode
#: catches the seed-001 bug.
MASK_STORES = True

#: Written once beside the template. The kernel takes the row stride, so redzone mode can guard rows.
CONTRACT = Contract(OP, (
    Buffer("out", lambda d: (d.rows, d.max_model_len), torch.float32, role="output", row_guard=True,
           doc="logits, one row per (sequence, next_n) query"),
))


def reference(q, kv_cache, weights, context_lens, block_tables, max_model_len: int, out=None):
    """Gather the pages, one batched matmul for all heads, ReLU, weighted head sum, causal mask."""
    b, nn, h, d = q.shape
    page = kv_cache.shape[1]
    nblk = min(block_tables.shape[1], -(-max_model_len // page))
    k = kv_cache[block_tables[:, :nblk].long()].reshape(b, nblk * page, d)[:, :max_model_len]
    s = torch.matmul(q.reshape(b, nn * h, d), k.transpose(1, 2)).float().relu_()
    logits = (s.view(b, nn, h, -1) * weights.view(b, nn, h, 1)).sum(2)
    pos = torch.arange(logits.shape[-1], device=q.device)
    limit = context_lens.view(b, 1, 1) - nn + 1 + torch.arange(nn, device=q.device).view(1, nn, 1)
    logits = logits.masked_fill(pos.view(1, 1, -1) >= limit, float("-inf")).view(b * nn, -1)
    y = out if out is not None else torch.empty(b * nn, max_model_len, dtype=torch.float32, device=q.device)
    y[:, :logits.shape[-1]] = logits
    y[:, logits.shape[-1]:] = float("-inf")
    return y


def config(dtype, page_size, heads, head_dim, next_n, arch_name, mask_stores=True, aligned=True,
           tile: dict | None = None) -> Config:
    """``aligned``: every stride is a multiple of 16 elements (16-byte vector loads and stores).
    ``tile``: the chosen tile; default ``tiles(arch_name)``."""
    t = tiles(arch_name, dtype) if tile is None else tile
    t = usable(t, arch_name, page_size, heads, next_n)
    t = {k: v for k, v in t.items() if v or k not in ("kv_load", "merge")}  # the defaults keep their old keys
    return Config.make("triton", dtype=dtype, page_size=page_size, heads=heads, head_dim=head_dim, next_n=next_n,
                       mask_stores=mask_stores, aligned=aligned, **t)


def usable(tile: dict, arch_name: str, page_size: int, heads: int, next_n: int, contiguous: bool = True) -> dict:
    """``tile`` with the fetch (``kv_load``) and ``merge`` choices it cannot use here turned down:
    a tile within one page needs ``block_t`` to divide ``page_size``; the descriptor fetch needs sm_90
    and pages one after another (``contiguous``); merging needs ``next_n * heads`` a power of two up
    to 256."""
    t = dict(tile)
    if t.get("kv_load") and page_size % t["block_t"]:
        t["kv_load"] = 0
    if t.get("kv_load") == 2 and (arch_name != "sm_90" or not contiguous):
        t["kv_load"] = 1
    nh = next_n * heads
    if t.get("merge") == 1 and (nh > 256 or nh & (nh - 1)):
        t["merge"] = 0
    return t


def tiles(arch_name: str, dtype: str = "bf16", bucket: tuple[str, ...] = (TUNED_BUCKET,)) -> dict:
    """block_t, span, num_warps, num_stages for an arch, after rules and env overrides (what
    ``call.tiles`` gives the plan for ``bucket``; prebuild and tools use this)."""
    return constraints.apply(arch_name, OP, _listed(arch_name, dtype, bucket), TUNABLES)[0]


def configs(arch):
    for dtype in ("bf16", "fp16"):
        for nn in NEXT_N:
            # every tile a launch of this next_n can get: the small and large buckets' (or the default)
            seen = []
            for size in (0, LARGE_TOKENS):
                t = tiles(arch.name, dtype, buckets(nn, size))
                if t in seen:
                    continue
                seen.append(t)
                for page in PAGE_SIZES:
                    for heads in HEADS:
                        for d in HEAD_DIMS:
                            for aligned in (True, False):
                                yield config(dtype, page, heads, d, nn, arch.name, aligned=aligned, tile=t)


def plan(call):
    """Validate one call signature and decide its launch (runs once per signature). ``MASK_STORES`` is
    read here, so a change applies to signatures decided after it (``jitkern.reset()``)."""
    q, kv_cache, weights, context_lens, block_tables, max_model_len, out = call.args
    checks.tensor(OP, "q", q, dtypes=DTYPES, ndim=4)
    checks.tensor(OP, "kv_cache", kv_cache, ndim=3, like=q)
    checks.same_dtype(OP, "kv_cache", kv_cache, q, "q")
    checks.tensor(OP, "weights", weights, dtypes=(torch.float32,), ndim=2, like=q)
    checks.tensor(OP, "context_lens", context_lens, dtypes=(torch.int32,), ndim=1, like=q)
    checks.tensor(OP, "block_tables", block_tables, dtypes=(torch.int32,), ndim=2, like=q)
    b, nn, h, d = q.shape
    if kv_cache.numel() == 0:
        raise checks.ShapeError(f"{OP}: kv_cache has no elements (shape {tuple(kv_cache.shape)})")
    page = kv_cache.shape[1]
    for what, v, ok in (("next_n", nn, NEXT_N), ("heads", h, HEADS), ("head_dim", d, HEAD_DIMS),
                        ("page size", page, PAGE_SIZES)):
        if v not in ok and b:
            raise checks.ShapeError(f"{OP}: {what} {v} is not supported; supported: {ok}")
    if kv_cache.shape[2] != d:
        raise checks.ShapeError(f"{OP}: kv_cache head_dim {kv_cache.shape[2]} != q head_dim {d}")
    checks.shape(OP, "weights", weights, (b * nn, h))
    checks.shape(OP, "context_lens", context_lens, (b,))
    checks.contiguous(OP, "context_lens", context_lens)
    if block_tables.shape[0] != b:
        raise checks.ShapeError(f"{OP}: block_tables has {block_tables.shape[0]} rows for a batch of {b}")
    max_len = checks.integer(OP, "max_model_len", max_model_len, minimum=0)
    if max_len > block_tables.shape[1] * page:
        raise checks.ShapeError(f"{OP}: max_model_len {max_len} exceeds what block_tables can address "
                                f"({block_tables.shape[1]} blocks x {page} tokens)")
    for name, t in (("q", q), ("kv_cache", kv_cache), ("weights", weights), ("block_tables", block_tables)):
        checks.unit_last_stride(OP, name, t)
    if not redzone.enabled():  # the op's hot path passes the caller's out without prepare
        CONTRACT.check_outputs(q.device, dict(rows=b * nn, max_model_len=max_len), out=out)
    checks.tensor(OP, "out", out, dtypes=(torch.float32,), ndim=2, like=q)
    checks.shape(OP, "out", out, (b * nn, max_len))
    checks.unit_last_stride(OP, "out", out)
    if b == 0 or max_len == 0:
        return None  # empty work: nothing to launch
    checks.fits_i32(OP, "max_model_len", max_len)
    strides = (q.stride(0), q.stride(1), q.stride(2), kv_cache.stride(0), kv_cache.stride(1), weights.stride(0),
               out.stride(0), block_tables.stride(0))
    aligned = all(s % 16 == 0 for s in strides[:-1])  # block-table reads are scalar anyway
    tile = call.tiles([TILES.get(call.arch.name, DEFAULT_TILES)], dtype=checks.TRITON_TYPE[q.dtype],
                      bucket=buckets(nn, b * max_len))[0]
    kv_rows = kv_cache.shape[0] * page
    checks.fits_i32(OP, "kv_cache's rows (blocks x page_size)", kv_rows)
    tile = usable(tile, call.arch.name, page, h, nn, contiguous=kv_cache.stride(0) == page * kv_cache.stride(1))
    cfg = config(checks.TRITON_TYPE[q.dtype], page, h, d, nn, call.arch.name, MASK_STORES, aligned, tile=tile)
    span = tile["block_t"] * tile["span"]
    return Candidate(Launch(cfg, (b, -(-max_len // span)),
                            (In("q"), In("kv_cache"), In("weights"), In("context_lens"), In("block_tables"),
                             In("out"), *strides, max_len, kv_rows)))


def check_tables(call):
    """JITKERN_DEBUG=checks: the table contract of the module docstring, on the host (``TableError``)."""
    q, kv_cache, weights, context_lens, block_tables, max_model_len, out = call.args
    nb, page = kv_cache.shape[0], kv_cache.shape[1]
    lens = table_checks.host(context_lens)
    table_checks.within(OP, "context_lens", lens, 0, max_model_len, inclusive=True, what="max_model_len")
    table_checks.within(OP, "block_tables", table_checks.host(block_tables), 0, nb,
                        used=table_checks.used_blocks(lens, page, block_tables.shape[1]),
                        what="kv_cache.shape[0], the number of blocks; entries past a sequence's length are not read")


def paged_mqa_logits(q: torch.Tensor, kv_cache: torch.Tensor, weights: torch.Tensor, context_lens: torch.Tensor,
                     block_tables: torch.Tensor, max_model_len: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Indexer logits into ``out`` [batch * next_n, max_model_len] fp32 (allocated if not given)."""
    if out is not None and not redzone.enabled():  # the plan checked out against the contract
        _dispatch(q, kv_cache, weights, context_lens, block_tables, max_model_len, out)
        return out
    max_model_len = checks.integer(OP, "max_model_len", max_model_len, minimum=0)
    if isinstance(q, torch.Tensor) and q.dim() == 4:
        bufs = CONTRACT.prepare(q.device, dict(rows=q.shape[0] * q.shape[1], max_model_len=max_model_len), out=out)
        args = (q, kv_cache, weights, context_lens, block_tables, max_model_len, bufs["out"])
        ran = _dispatch(*args)
        bufs.finish(_dispatch.describe_ran(ran, *args) if redzone.enabled() else ran)
        return bufs.result("out")
    _dispatch(q, kv_cache, weights, context_lens, block_tables, max_model_len, out)  # raises: the plan says why


def alloc(q, kv_cache, weights, context_lens, block_tables, max_model_len, out=None):
    """The ``out`` paged_mqa_logits allocates (torch.compile path)."""
    return {"out": torch.empty(q.shape[0] * q.shape[1], max_model_len, dtype=torch.float32, device=q.device)}


SPEC = registry.register(OpSpec(
    name=OP,
    variants=(Variant(
        name="triton",
        template="triton.py.j2",
        kernel="paged_mqa_logits_kernel",
        args=(
            Arg("q_ptr", "*{dtype}"), Arg("k_ptr", "*{dtype}"), Arg("w_ptr", "*fp32"), Arg("lens_ptr", "*i32"),
            Arg("bt_ptr", "*i32"), Arg("out_ptr", "*fp32"),
            *(Arg(n, "i64", divisible_if="aligned") for n in ("stride_qb", "stride_qn", "stride_qh", "stride_kb",
                                                               "stride_kt", "stride_w", "stride_out")),
            Arg("stride_bt", "i64"), Arg("max_model_len", "i32"), Arg("kv_rows", "i32"),
        ),
    ),),
    template_dir=builtin_template_dir() / OP,
    fn=paged_mqa_logits,
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
