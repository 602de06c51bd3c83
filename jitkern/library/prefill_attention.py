"""prefill_attention: causal (or full) multi-head attention over variable-length sequences packed along
tokens, with grouped-query attention: the prefill half of an attention layer.

``q`` [tokens, num_heads, head_dim]; ``k``/``v`` [tokens, num_kv_heads, head_dim]; bf16, fp16 or fp32,
all three alike; ``num_heads`` a multiple of ``num_kv_heads`` (query head ``h`` reads kv head
``h // (num_heads // num_kv_heads)``); ``head_dim`` a power of two from 16 to 256. Each head vector must
be contiguous (last stride 1); the token and head strides are free, so the q/k/v views of a fused QKV
projection (``qkv[:, :hq * d].view(tokens, hq, d)``, ...) are read in place, without copies.
``cu_seqlens`` [batch + 1] int32: sequence ``b`` is tokens ``cu_seqlens[b]:cu_seqlens[b + 1]``
(``cu_seqlens[0] = 0``, non-decreasing; q and k share them). ``max_seqlen``: a bound on the longest
sequence, which sizes the grid. ``causal``: query ``i`` of a sequence attends keys ``0..i`` of the same
sequence (positions from the sequence's start); otherwise every key of its sequence.

Returns ``out`` [tokens, num_heads, head_dim] in q's dtype (given: any layout with a contiguous head
vector; else allocated contiguous). Rows of tokens past ``cu_seqlens[batch]`` are not written.

One Triton kernel, flash-attention style: program (query block, sequence, head) keeps an online softmax
in fp32 (``exp2``, ``scale * log2(e)`` folded into the scores), fp32 accumulators, and casts once at the
end. Programs whose query block starts past their sequence's length exit at once; causal programs stop
the key loop at the diagonal and mask only the diagonal blocks. ``cu_seqlens`` is read on the device
only: no host sync, so a CUDA graph can capture the op (``max_seqlen`` is a Python int for that reason).

Table contract (the caller's; checked before the launch under ``JITKERN_DEBUG=checks``):
``cu_seqlens[0] = 0``, non-decreasing, ``cu_seqlens[batch] <= tokens``, and no sequence longer than
``max_seqlen`` (the tokens of a longer one past ``max_seqlen`` would not be computed).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import checks, constraints, registry, table_checks, tuning
from ..dispatch import dispatcher
from ..render import builtin_template_dir
from ..spec import Arg, Candidate, Config, In, Launch, OpSpec, Scalar, Variant

OP = "prefill_attention"
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
HEAD_DIMS = (16, 32, 64, 128, 256)
#: CUDA's limit on the grid's 2nd and 3rd sizes (sequences, heads)
MAX_GRID_YZ = 65535
#: tile parameters and the values ``JITKERN_PREFILL_ATTENTION_<PARAM>`` may set
TUNABLES = {
    "block_m": (16, 32, 64, 128, 256),
    "block_n": (16, 32, 64, 128),
    "num_warps": (1, 2, 4, 8),
    "num_stages": (1, 2, 3, 4),
}
#: Tiles by arch and (input class, head_dim class): ``"16"`` is bf16/fp16 with head_dim <= 128, ``"16w"``
#: bf16/fp16 with head_dim 256, ``"32"``/``"32w"`` fp32 likewise (its dot products run in full fp32, not tf32:
#: FMA-bound, so smaller tiles). The interpreter uses small tiles so CPU tests cover several blocks with a few
#: dozen tokens. sm_90 (227 KiB shared memory): K and V tiles pipelined over 3 stages, 128 query rows over 8
#: warps. gfx942 (64 KiB LDS) and gfx950 (160 KiB LDS): 64-wide waves, 4 of them for a 128-row accumulator,
#: one stage; the limit there is registers (512 per lane, VGPRs and AGPRs): offline builds for gfx942/gfx950
#: (2026-12, Triton 3.6) of 128x64 tiles at head_dim 128 use 436-482 of them, and gfx950's 2-stage pipeline
#: (554-680, unaligned strides), 64x64 tiles at head_dim 256 (520-708) and fp32 tiles of 32x32 at head_dim
#: 256 (520-578) do not fit; 16x32 fp32 ones there use 312-352. Every configuration below fits its arch.
TILES = {
    "cpu": {"16": {"block_m": 16, "block_n": 16, "num_warps": 4, "num_stages": 1}},
    "sm_90": {"16": {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3},
              "16w": {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 2},
              "32": {"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 2},
              "32w": {"block_m": 32, "block_n": 32, "num_warps": 4, "num_stages": 2}},
    "gfx942": {"16": {"block_m": 128, "block_n": 64, "num_warps": 4, "num_stages": 1},
               "16w": {"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 1},
               "32": {"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 1},
               "32w": {"block_m": 16, "block_n": 32, "num_warps": 4, "num_stages": 1}},
    "gfx950": {"16": {"block_m": 128, "block_n": 64, "num_warps": 4, "num_stages": 1},
               "16w": {"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 1},
               "32": {"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 1},
               "32w": {"block_m": 16, "block_n": 32, "num_warps": 4, "num_stages": 1}},
}
DEFAULT_TILES = {"16": {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 2},
                 "16w": {"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 1},
                 "32": {"block_m": 32, "block_n": 32, "num_warps": 4, "num_stages": 1},
                 "32w": {"block_m": 32, "block_n": 32, "num_warps": 4, "num_stages": 1}}


def tile_class(dtype: str, head_dim: int) -> str:
    return ("32" if dtype == "fp32" else "16") + ("w" if head_dim > 128 else "")


def bucket(head_dim: int) -> str:
    """The bucket of this op's winners in the tuned tables: one per head_dim."""
    return f"d{head_dim}"


def _listed(arch_name: str, dtype: str, head_dim: int) -> list[dict]:
    """The tile candidates before rules and overrides: the shipped winner (if any), then ``TILES``."""
    by_class = TILES.get(arch_name, DEFAULT_TILES)
    cls = tile_class(dtype, head_dim)
    base = dict(by_class.get(cls, by_class["16"]))
    won = tuning.shipped(arch_name, OP, dtype, bucket(head_dim))
    return ([{**base, **won}] if won else []) + [base]


def tiles(arch_name: str, dtype: str, head_dim: int) -> dict:
    """block_m, block_n, num_warps, num_stages for an arch, after rules and env overrides."""
    return constraints.apply(arch_name, OP, _listed(arch_name, dtype, head_dim), TUNABLES)[0]


def reference(q, k, v, cu_seqlens, max_seqlen, scale, causal=True, out=None):
    """Per sequence, SDPA in fp32 (GQA through ``enable_gqa``), cast to q's dtype; reads cu_seqlens on the host."""
    hq, hkv = q.shape[1], k.shape[1]
    y = torch.zeros_like(q) if out is None else out
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e <= s:
            continue
        qs, ks, vs = (t[s:e].transpose(0, 1).float() for t in (q, k, v))  # [heads, len, d]
        o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=bool(causal), scale=scale,
                                                             enable_gqa=hkv != hq)
        y[s:e] = o.transpose(0, 1).to(y.dtype)
    return y


def config(dtype: str, head_dim: int, causal: bool, aligned: bool, tile: dict) -> Config:
    """``aligned``: every q/k/v/out token and head stride is a multiple of 16 elements, so Triton may use
    16-byte vector loads and stores (true for contiguous tensors and fused-QKV views)."""
    return Config.make("triton", dtype=dtype, head_dim=head_dim, causal=bool(causal), aligned=bool(aligned), **tile)


def configs(arch):
    for dtype in checks.FLOAT_TYPES:
        for head_dim in HEAD_DIMS:
            tile = tiles(arch.name, dtype, head_dim)
            for causal in (True, False):
                for aligned in (True, False):
                    yield config(dtype, head_dim, causal, aligned, tile)


def plan(call):
    """Validate one call signature and decide the launch: grid (query blocks, sequences, heads)."""
    q, k, v, cu_seqlens, max_seqlen, scale, causal, out = call.args
    checks.tensor(OP, "q", q, dtypes=DTYPES, ndim=3)
    checks.tensor(OP, "k", k, ndim=3, like=q)
    checks.tensor(OP, "v", v, ndim=3, like=q)
    checks.same_dtype(OP, "k", k, q, "q")
    checks.same_dtype(OP, "v", v, q, "q")
    tokens, hq, d = q.shape
    hkv = k.shape[1]
    checks.shape(OP, "k", k, (tokens, hkv, d))
    checks.shape(OP, "v", v, (tokens, hkv, d))
    if d not in HEAD_DIMS:
        raise checks.ShapeError(f"{OP}: head_dim {d} is not supported; supported: {HEAD_DIMS} (pad the heads to "
                                f"the next one and scale by the real head_dim)")
    if hkv == 0 or hq % hkv:
        raise checks.ShapeError(f"{OP}: num_heads {hq} (q.shape[1]) must be a multiple of num_kv_heads {hkv} "
                                f"(k.shape[1])")
    for name, t in (("q", q), ("k", k), ("v", v)):
        checks.unit_last_stride(OP, name, t)
    checks.tensor(OP, "cu_seqlens", cu_seqlens, dtypes=(torch.int32,), ndim=1, like=q)
    checks.contiguous(OP, "cu_seqlens", cu_seqlens)
    if cu_seqlens.shape[0] == 0:
        raise checks.ShapeError(f"{OP}: cu_seqlens is empty; it holds batch + 1 offsets, starting with 0")
    max_seqlen = checks.integer(OP, "max_seqlen", max_seqlen, minimum=0)
    if not isinstance(causal, bool):
        raise checks.ArgumentError(f"{OP}: causal must be True or False, got {type(causal).__name__} {causal!r:.60}")
    checks.tensor(OP, "out", out, like=q)
    checks.same_dtype(OP, "out", out, q, "q")
    checks.shape(OP, "out", out, (tokens, hq, d))
    checks.unit_last_stride(OP, "out", out)
    batch = cu_seqlens.shape[0] - 1
    dt = checks.TRITON_TYPE[q.dtype]
    tile = call.tiles(_listed(call.arch.name, dt, d), dtype=dt, bucket=bucket(d))[0]
    blocks = -(-max_seqlen // tile["block_m"])
    for what, n in (("the number of sequences (cu_seqlens.shape[0] - 1)", batch), ("num_heads", hq)):
        if n > MAX_GRID_YZ:
            raise checks.ShapeError(f"{OP}: {what} is {n}, more than the {MAX_GRID_YZ} a launch grid allows; "
                                    f"split the call")
    checks.fits_i32(OP, "tokens", tokens)
    checks.fits_i32(OP, "the query block count (max_seqlen / block_m)", blocks)
    if batch == 0 or blocks == 0 or tokens == 0 or hq == 0:
        return None  # empty work: nothing to launch
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               out.stride(0), out.stride(1))
    aligned = all(s % 16 == 0 for s in strides)
    return Candidate(Launch(config(dt, d, causal, aligned, tile), (blocks, batch, hq),
                            (In("q"), In("k"), In("v"), In("cu_seqlens"), In("out"), *strides, hq // hkv,
                             In("scale"))))


def check_tables(call):
    """JITKERN_DEBUG=checks: the table contract of the module docstring, on the host (``TableError``)."""
    q, k, v, cu_seqlens, max_seqlen = call.args[:5]
    cu = table_checks.host(cu_seqlens)
    table_checks.within(OP, "cu_seqlens", cu[:1], 0, 0, inclusive=True, what="the first offset is 0")
    table_checks.nondecreasing(OP, "cu_seqlens", cu)
    table_checks.within(OP, "cu_seqlens", cu, 0, q.shape[0], inclusive=True, what="q.shape[0], the token count")
    lens = cu[1:] - cu[:-1]
    table_checks.within(OP, "the sequence lengths cu_seqlens[b + 1] - cu_seqlens[b]", lens, 0, int(max_seqlen),
                        inclusive=True, what="max_seqlen, which sizes the grid")


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                      scale: float, causal: bool = True, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of packed variable-length sequences (see the module doc); ``scale`` multiplies q.k (usually
    ``1/sqrt(head_dim)``). ``out`` is filled and returned, allocated if not given."""
    if out is None and isinstance(q, torch.Tensor):
        out = alloc(q, k, v, cu_seqlens, max_seqlen, scale, causal)["out"]
    _dispatch(q, k, v, cu_seqlens, max_seqlen, scale, causal, out)
    return out


def alloc(q, k, v, cu_seqlens, max_seqlen, scale, causal=True, out=None):
    """The ``out`` prefill_attention allocates (torch.compile path)."""
    return {"out": torch.empty(q.shape, dtype=q.dtype, device=q.device)}


_ARGS = (
    Arg("q_ptr", "*{dtype}"), Arg("k_ptr", "*{dtype}"), Arg("v_ptr", "*{dtype}"), Arg("cu_ptr", "*i32"),
    Arg("out_ptr", "*{dtype}"),
    *(Arg(n, "i64", divisible_if="aligned") for n in ("stride_qt", "stride_qh", "stride_kt", "stride_kh",
                                                       "stride_vt", "stride_vh", "stride_ot", "stride_oh")),
    Arg("group", "i32"), Arg("scale", "fp32"),
)

SPEC = registry.register(OpSpec(
    name=OP,
    variants=(Variant(name="triton", template="triton.py.j2", kernel="prefill_attention_kernel", args=_ARGS),),
    template_dir=builtin_template_dir() / OP,
    fn=prefill_attention,
    reference=reference,
    configs=configs,
    plan=plan,
    tunables=TUNABLES,
    scalars={"scale": Scalar(float, min=0.0)},
    doc=__doc__,
    outputs=("out",),
    alloc=alloc,
    debug_checks=check_tables,
))
_dispatch = dispatcher(SPEC)
