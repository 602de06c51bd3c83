"""gather_kv_cache: copy the committed tokens of every sequence out of a paged KV cache.

``kv_cache`` [num_blocks, page_size, *entry] (any trailing layout that is contiguous per token),
``block_table`` [batch, max_blocks] int32, ``cu_seq_lens`` [batch + 1] int32 (prefix sums of the
sequences' token counts). Returns ``out`` [num_tokens, *entry] with sequence b's tokens at rows
``cu_seq_lens[b] : cu_seq_lens[b+1]``. Zero tokens (an empty prefill, as in seed 003) is valid input
and returns an empty tensor without a launch.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import checks, constraints, registry, runtime
from ..contracts import Buffer, Contract
from ..render import builtin_template_dir
from ..spec import Arg, Config, OpSpec, Variant

OP = "gather_kv_cache"
DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.uint8, torch.int8)
PAGE_SIZES = (1, 16, 32, 64, 128, 256)
#: Tile parameters (values ``JITKERN_GATHER_KV_CACHE_<PARAM>`` may set): tokens and entry elements per
#: step, warps, and the most programs per sequence (max_splits).
TUNABLES = {"block_t": (8, 16, 32, 64), "block_e": (64, 128, 256, 512, 1024), "num_warps": (1, 2, 4, 8),
            "max_splits": (16, 32, 64, 128, 256)}
TILES = {  # H200 sweeps (tools/bench_h200.sh, 2026-12-01): page runs of 8 x 256 elements, 3.4-3.9 TB/s
    "sm_90": {"block_t": 8, "block_e": 256, "num_warps": 8, "max_splits": 256}}
DEFAULT_TILES = {"block_t": 16, "block_e": 256, "num_warps": 4, "max_splits": 64}
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


def tiles(arch_name: str) -> dict:
    """block_t, block_e, num_warps, max_splits for an arch, after rules and env overrides."""
    return constraints.apply(arch_name, OP, [TILES.get(arch_name, DEFAULT_TILES)], TUNABLES)[0]


def config(dtype: str, page_size: int, aligned: bool, arch_name: str = "", flat: bool = False) -> Config:
    """``flat``: token rows contiguous in the cache and in ``out`` (copies whole page runs)."""
    t = tiles(arch_name)
    extra = {"flat": True} if flat else {}  # only flat configs carry the flag (others keep their keys)
    return Config.make("triton", dtype=dtype, page_size=page_size, aligned=aligned, block_t=t["block_t"],
                       block_e=t["block_e"], num_warps=t["num_warps"], **extra)


def configs(arch):
    for dtype in ("bf16", "fp16", "fp32", "u8", "i8"):
        for page in PAGE_SIZES:
            for aligned in (True, False):
                yield config(dtype, page, aligned, arch.name)
                yield config(dtype, page, aligned, arch.name, flat=True)


_plans = runtime.plan_cache()


def gather_kv_cache(kv_cache: torch.Tensor, block_table: torch.Tensor, cu_seq_lens: torch.Tensor,
                    num_tokens: Optional[int] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Gather committed tokens; ``num_tokens`` (= ``cu_seq_lens[-1]``) avoids a device sync when given
    (and is needed under torch.compile unless ``out`` is passed)."""
    checks.tensor(OP, "kv_cache", kv_cache, dtypes=DTYPES)
    if kv_cache.dim() < 3:
        raise checks.ShapeError(f"{OP}: kv_cache must be [num_blocks, page_size, *entry], got {tuple(kv_cache.shape)}")
    checks.tensor(OP, "block_table", block_table, dtypes=(torch.int32,), ndim=2, like=kv_cache)
    checks.tensor(OP, "cu_seq_lens", cu_seq_lens, dtypes=(torch.int32,), ndim=1, like=kv_cache)
    batch = block_table.shape[0]
    checks.shape(OP, "cu_seq_lens", cu_seq_lens, (batch + 1,))
    page = kv_cache.shape[1]
    if page not in PAGE_SIZES:
        raise checks.ShapeError(f"{OP}: page size {page} is not supported; supported: {PAGE_SIZES}")
    entry = tuple(kv_cache.shape[2:])
    e = math.prod(entry)
    tok = kv_cache[0, 0] if kv_cache.shape[0] and page else None
    if tok is not None and not tok.is_contiguous():
        raise checks.LayoutError(f"{OP}: each token's entry of kv_cache must be contiguous (strides "
                                 f"{tuple(kv_cache.stride())}); pass kv_cache.contiguous()")
    if num_tokens is None:
        num_tokens = out.shape[0] if out is not None else int(cu_seq_lens[-1])
    bufs = CONTRACT.prepare(kv_cache.device, dict(num_tokens=num_tokens, entry=entry, dtype=kv_cache.dtype), out=out)
    if num_tokens == 0 or batch == 0 or e == 0:
        return bufs.result("out")  # empty work: nothing to launch
    o = bufs["out"]
    if block_table.stride(1) != 1:
        raise checks.LayoutError(f"{OP}: block_table must be contiguous in its last dimension")
    for name, t in (("kv_cache", kv_cache), ("block_table", block_table), ("cu_seq_lens", cu_seq_lens), ("out", o)):
        checks.aligned(OP, name, t)
    strides = (kv_cache.stride(0), kv_cache.stride(1), block_table.stride(0), o.stride(0))
    aligned = e % 16 == 0 and all(s % 16 == 0 for s in strides)
    flat = strides[1] == e and strides[3] == e
    sig = (kv_cache.dtype, kv_cache.device, page, aligned, flat)
    k = _plans.get(sig)
    if k is None:
        select_arch, _ = runtime.arches_for(kv_cache.device)
        cfg = config(checks.TRITON_TYPE[kv_cache.dtype], page, aligned, select_arch.name, flat)
        k = _plans[sig] = (runtime.kernel(SPEC, cfg, kv_cache.device), tiles(select_arch.name)["max_splits"])
    k, max_splits = k
    per_program = page if flat else k.job.config.p["block_t"]  # tokens one step of a program covers
    splits = max(1, min(max_splits, -(-num_tokens // (batch * per_program))))
    k[(batch, splits)](kv_cache, block_table, cu_seq_lens, o, *strides, e)
    bufs.finish(k)
    return bufs.result("out")


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
    doc=__doc__,
    extra={"contract": CONTRACT, "tunables": TUNABLES},
    outputs=("out",),
    alloc=alloc,
))
