"""moe_gemm_stage1: the gate-up GEMM of a MoE layer with the activation fused, over sorted pair ids
(or, with ``activation="none"``, a plain grouped GEMM: the MoE down projection).

``x`` [tokens, K]; ``w1`` [experts, 2N, K] (gate rows then up rows, K contiguous; [experts, N, K]
for ``"none"``);
``sorted_token_ids`` [sorted_size] int32: pair ids ``token * topk + slot`` grouped by expert, each
expert's run padded to a multiple of ``align_m`` with the sentinel ``tokens * topk``;
``expert_ids`` [sorted_size // align_m] int32: the expert of each run block;
``num_tokens_post_padded`` [1] int32: how many leading entries of ``sorted_token_ids`` are in use.
``jitkern.ops.moe_align`` builds the three from router ``topk_ids`` on the device, in one launch (the
layout of vLLM's moe_align_block_size; ``moe_align`` here is its torch reference).
Table contract (the caller's; checked before the launch under ``JITKERN_DEBUG=checks``):
``num_tokens_post_padded[0]`` in ``[0, sorted_size]``; in the run blocks it covers (the first
``ceil(num_tokens_post_padded / align_m)``), every ``sorted_token_ids`` entry is a pair id in
``[0, tokens * topk)`` or the sentinel ``tokens * topk``, and every ``expert_ids`` entry lies in
``[0, experts)``.
Returns ``out`` [tokens * topk, N] = act(x[t] @ gate[e].T) * (x[t] @ up[e].T) per pair (pair id
``p = t * topk + slot``, ``t = p // topk``, ``e`` its run block's expert); ``activation`` is ``"silu"``
(SiLU-and-mul), ``"gelu"`` (erf GELU-and-mul) or ``"none"``: ``out[p] = x[p // topk] @ w1[e].T`` with
``N = w1.shape[1]`` (no halves). ``"none"`` with ``topk=1`` over the stage-1 output (``x`` = the
[pairs, N1] rows, the same sorted tables) is the MoE down projection of each pair with its own
expert's ``w2`` [experts, hidden, N1] (what vLLM's fused_moe kernel does for stage 2).

Split-K (``split_k > 1``, chosen automatically when there are too few tiles to fill the GPU) writes
fp32 partials of *every sorted position* the kernel covers, padding included, to ``scratch``
[split_k, sorted_size, 2N] ([split_k, sorted_size, N] for ``"none"``); a second kernel (variant
``splitk_reduce``) sums them and applies the activation. Seed 004 allocated that scratch as
(tokens, topk, N) while the kernel wrote (sorted_size, N) x 2: a 16x overflow. Here the contract
sizes it from ``sorted_token_ids`` itself.

Tile caps per arch come from ``jitkern.constraints`` (gfx950/CDNA4: block_m <= 64, block_n <= 256,
seed 003) and ``JITKERN_MOE_GEMM_STAGE1_BLOCK_N=...``-style overrides.
"""
from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Optional

import torch

from .. import checks, constraints, contracts, redzone, registry, table_checks, tuning
from ..contracts import Buffer, Contract
from ..errors import ConfigError
from ..logs import warn_once
from ..render import builtin_template_dir
from ..dispatch import dispatcher
from ..spec import Arg, Candidate, Config, In, Launch, OpSpec, Scratch, Variant
from .moe_align import reference as moe_align  # noqa: F401  the tables in torch (jitkern.ops.moe_align: one kernel)

OP = "moe_gemm_stage1"
DTYPES = (torch.bfloat16, torch.float16)
ACTIVATIONS = ("silu", "gelu", "none")
#: The activations over gate and up halves of ``w1`` (``"none"`` is a plain grouped GEMM).
GATED = ("silu", "gelu")
TUNABLES = {
    "block_m": (16, 32, 64, 128),
    "block_n": (16, 32, 64, 128, 256),
    "block_k": (32, 64, 128),
    "num_warps": (4, 8),
    "num_stages": (1, 2, 3, 4),
    # 1: weights on the dot's M side and the pairs on N (sm_90 decode buckets, tuned: Hopper's warpgroup
    # MMA wants M >= 64, more than a decode step's pairs per expert); absent or 0: pairs on M
    "swap_ab": (0, 1),
}
constraints.add_rules(
    constraints.Rule("gfx950", OP, "block_m", "160 KiB LDS: 128x512 tiles need ~269 KiB (seed 003)", max=64),
    constraints.Rule("gfx950", OP, "block_n", "160 KiB LDS: 128x512 tiles need ~269 KiB (seed 003)", max=256),
    constraints.Rule("gfx942", OP, "block_n", "64 KiB LDS per workgroup", max=128),
)

#: Written once beside the templates. ``sorted_size`` is ``sorted_token_ids.shape[0]``: what the
#: split-K kernel writes, padding positions included; ``n`` the output width; ``gated``: the activation
#: has gate and up halves (two partials per output column), False for ``"none"``.
CONTRACT = Contract(OP, (
    Buffer("out", lambda d: (d.num_pairs, d.n), lambda d: d.dtype, role="output"),
    Buffer("scratch", lambda d: (d.split_k, d.sorted_size, (2 if d.gated else 1) * d.n) if d.split_k > 1 else (0,),
           torch.float32, role="scratch",
           doc="split-K fp32 partials (of gate and up, or of the plain product) for every sorted position"),
))


def out_width(w1, activation: str) -> int:
    """N, the width of ``out``: half of ``w1``'s rows for a gated activation, all of them for ``"none"``."""
    return w1.shape[1] if activation == "none" else w1.shape[1] // 2


def _act(g, activation):
    return torch.nn.functional.silu(g) if activation == "silu" else torch.nn.functional.gelu(g)


def _epilogue(h, n: int, activation: str):
    """act(gate) * up of the product ``h`` [rows, 2N] (fp32), or ``h`` itself for ``"none"``."""
    if activation == "none":
        return h.float()
    return _act(h[:, :n].float(), activation) * h[:, n:].float()


def reference(x, w1, sorted_token_ids, expert_ids, num_tokens_post_padded, topk: int, activation: str = "silu",
              split_k=None, out=None, scratch=None):
    """Eager MoE: loop over the experts that received tokens, one GEMM each."""
    n = out_width(w1, activation)
    pairs = x.shape[0] * topk
    align_m = sorted_token_ids.shape[0] // max(1, expert_ids.shape[0])
    used = int(num_tokens_post_padded[0])
    ids = sorted_token_ids[:used].long()
    eid = expert_ids.long().repeat_interleave(align_m)[:used]
    keep = ids < pairs
    ids, eid = ids[keep], eid[keep]
    y = torch.empty(pairs, n, dtype=x.dtype, device=x.device) if out is None else out
    for e in torch.unique(eid).tolist():
        rows = ids[eid == e]
        h = x[rows // topk] @ w1[e].t()
        y[rows] = _epilogue(h, n, activation).to(x.dtype)
    return y


def gemm_config(dtype, activation, split, params, aligned=True) -> Config:
    """``aligned``: strides, N and K are multiples of 16 elements (16-byte vector loads of weights)."""
    return Config.make("gemm", dtype=dtype, activation=activation, split_k=split, aligned=aligned, **params)


def reduce_config(dtype, activation, params, aligned=True) -> Config:
    return Config.make("splitk_reduce", dtype=dtype, activation=activation, block_m=params["block_m"],
                       block_n=params["block_n"], num_warps=4, aligned=aligned)


def _candidates(arch_name: str, block_m: int) -> list[dict]:
    """Tiles in order of preference for one block_m (the arch rules drop what does not fit)."""
    if arch_name == "cpu":  # the interpreter: small tiles keep CPU runs fast
        return [{"block_m": block_m, "block_n": 16, "block_k": 32, "num_warps": 4, "num_stages": 1}]
    amd = arch_name.startswith("gfx")
    # H100 sweep (tools/bench_seed_ops.py --sweep, 2026-11-23, 64 tokens, DeepSeek-V3 TP8 shapes, aligned):
    # block_n 32 / block_k 128 / 4 warps / 3 stages moves 2.94 TB/s; block_n 64 and 128 within 1%
    return [{"block_m": block_m, "block_n": bn, "block_k": 64 if amd else 128, "num_warps": 4,
             "num_stages": 2 if amd else 3} for bn in (32, 64)]


def _block_ms(align_m: int) -> list[int]:
    """The block_m a run aligned to ``align_m`` can take, largest first (block_m must divide ``align_m``:
    a run block may span several kernel blocks of the same expert)."""
    return [bm for bm in TUNABLES["block_m"][::-1] if bm <= min(align_m, 64) and align_m % bm == 0]


def tile_candidates(arch_name: str, align_m: int) -> list[dict]:
    """The tiles for runs aligned to ``align_m``, before the arch's rules and env overrides: largest
    block_m first."""
    cands = [c for bm in _block_ms(align_m) for c in _candidates(arch_name, bm)]
    if not cands:
        raise checks.ShapeError(f"{OP}: the sorting block {align_m} must be a multiple of 16")
    return cands


def bucket(align_m: int, activation: str) -> str:
    """The tuning bucket of calls over runs aligned to ``align_m`` (``jitkern/tuned/<arch>.json``): the
    sorting block decides block_m (the largest that divides it, up to 64), and gated activations read
    two weight tiles per step where ``"none"`` reads one."""
    return f"a{align_m}_{'gated' if activation in GATED else 'plain'}"


def bucket_block_m(name: str) -> int:
    """The block_m of a bucket's calls (what a tuned entry of ``name`` is timed with)."""
    return _block_ms(int(name.split("_")[0][1:]))[0]


def _check_tile(params: dict, align_m: int) -> dict:
    if align_m % params["block_m"]:
        raise ConfigError(f"{OP}: block_m={params['block_m']} must divide the sorting block {align_m}; "
                          f"check JITKERN_MOE_GEMM_STAGE1_BLOCK_M")
    return params


def tiles(arch_name: str, align_m: int, dtype: str = "bf16", activation: str = "silu") -> dict:
    """The tile for runs aligned to ``align_m``, after the arch's rules and env overrides: the shipped
    winner of its bucket (``bucket``, ``jitkern/tuned/<arch>.json``) first, if any (what the plan gets
    from ``call.tiles``; prebuild and tools use this)."""
    listed = tile_candidates(arch_name, align_m)
    won = tuning.shipped(arch_name, OP, dtype, bucket(align_m, activation))
    if won:
        listed.insert(0, {**listed[0], **won})
    return _check_tile(constraints.apply(arch_name, OP, listed, TUNABLES)[0], align_m)


def configs(arch):
    """What the runtime can pick: the tile ``tiles()`` gives for each sorting block size, dtype and
    activation."""
    seen = set()
    for align_m in TUNABLES["block_m"]:
        for dtype in ("bf16", "fp16"):
            for act in ACTIVATIONS:
                params = tiles(arch.name, align_m, dtype, act)
                mark = (dtype, act, tuple(sorted(params.items())))
                if mark in seen:
                    continue
                seen.add(mark)
                for aligned in (True, False):
                    yield gemm_config(dtype, act, False, params, aligned)
                    yield gemm_config(dtype, act, True, params, aligned)
                    yield reduce_config(dtype, act, params, aligned)


_PLAIN = (torch.Tensor, torch.nn.Parameter)
#: The most K splits a call may ask for (grid z; scratch grows with it).
MAX_SPLIT_K = 64
PLAIN_DOC = "plain torch.Tensor / nn.Parameter x and w1 (a tensor subclass, e.g. a quantized weight, is not read " \
            "through its data pointer)"


def _plain(x, w1, *rest) -> bool:
    return type(x) in _PLAIN and type(w1) in _PLAIN


def _torch_path(x, w1, sorted_token_ids, expert_ids, num_tokens_post_padded, topk, activation, split_k, out, scratch):
    """Seed 000: what the kernel cannot read (tensor subclasses) runs the PyTorch path, with one warning.
    Plain tensors get here only when every kernel candidate was ruled out (the framework has said why:
    over the arch's budget, or a failed build), so the subclass warning is not theirs."""
    if not _plain(x, w1):
        warn_once((OP, "subclass", type(w1), type(x)), "jitkern: %s: x is %s and w1 is %s, tensor "
                  "subclasses the Triton kernel cannot read; running the PyTorch path for them", OP,
                  type(x).__name__, type(w1).__name__)
    reference(x, w1, sorted_token_ids, expert_ids, num_tokens_post_padded, topk, activation, out=out)


def _with_split(split, x, w1, sorted_token_ids, expert_ids, num_tokens_post_padded, topk, activation, split_k, out,
                scratch):
    """``split_k=None`` where the plan chose split-K: the scratch it needs is sized by that choice, so the
    call runs again with it explicit (the op allocates the scratch from the contract)."""
    moe_gemm_stage1(x, w1, sorted_token_ids, expert_ids, num_tokens_post_padded, topk, activation, split, out, scratch)


def plan(call):
    """Validate one call signature; decide the tile (``call.tiles``), split-K and the launches."""
    x, w1, sorted_token_ids, expert_ids, num_tokens_post_padded, topk, activation, split_k, out, scratch = call.args
    checks.tensor(OP, "x", x, dtypes=DTYPES, ndim=2)
    checks.tensor(OP, "w1", w1, ndim=3, like=x)
    checks.same_dtype(OP, "w1", w1, x, "x")
    for name, t in (("sorted_token_ids", sorted_token_ids), ("expert_ids", expert_ids),
                    ("num_tokens_post_padded", num_tokens_post_padded)):
        checks.tensor(OP, name, t, dtypes=(torch.int32,), ndim=1, like=x)
        checks.contiguous(OP, name, t)
    if activation not in ACTIVATIONS:
        raise ConfigError(f"{OP}: activation {activation!r} is not one of {ACTIVATIONS}")
    topk = checks.integer(OP, "topk", topk, minimum=1)
    tokens, k = x.shape
    experts, rows_w, kw = w1.shape
    gated = activation in GATED
    if kw != k or (gated and rows_w % 2):
        want = f"[experts, 2N, {k}] (gate rows then up rows)" if gated else f"[experts, N, {k}]"
        raise checks.ShapeError(f"{OP}: w1 must be {want} for activation {activation!r}, got {tuple(w1.shape)}")
    if w1.numel() == 0:
        raise checks.ShapeError(f"{OP}: w1 has no elements (shape {tuple(w1.shape)}); it needs at least one "
                                f"expert, N >= 1 and K >= 1")
    n = out_width(w1, activation)
    size = sorted_token_ids.shape[0]
    nblocks = expert_ids.shape[0]
    if (nblocks == 0) != (size == 0) or (nblocks and size % nblocks):
        raise checks.ShapeError(f"{OP}: sorted_token_ids ({size}) must be expert_ids ({nblocks}) blocks long")
    align_m = size // nblocks if nblocks else 1
    if num_tokens_post_padded.numel() < 1:
        raise checks.ShapeError(f"{OP}: num_tokens_post_padded must hold one value")
    for name, t in (("x", x), ("w1", w1)):
        checks.unit_last_stride(OP, name, t)
    if split_k is not None:
        split_k = checks.integer(OP, "split_k", split_k, minimum=1)
        if split_k > MAX_SPLIT_K:
            raise checks.ArgumentError(f"{OP}: split_k={split_k} is more than {MAX_SPLIT_K}")
    pairs = tokens * topk
    if not redzone.enabled():  # the op's hot path passes the caller's out without prepare
        CONTRACT.check_outputs(x.device, dict(num_pairs=pairs, n=n, dtype=x.dtype, split_k=split_k or 1,
                                              sorted_size=size, gated=gated), out=out)
    checks.tensor(OP, "out", out, like=x)
    checks.same_dtype(OP, "out", out, x, "x")
    checks.shape(OP, "out", out, (pairs, n))
    checks.unit_last_stride(OP, "out", out)
    if scratch is not None:
        checks.tensor(OP, "scratch", scratch, dtypes=(torch.float32,), like=x)
        checks.contiguous(OP, "scratch", scratch)  # its size is the contract's (checked by the op)
    if pairs == 0 or size == 0:
        return None  # empty work (seed 003: an empty prefill): nothing to launch
    for what, v in (("num_pairs", pairs), ("sorted_size", size), ("N", n), ("K", k)):
        checks.fits_i32(OP, what, v)
    params = _check_tile(call.tiles(tile_candidates(call.arch.name, align_m), dtype=checks.TRITON_TYPE[x.dtype],
                                    bucket=bucket(align_m, activation))[0], align_m)
    bm, bn, bk = params["block_m"], params["block_n"], params["block_k"]
    fallback = Candidate(torch=_torch_path, name="torch")
    scratch_arg = None
    if split_k is None:
        split = 1
        if call.arch.backend is not None:  # enough tiles to fill the GPU twice, else split K
            tiles_mn = (size // bm) * -(-n // bn)
            split = max(1, min(8, (2 * call.arch.num_cus) // max(1, tiles_mn), k // (4 * bk)))
        if split > 1:
            dims = SimpleNamespace(split_k=split, sorted_size=size, n=n, gated=gated)
            shape, dtype = CONTRACT.buffers[1].resolve(dims)
            if scratch is not None:  # the caller's: the contract's check for the split chosen
                contracts.check(OP, CONTRACT.buffers[1], scratch, shape, dtype, x.device)
            elif not redzone.enabled():  # the framework allocates it for each call
                scratch_arg = Scratch(shape, dtype, "scratch")
            else:  # redzone mode pads every buffer: the op allocates it from the contract
                return [Candidate(torch=functools.partial(_with_split, split), guard=_plain, guard_doc=PLAIN_DOC,
                                  name=f"split_k={split}"), fallback]
    else:
        split = split_k
        if split > max(1, k // bk):
            raise checks.ArgumentError(f"{OP}: split_k={split} is more than K // block_k = {k} // {bk}; every split "
                                       f"needs at least one block_k step")
        if split > 1 and scratch is None:
            raise checks.ArgumentError(f"{OP}: split_k={split} needs a scratch buffer (the op allocates it)")
    if scratch_arg is None:
        scratch_arg = In("scratch")
    dt = checks.TRITON_TYPE[x.dtype]
    aligned = all(v % 16 == 0 for v in (x.stride(0), w1.stride(0), w1.stride(1), out.stride(0), n, k))
    k_per = -(-k // split)
    k_per = -(-k_per // bk) * bk
    grid = (size // bm, -(-n // bn), split)
    head = (In("x"), In("w1"), In("sorted_token_ids"), In("expert_ids"), In("num_tokens_post_padded"), In("out"))
    tail = (x.stride(0), w1.stride(0), w1.stride(1), out.stride(0), pairs, topk, size, n, k, k_per, align_m)
    if split == 1:
        launches = (Launch(gemm_config(dt, activation, False, params, aligned), grid, (*head, In("out"), *tail)),)
    else:
        launches = (Launch(gemm_config(dt, activation, True, params, aligned), grid, (*head, scratch_arg, *tail)),
                    Launch(reduce_config(dt, activation, params, aligned), grid[:2],
                           (In("sorted_token_ids"), In("num_tokens_post_padded"), scratch_arg, In("out"),
                            out.stride(0), pairs, size, n, split)))
    return [Candidate(launches, guard=_plain, guard_doc=PLAIN_DOC), fallback]


def check_tables(call):
    """JITKERN_DEBUG=checks: the table contract of the module docstring, on the host (``TableError``)."""
    x, w1, sorted_token_ids, expert_ids, num_tokens_post_padded, topk, *_ = call.args
    size, nblocks = sorted_token_ids.shape[0], expert_ids.shape[0]
    if not nblocks:
        return
    align_m = size // nblocks
    used = table_checks.host(num_tokens_post_padded[:1])
    table_checks.within(OP, "num_tokens_post_padded", used, 0, size, inclusive=True,
                        what="sorted_token_ids.shape[0], the sorted size")
    blocks = -(-int(used[0]) // align_m)  # the run blocks the kernel reads
    pairs = x.shape[0] * topk
    table_checks.within(OP, "sorted_token_ids", table_checks.host(sorted_token_ids[:blocks * align_m]), 0, pairs,
                        inclusive=True, what=f"pair ids token * topk + slot below {pairs}, or the padding sentinel "
                                             f"tokens * topk = {pairs}; entries past num_tokens_post_padded's run "
                                             f"blocks are not read")
    table_checks.within(OP, "expert_ids", table_checks.host(expert_ids[:blocks]), 0, w1.shape[0],
                        what="w1.shape[0], the number of experts")


def moe_gemm_stage1(x: torch.Tensor, w1: torch.Tensor, sorted_token_ids: torch.Tensor, expert_ids: torch.Tensor,
                    num_tokens_post_padded: torch.Tensor, topk: int, activation: str = "silu",
                    split_k: Optional[int] = None, out: Optional[torch.Tensor] = None,
                    scratch: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Gate-up GEMM + activation for every (token, slot) pair (``activation="none"``: the plain grouped
    GEMM ``x[pair // topk] @ w1[expert].T``, ``w1`` [experts, N, K]). ``split_k``: None = automatic
    (1 to 8), else 1 to ``min(64, K // block_k)``. ``scratch``: fp32, sized by the contract for the
    split used.

    Guard (seed 000): a weight or input that is a tensor subclass (e.g. a torchao quantized weight)
    cannot be read by the kernel through its data pointer; such calls run the PyTorch path instead,
    with one warning."""
    if out is not None and split_k is None and scratch is None and not redzone.enabled():
        # the hot path: the plan checked out against the contract and allocates any split-K scratch
        _dispatch(x, w1, sorted_token_ids, expert_ids, num_tokens_post_padded, topk, activation, None, out, None)
        return out
    topk = checks.integer(OP, "topk", topk, minimum=1)
    if split_k is not None:
        split_k = checks.integer(OP, "split_k", split_k, minimum=1)
    try:
        dims = dict(num_pairs=x.shape[0] * topk, n=out_width(w1, activation), dtype=x.dtype,
                    split_k=split_k or 1, sorted_size=sorted_token_ids.shape[0], gated=activation != "none")
    except (AttributeError, TypeError, IndexError):  # not tensors of the right rank: the plan says why
        _dispatch(x, w1, sorted_token_ids, expert_ids, num_tokens_post_padded, topk, activation, split_k, out,
                  scratch)
        return out
    # split_k=None: the plan decides the split, and asks for the scratch it needs (see _with_split)
    bufs = CONTRACT.prepare(x.device, dims, out=out, scratch=scratch if split_k is not None else None)
    args = (x, w1, sorted_token_ids, expert_ids, num_tokens_post_padded, topk, activation, split_k, bufs["out"],
            bufs["scratch"] if split_k is not None else scratch)
    ran = _dispatch(*args)
    bufs.finish(_dispatch.describe_ran(ran, *args) if redzone.enabled() else ran)
    return bufs.result("out")


def alloc(x, w1, sorted_token_ids, expert_ids, num_tokens_post_padded, topk, activation="silu", split_k=None,
          out=None, scratch=None):
    """The ``out`` moe_gemm_stage1 allocates (torch.compile path)."""
    return {"out": torch.empty(x.shape[0] * topk, out_width(w1, activation), dtype=x.dtype, device=x.device)}


_GEMM_ARGS = (
    Arg("x_ptr", "*{dtype}"), Arg("w_ptr", "*{dtype}"), Arg("ids_ptr", "*i32"), Arg("eid_ptr", "*i32"),
    Arg("npad_ptr", "*i32"), Arg("out_ptr", "*{dtype}"), Arg("scratch_ptr", "*fp32"),
    *(Arg(n, "i64", divisible_if="aligned") for n in ("stride_x", "stride_we", "stride_wn", "stride_out")),
    Arg("num_pairs", "i32"), Arg("topk", "i32"), Arg("sorted_size", "i32"), Arg("N", "i32", divisible_if="aligned"),
    Arg("K", "i32", divisible_if="aligned"), Arg("k_per_split", "i32", divisible_if="aligned"), Arg("align_m", "i32"),
)
_REDUCE_ARGS = (
    Arg("ids_ptr", "*i32"), Arg("npad_ptr", "*i32"), Arg("scratch_ptr", "*fp32"), Arg("out_ptr", "*{dtype}"),
    Arg("stride_out", "i64", divisible_if="aligned"), Arg("num_pairs", "i32"), Arg("sorted_size", "i32"),
    Arg("N", "i32", divisible_if="aligned"), Arg("n_split", "i32"),
)

SPEC = registry.register(OpSpec(
    name=OP,
    variants=(
        Variant(name="gemm", template="gemm.py.j2", kernel="moe_stage1_kernel", args=_GEMM_ARGS),
        Variant(name="splitk_reduce", template="splitk_reduce.py.j2", kernel="moe_stage1_reduce_kernel",
                args=_REDUCE_ARGS),
    ),
    template_dir=builtin_template_dir() / OP,
    fn=moe_gemm_stage1,
    reference=reference,
    configs=configs,
    plan=plan,
    tunables=TUNABLES,
    doc=__doc__,
    extra={"contract": CONTRACT, "stages": ("gemm", "splitk_reduce")},
    mutates=("scratch",),
    outputs=("out",),
    alloc=alloc,
    debug_checks=check_tables,
))
_dispatch = dispatcher(SPEC)
