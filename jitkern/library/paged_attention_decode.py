"""paged_attention_decode: one query token per sequence attending to its paged KV cache (split-KV).

``q`` [batch, num_heads, head_dim]; ``k_cache``/``v_cache`` [num_blocks, page_size, num_kv_heads,
head_dim] (each token's head vector contiguous); ``block_tables`` [batch, max_blocks] int32;
``seq_lens`` [batch] int32. Returns ``out`` [batch, num_heads, head_dim] in q's dtype; a sequence of
length 0 gives zeros.

Two kernels (variants ``partition`` and ``combine``, always launched together): every
``partition``-token slice of a sequence is attended by its own program, which writes a normalised
partial output and its softmax (max, sum) to a workspace; ``combine`` merges them.

The workspace holds one slot per partition of the longest sequence the launch can see, and that is
bounded by the *capacity*: ``min(max_context_len, tokens the KV cache holds, tokens block_tables can
address)``. Seed 000 sized it from the model's theoretical maximum context (131K) instead of what the
KV cache could hold (25K): 16 GiB instead of 3 GiB. Engines that pre-allocate call
``workspace_nbytes(...)`` with the same numbers. ``seq_lens`` must not exceed the capacity; tokens
past it are not read (the grid ends there), so the kernel never reads past ``block_tables``.

Table contract (the caller's; checked before the launch under ``JITKERN_DEBUG=checks``):
``seq_lens`` in ``[0, capacity]``; the block-table entries a sequence reads (its first
``ceil(seq_len / page_size)``) lie in ``[0, num_blocks)``.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from .. import checks, constraints, tuning, contracts, redzone, registry, table_checks
from ..contracts import Buffer, Contract
from ..render import builtin_template_dir
from ..dispatch import dispatcher
from ..spec import Arg, Candidate, Config, In, Launch, OpSpec, Scalar, Scratch, Variant

OP = "paged_attention_decode"
DTYPES = (torch.bfloat16, torch.float16)
PAGE_SIZES = (16, 32, 64)
HEAD_DIMS = (64, 128, 256)
GROUPS = (1, 2, 4, 8, 16)
#: tile parameters and the values ``JITKERN_PAGED_ATTENTION_DECODE_<PARAM>`` may set
TUNABLES = {
    "partition": (32, 64, 256, 512, 1024, 2048),
    "block_n": (16, 32, 64, 128),
    "num_warps": (2, 4, 8),
    "num_stages": (1, 2, 3, 4),
    # halve the partition (down to 256, and not below block_n) while the workspace would have fewer
    # (sequence, head, partition) rows than this: more programs for small batches at short contexts
    "min_rows": (0, 1024, 2048, 4096, 8192, 16384),
    # 1: grid (kv_heads, batch, partitions), a sequence's heads next to each other in launch order
    "head_major": (0, 1),
}
#: tokens per partition and per inner step, by arch (the interpreter uses small ones so CPU tests
#: cover several partitions with a few dozen tokens)
TILES = {"cpu": {"partition": 32, "block_n": 16, "num_warps": 4, "num_stages": 1},
         # H200 sweeps (tools/bench_h200.sh, 2026-12-01, tools/results/issue19_h200_2026-12-01_run*): best
         # total over b=32/2K, 64/8K, 32/32K; 3.2-4.4 TB/s on the benchmark's five shapes
         "sm_90": {"partition": 2048, "block_n": 128, "num_warps": 4, "num_stages": 3}}
#: H100 sweep (tools/bench_seed_ops.py --sweep, 2026-11-23, aligned strides): block_n 32 and 64,
#: partition 256/512/1024 and num_stages 2-4 all within 2% of each other (2.8-2.9 TB/s at b=64, 8K).
#: Without the 16-element stride specialisation every K/V load is scalar and the kernel is ~3.5x slower.
DEFAULT_TILES = {"partition": 512, "block_n": 32, "num_warps": 4, "num_stages": 2}


#: The bucket of this op's winners in the shipped tables (``jitkern/tuned/<arch>.json``, written by
#: ``tools/sweep_membw.py --apply``): one tile per arch and dtype, looked up before ``TILES``.
TUNED_BUCKET = "default"
#: Launches whose capacity is at most this many tokens (a decode step of short sequences: one
#: partition, a few pages per program) look up the shipped ``short`` bucket first: their tile is a
#: latency choice (how many programs share an SM), where the default's is one of streaming long contexts.
SHORT_CAP = 512
#: Short launches with at least this many (sequence, query head) rows fill the GPU several times over
#: and look up ``short_l`` first (small steps, more programs per SM); fewer rows take ``short``.
MANY_ROWS = 2048


def buckets(cap: int, rows: int = 0) -> tuple[str, ...]:
    """Shipped-table buckets for a launch of capacity ``cap`` over ``rows`` = batch x num_heads, most
    specific first."""
    if cap > SHORT_CAP:
        return (TUNED_BUCKET,)
    return (("short_l",) if rows >= MANY_ROWS else ()) + ("short", TUNED_BUCKET)


def _listed(arch_name: str, dtype: str, bucket: tuple[str, ...] = (TUNED_BUCKET,)) -> list[dict]:
    """The tile candidates before rules and overrides: the shipped winner of the first bucket that has
    one (if any), then ``TILES``."""
    base = TILES.get(arch_name, DEFAULT_TILES)
    won = tuning.shipped(arch_name, OP, dtype, bucket)
    return ([{**base, **won}] if won else []) + [base]
BLOCK_P = 16
#: One partition covering the capacity: the partition kernel writes ``out`` itself and no combine runs
#: (the workspace is still sized and checked as the contract says; tests turn this off to compare).
DIRECT = True

#: Written once beside the template. ``parts`` = cdiv(capacity, partition).
CONTRACT = Contract(OP, (
    Buffer("out", lambda d: (d.batch, d.heads, d.head_dim), lambda d: d.dtype, role="output"),
    Buffer("workspace", lambda d: (d.batch * d.heads * d.parts * (d.head_dim + 2),), torch.float32,
           role="workspace", doc="per (seq, head, partition): partial output [head_dim], then (max, sum)"),
))


def tiles(arch_name: str, dtype: str = "bf16", bucket: tuple[str, ...] = (TUNED_BUCKET,)) -> dict:
    """partition, block_n, num_warps, num_stages for an arch, after rules and env overrides (what
    ``call.tiles`` gives the plan for ``bucket``; prebuild and tools use this)."""
    return constraints.apply(arch_name, OP, _listed(arch_name, dtype, bucket), TUNABLES)[0]


def capacity(max_context_len: int | None, kv_cache_tokens: int, table_tokens: int | None = None) -> int:
    """The longest sequence a launch can see: what the KV cache holds, not the model's maximum."""
    cap = kv_cache_tokens if table_tokens is None else min(kv_cache_tokens, table_tokens)
    return cap if max_context_len is None else min(cap, int(max_context_len))


def workspace_nbytes(batch: int, num_heads: int, head_dim: int, max_context_len: int | None,
                     kv_cache_tokens: int, table_tokens: int | None = None, arch: str = "sm_90") -> int:
    """Bytes of the ``workspace`` the op needs (for engines that pre-allocate, e.g. for CUDA graphs).
    ``table_tokens``: ``block_tables.shape[1] * page_size`` if it bounds the context further."""
    cap = capacity(max_context_len, kv_cache_tokens, table_tokens)
    parts = -(-cap // partition_for(tiles(arch, bucket=buckets(cap, batch * num_heads)), batch, num_heads, cap))
    return CONTRACT.nbytes(batch=batch, heads=num_heads, head_dim=head_dim, parts=parts,
                           dtype=torch.bfloat16)["workspace"]


def reference(q, k_cache, v_cache, block_tables, seq_lens, scale=None, max_context_len=None, out=None,
              workspace=None):
    """Gather each sequence's pages into a dense padded K/V and run SDPA with a length mask."""
    b, h, d = q.shape
    page, hkv = k_cache.shape[1], k_cache.shape[2]
    longest = int(seq_lens.max()) if b else 0
    nblk = max(1, -(-longest // page))
    idx = block_tables[:, :nblk].long()
    k = k_cache[idx].reshape(b, nblk * page, hkv, d)[:, :longest].transpose(1, 2)
    v = v_cache[idx].reshape(b, nblk * page, hkv, d)[:, :longest].transpose(1, 2)
    mask = torch.arange(longest, device=q.device)[None, :] < seq_lens[:, None]
    y = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None, :], k, v, attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=hkv != h)[:, :, 0]
    y = torch.where((seq_lens > 0)[:, None, None], y, torch.zeros((), dtype=y.dtype, device=y.device))
    if out is not None:
        out.copy_(y)
        return out
    return y


def partition_for(tile: dict, batch: int, num_heads: int, cap: int) -> int:
    """The partition a launch uses: the tile's, halved while ``batch * num_heads * cdiv(cap, partition)``
    is under the tile's ``min_rows`` (never below 256 or ``block_n``). The plan and ``workspace_nbytes``
    both size the workspace with it."""
    part, want = tile["partition"], tile.get("min_rows", 0)
    while want and part // 2 >= max(256, tile["block_n"]) and batch * num_heads * -(-cap // part) < want:
        part //= 2
    return part


def partition_config(dtype, page_size, head_dim, group, arch_name, aligned=True, tile: dict | None = None,
                     direct: bool = False) -> Config:
    """``aligned``: every stride is a multiple of 16 elements, so Triton may use 16-byte vector loads
    for the gathered K/V rows (without it every load is scalar: ~4x slower on the H100).
    ``tile``: the chosen tile; default ``tiles(arch_name)``."""
    t = tiles(arch_name, dtype) if tile is None else tile
    # min_rows is a grid decision, not a build parameter; head_major=0 keeps the old keys
    t = {k: v for k, v in t.items() if k != "min_rows" and (k != "head_major" or v)}
    if direct:  # ``direct``: the launch has one partition and writes ``out`` (no combine)
        t["direct"] = True
    return Config.make("partition", dtype=dtype, page_size=page_size, head_dim=head_dim, group=group,
                       group_pad=max(16, 1 << (group - 1).bit_length()), aligned=aligned, **t)


def combine_config(dtype, head_dim, arch_name, tile: dict | None = None) -> Config:
    part = (tiles(arch_name, dtype) if tile is None else tile)["partition"]
    return Config.make("combine", dtype=dtype, head_dim=head_dim, partition=part, block_p=BLOCK_P, num_warps=4)


def configs(arch):
    seen = set()
    for dtype in ("bf16", "fp16"):
        # every tile a launch can get: the default's, and the short buckets' (a short launch whose
        # partition covers SHORT_CAP has one partition: the direct kernel alone, no combine)
        modes: dict = {}
        for cap, rows in ((SHORT_CAP + 1, 0), (SHORT_CAP, 0), (SHORT_CAP, MANY_ROWS)):
            tile = tiles(arch.name, dtype, buckets(cap, rows))
            only = cap <= SHORT_CAP and tile["partition"] >= SHORT_CAP
            modes.setdefault(tuple(sorted(tile.items())), (True,) if only else (False, True))
        for tile, direct_modes in modes.items():
            tile = dict(tile)
            for head_dim in HEAD_DIMS:
                cfgs = [] if direct_modes == (True,) else [combine_config(dtype, head_dim, arch.name, tile)]
                cfgs += [partition_config(dtype, page, head_dim, group, arch.name, aligned, tile, direct)
                         for page in PAGE_SIZES for group in GROUPS for aligned in (True, False)
                         for direct in direct_modes]
                for cfg in cfgs:
                    if cfg not in seen:
                        seen.add(cfg)
                        yield cfg


def _zeros(q, k_cache, v_cache, block_tables, seq_lens, scale, max_context_len, out, workspace):
    out.zero_()  # nothing can be attended (capacity 0): every sequence is empty


def _with_workspace(parts, q, k_cache, v_cache, block_tables, seq_lens, scale, max_context_len, out, workspace):
    """The workspace is sized by the plan's partition (an arch tile): allocate it from the contract (or
    take the caller's, checked and cut to size) and run the two kernels on it."""
    b, h, d = q.shape
    bufs = CONTRACT.prepare(q.device, dict(batch=b, heads=h, head_dim=d, parts=parts, dtype=q.dtype),
                            out=out, workspace=workspace)
    args = (q, k_cache, v_cache, block_tables, seq_lens, scale, max_context_len, bufs["out"], bufs["workspace"])
    ran = _dispatch(*args)
    bufs.finish(_dispatch.describe_ran(ran, *args) if redzone.enabled() else ran)  # redzone: shadows written back to out


def plan(call):
    """Validate one call signature; decide the partition (a tile), the capacity and the two launches.

    The workspace's size follows the partition, which only the plan knows: with no workspace given
    the framework allocates it per call (``Scratch``); a caller's workspace of exactly the contract's
    size is used as it is; a larger one (or any call in redzone mode, whose guards pad every buffer)
    runs ``_with_workspace``, which cuts it to size (or allocates it padded) and dispatches again."""
    q, k_cache, v_cache, block_tables, seq_lens, scale, max_context_len, out, workspace = call.args
    checks.tensor(OP, "q", q, dtypes=DTYPES, ndim=3)
    checks.tensor(OP, "k_cache", k_cache, ndim=4, like=q)
    checks.tensor(OP, "v_cache", v_cache, ndim=4, like=q)
    checks.same_dtype(OP, "k_cache", k_cache, q, "q")
    checks.same_dtype(OP, "v_cache", v_cache, q, "q")
    checks.shape(OP, "v_cache", v_cache, k_cache.shape)
    checks.tensor(OP, "block_tables", block_tables, dtypes=(torch.int32,), ndim=2, like=q)
    checks.tensor(OP, "seq_lens", seq_lens, dtypes=(torch.int32,), ndim=1, like=q)
    b, h, d = q.shape
    nb, page, hkv, dk = k_cache.shape
    if k_cache.numel() == 0:
        raise checks.ShapeError(f"{OP}: k_cache has no elements (shape {tuple(k_cache.shape)})")
    if dk != d:
        raise checks.ShapeError(f"{OP}: k_cache head_dim {dk} != q head_dim {d}")
    if d not in HEAD_DIMS:
        raise checks.ShapeError(f"{OP}: head_dim {d} is not supported; supported: {HEAD_DIMS}")
    if page not in PAGE_SIZES:
        raise checks.ShapeError(f"{OP}: page size {page} is not supported; supported: {PAGE_SIZES}")
    if hkv == 0 or h % hkv or h // hkv not in GROUPS:
        raise checks.ShapeError(f"{OP}: num_heads {h} must be num_kv_heads {hkv} times one of {GROUPS}")
    checks.shape(OP, "seq_lens", seq_lens, (b,))
    checks.contiguous(OP, "seq_lens", seq_lens)
    if block_tables.shape[0] != b:
        raise checks.ShapeError(f"{OP}: block_tables has {block_tables.shape[0]} rows for a batch of {b}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables)):
        checks.unit_last_stride(OP, name, t)
    if max_context_len is not None:
        max_context_len = checks.integer(OP, "max_context_len", max_context_len, minimum=0)
    checks.tensor(OP, "out", out, like=q)
    checks.same_dtype(OP, "out", out, q, "q")
    checks.shape(OP, "out", out, (b, h, d))
    checks.unit_last_stride(OP, "out", out)
    cap = capacity(max_context_len, nb * page, block_tables.shape[1] * page)
    tile = call.tiles([TILES.get(call.arch.name, DEFAULT_TILES)], dtype=checks.TRITON_TYPE[q.dtype],
                      bucket=buckets(cap, b * h))[0]
    tile = dict(tile, partition=partition_for(tile, b, h, cap))
    part = tile["partition"]
    parts = -(-cap // part)
    need = b * h * parts * (d + 2)
    if workspace is not None:  # the caller's: the contract's check (BufferError naming the sizes)
        contracts.check(OP, CONTRACT.buffers[1], workspace, (need,), torch.float32, q.device)
    if b == 0:
        return None  # empty work: nothing to launch
    if parts == 0:
        return Candidate(torch=_zeros, name="zeros")
    direct = parts == 1 and DIRECT  # one partition: the partition kernel writes out itself
    if workspace is None and direct and not redzone.enabled():
        ws = In("out")  # a placeholder address: the direct kernel never touches the workspace
    elif workspace is None and not redzone.enabled():
        ws = Scratch((need,), torch.float32, "workspace")  # allocated by the framework for each call
    elif workspace is None or workspace.dim() != 1 or workspace.shape[0] != need:
        return Candidate(torch=functools.partial(_with_workspace, parts), name="workspace")
    else:
        ws = In("workspace")
    for what, v in (("the batch", b), ("num_heads", h), ("the partition count", parts)):
        checks.fits_i32(OP, what, v)
    strides = (q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
               v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0))
    aligned = all(s % 16 == 0 for s in strides[:-1])  # block-table reads are scalar anyway
    dt, group = checks.TRITON_TYPE[q.dtype], h // hkv
    ml_offset = b * h * parts * d  # the (max, sum) pairs follow the partial outputs
    stage1 = Launch(partition_config(dt, page, d, group, call.arch.name, aligned, tile=tile, direct=direct),
                    (hkv, b, parts) if tile.get("head_major") else (b, hkv, parts),
                    (In("q"), In("k_cache"), In("v_cache"), In("block_tables"), In("seq_lens"), ws,
                     ml_offset, *strides, h, parts, In("scale"), In("out"), out.stride(0), out.stride(1)))
    if direct:
        return Candidate((stage1,))
    stage2 = Launch(combine_config(dt, d, call.arch.name, tile=tile), (b, h),
                    (In("seq_lens"), ws, ml_offset, In("out"), out.stride(0), out.stride(1), h, parts))
    return Candidate((stage1, stage2))


def check_tables(call):
    """JITKERN_DEBUG=checks: the table contract of the module docstring, on the host (``TableError``)."""
    q, k_cache, v_cache, block_tables, seq_lens, scale, max_context_len, out, workspace = call.args
    nb, page = k_cache.shape[0], k_cache.shape[1]
    max_blocks = block_tables.shape[1]
    cap = capacity(max_context_len, nb * page, max_blocks * page)
    lens = table_checks.host(seq_lens)
    table_checks.within(OP, "seq_lens", lens, 0, cap, inclusive=True,
                        what=f"the capacity: min(max_context_len = {max_context_len}, the KV cache's {nb} x {page} "
                             f"tokens, block_tables.shape[1] x page_size = {max_blocks} x {page})")
    table_checks.within(OP, "block_tables", table_checks.host(block_tables), 0, nb,
                        used=table_checks.used_blocks(lens, page, max_blocks),
                        what="k_cache.shape[0], the number of blocks; entries past a sequence's length are not read")


def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: Optional[float] = None, max_context_len: Optional[int] = None,
                           out: Optional[torch.Tensor] = None, workspace: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Decode attention over a paged KV cache. ``scale``: default ``1/sqrt(head_dim)``.
    ``workspace``: fp32, at least ``workspace_nbytes`` bytes (allocated per call if not given)."""
    q_ok = isinstance(q, torch.Tensor) and q.dim() == 3
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q_ok and q.shape[-1] else 1.0
    else:  # checked here too: a bad value must not reach the per-call check inside _with_workspace
        scale = checks.scalar(OP, "scale", scale, minimum=0.0)
    if out is None and q_ok:
        out = torch.empty_like(q)
    _dispatch(q, k_cache, v_cache, block_tables, seq_lens, scale, max_context_len, out, workspace)
    return out


def alloc(q, k_cache, v_cache, block_tables, seq_lens, scale=None, max_context_len=None, out=None, workspace=None):
    """The ``out`` paged_attention_decode allocates (torch.compile path)."""
    return {"out": torch.empty_like(q)}


_PARTITION_ARGS = (
    Arg("q_ptr", "*{dtype}"), Arg("k_ptr", "*{dtype}"), Arg("v_ptr", "*{dtype}"), Arg("bt_ptr", "*i32"),
    Arg("lens_ptr", "*i32"), Arg("ws_ptr", "*fp32"), Arg("ml_offset", "i64"),
    *(Arg(n, "i64", divisible_if="aligned") for n in ("stride_qb", "stride_qh", "stride_kb", "stride_kt", "stride_kh",
                                                       "stride_vb", "stride_vt", "stride_vh")),
    Arg("stride_bt", "i64"),
    Arg("n_heads", "i32"), Arg("n_parts", "i32"), Arg("scale", "fp32"),
    Arg("out_ptr", "*{dtype}"), Arg("stride_ob", "i64"), Arg("stride_oh", "i64"),  # direct configs write out
)
_COMBINE_ARGS = (
    Arg("lens_ptr", "*i32"), Arg("ws_ptr", "*fp32"), Arg("ml_offset", "i64"), Arg("out_ptr", "*{dtype}"),
    Arg("stride_ob", "i64"), Arg("stride_oh", "i64"), Arg("n_heads", "i32"), Arg("n_parts", "i32"),
)

SPEC = registry.register(OpSpec(
    name=OP,
    variants=(
        Variant(name="partition", template="partition.py.j2", kernel="pa_decode_partition_kernel", args=_PARTITION_ARGS),
        Variant(name="combine", template="combine.py.j2", kernel="pa_decode_reduce_kernel", args=_COMBINE_ARGS),
    ),
    template_dir=builtin_template_dir() / OP,
    fn=paged_attention_decode,
    reference=reference,
    configs=configs,
    plan=plan,
    tunables=TUNABLES,
    scalars={"scale": Scalar(float, min=0.0)},
    doc=__doc__,
    extra={"contract": CONTRACT, "stages": ("partition", "combine")},
    mutates=("workspace",),
    outputs=("out",),
    alloc=alloc,
    debug_checks=check_tables,
))
_dispatch = dispatcher(SPEC)
