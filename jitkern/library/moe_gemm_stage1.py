"""moe_gemm_stage1: the gate-up GEMM of a MoE layer with the activation fused, over sorted pair ids.

``x`` [tokens, K]; ``w1`` [experts, 2N, K] (gate rows then up rows, K contiguous);
``sorted_token_ids`` [sorted_size] int32: pair ids ``token * topk + slot`` grouped by expert, each
expert's run padded to a multiple of ``align_m`` with the sentinel ``tokens * topk``;
``expert_ids`` [sorted_size // align_m] int32: the expert of each run block;
``num_tokens_post_padded`` [1] int32: how many leading entries of ``sorted_token_ids`` are in use.
``moe_align()`` builds the three from router ``topk_ids`` (the layout of vLLM's moe_align_block_size).
Returns ``out`` [tokens * topk, N] = act(x[t] @ gate[e].T) * (x[t] @ up[e].T) per pair;
``activation`` is ``"silu"`` (SiLU-and-mul) or ``"gelu"`` (erf GELU-and-mul).

Split-K (``split_k > 1``, chosen automatically when there are too few tiles to fill the GPU) writes
fp32 partials of *every sorted position* the kernel covers, padding included, to ``scratch``
[split_k, sorted_size, 2N]; a second kernel (variant ``splitk_reduce``) sums them and applies the
activation. Seed 004 allocated that scratch as (tokens, topk, N) while the kernel wrote
(sorted_size, N) x 2: a 16x overflow. Here the contract sizes it from ``sorted_token_ids`` itself.

Tile caps per arch come from ``jitkern.constraints`` (gfx950/CDNA4: block_m <= 64, block_n <= 256,
seed 003) and ``JITKERN_MOE_GEMM_STAGE1_BLOCK_N=...``-style overrides.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import checks, constraints, counters, registry, runtime
from ..contracts import Buffer, Contract
from ..errors import ConfigError
from ..logs import warn_once
from ..render import builtin_template_dir
from ..spec import Arg, Config, OpSpec, Variant

OP = "moe_gemm_stage1"
DTYPES = (torch.bfloat16, torch.float16)
ACTIVATIONS = ("silu", "gelu")
TUNABLES = {
    "block_m": (16, 32, 64, 128),
    "block_n": (16, 32, 64, 128, 256),
    "block_k": (32, 64, 128),
    "num_warps": (4, 8),
    "num_stages": (1, 2, 3, 4),
}
constraints.add_rules(
    constraints.Rule("gfx950", OP, "block_m", "160 KiB LDS: 128x512 tiles need ~269 KiB (seed 003)", max=64),
    constraints.Rule("gfx950", OP, "block_n", "160 KiB LDS: 128x512 tiles need ~269 KiB (seed 003)", max=256),
    constraints.Rule("gfx942", OP, "block_n", "64 KiB LDS per workgroup", max=128),
)

#: Written once beside the templates. ``sorted_size`` is ``sorted_token_ids.shape[0]``: what the
#: split-K kernel writes, padding positions included.
CONTRACT = Contract(OP, (
    Buffer("out", lambda d: (d.num_pairs, d.n), lambda d: d.dtype, role="output"),
    Buffer("scratch", lambda d: (d.split_k, d.sorted_size, 2 * d.n) if d.split_k > 1 else (0,), torch.float32,
           role="scratch", doc="split-K fp32 partials of gate and up for every sorted position"),
))


def moe_align(topk_ids, num_experts: int, align_m: int):
    """``(sorted_token_ids, expert_ids, num_tokens_post_padded)`` for router choices ``topk_ids``
    [tokens, topk]: pair ids grouped by expert, each group padded to a multiple of ``align_m`` with
    the sentinel ``tokens * topk``; ``sorted_size`` is the worst case ``pairs + experts*(align_m-1)``
    rounded up to ``align_m``, as serving engines allocate it."""
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
    size = -(-(pairs + num_experts * (align_m - 1)) // align_m) * align_m
    ids = torch.full((size,), pairs, dtype=torch.int32, device=dev)
    ids[pos] = order.to(torch.int32)
    used = padded.sum()
    blocks = torch.arange(size // align_m, device=dev) * align_m
    eids = torch.searchsorted(torch.cumsum(padded, 0), blocks, right=True)
    eids = torch.where(blocks < used, eids, 0).to(torch.int32)
    return ids, eids, used.reshape(1).to(torch.int32)


def _act(g, activation):
    return torch.nn.functional.silu(g) if activation == "silu" else torch.nn.functional.gelu(g)


def reference(x, w1, sorted_token_ids, expert_ids, num_tokens_post_padded, topk: int, activation: str = "silu",
              split_k=None, out=None, scratch=None):
    """Eager MoE: loop over the experts that received tokens, one GEMM each."""
    n = w1.shape[1] // 2
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
        y[rows] = (_act(h[:, :n].float(), activation) * h[:, n:].float()).to(x.dtype)
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


def tiles(arch_name: str, align_m: int) -> dict:
    """The tile for runs aligned to ``align_m``, after the arch's rules and env overrides; block_m
    must divide ``align_m`` (a run block may span several kernel blocks of the same expert)."""
    cands = [c for bm in TUNABLES["block_m"][::-1] if bm <= min(align_m, 64) and align_m % bm == 0
             for c in _candidates(arch_name, bm)]
    if not cands:
        raise checks.ShapeError(f"{OP}: the sorting block {align_m} must be a multiple of 16")
    params = constraints.apply(arch_name, OP, cands, TUNABLES)[0]
    if align_m % params["block_m"]:
        raise ConfigError(f"{OP}: block_m={params['block_m']} must divide the sorting block {align_m}; "
                          f"check JITKERN_MOE_GEMM_STAGE1_BLOCK_M")
    return params


def configs(arch):
    """What the runtime can pick: the tile ``tiles()`` gives for each sorting block size."""
    picked = []
    for align_m in TUNABLES["block_m"]:
        params = tiles(arch.name, align_m)
        if params not in picked:
            picked.append(params)
    for params in picked:
        for dtype in ("bf16", "fp16"):
            for act in ACTIVATIONS:
                for aligned in (True, False):
                    yield gemm_config(dtype, act, False, params, aligned)
                    yield gemm_config(dtype, act, True, params, aligned)
                    yield reduce_config(dtype, act, params, aligned)


_plans = runtime.plan_cache()
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def moe_gemm_stage1(x: torch.Tensor, w1: torch.Tensor, sorted_token_ids: torch.Tensor, expert_ids: torch.Tensor,
                    num_tokens_post_padded: torch.Tensor, topk: int, activation: str = "silu",
                    split_k: Optional[int] = None, out: Optional[torch.Tensor] = None,
                    scratch: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Gate-up GEMM + activation for every (token, slot) pair. ``split_k``: None = automatic.

    Guard (seed 000): a weight or input that is a tensor subclass (e.g. a torchao quantized weight)
    cannot be read by the kernel through its data pointer; such calls run the PyTorch path instead,
    with one warning."""
    if type(w1) not in _PLAIN or type(x) not in _PLAIN:
        counters.bump("guard_refusals")
        warn_once((OP, "subclass", type(w1), type(x)), "jitkern: %s: x is %s and w1 is %s, tensor subclasses "
                  "the Triton kernel cannot read; running the PyTorch path for them", OP, type(x).__name__,
                  type(w1).__name__)
        return reference(x, w1, sorted_token_ids, expert_ids, num_tokens_post_padded, topk, activation, out=out)
    checks.tensor(OP, "x", x, dtypes=DTYPES, ndim=2)
    checks.tensor(OP, "w1", w1, ndim=3, like=x)
    checks.same_dtype(OP, "w1", w1, x, "x")
    for name, t in (("sorted_token_ids", sorted_token_ids), ("expert_ids", expert_ids),
                    ("num_tokens_post_padded", num_tokens_post_padded)):
        checks.tensor(OP, name, t, dtypes=(torch.int32,), ndim=1, like=x)
    if activation not in ACTIVATIONS:
        raise ConfigError(f"{OP}: activation {activation!r} is not one of {ACTIVATIONS}")
    tokens, k = x.shape
    experts, two_n, kw = w1.shape
    if kw != k or two_n % 2:
        raise checks.ShapeError(f"{OP}: w1 must be [experts, 2N, {k}], got {tuple(w1.shape)}")
    n = two_n // 2
    size = sorted_token_ids.shape[0]
    nblocks = expert_ids.shape[0]
    if (nblocks == 0) != (size == 0) or (nblocks and size % nblocks):
        raise checks.ShapeError(f"{OP}: sorted_token_ids ({size}) must be expert_ids ({nblocks}) blocks long")
    align_m = size // nblocks if nblocks else 1
    if num_tokens_post_padded.numel() < 1:
        raise checks.ShapeError(f"{OP}: num_tokens_post_padded must hold one value")
    for name, t in (("x", x), ("w1", w1)):
        checks.unit_last_stride(OP, name, t)
    pairs = tokens * int(topk)
    select_arch, _ = runtime.arches_for(x.device)
    empty = pairs == 0 or n == 0 or size == 0
    aligned = all(v % 16 == 0 for v in (x.stride(0), w1.stride(0), w1.stride(1), n, k))
    sig = (x.dtype, x.device, align_m, activation, aligned)
    plan = _plans.get(sig)
    if plan is None and not empty:
        params = tiles(select_arch.name, align_m)
        dt = checks.TRITON_TYPE[x.dtype]
        plan = _plans[sig] = (params, gemm_config(dt, activation, False, params, aligned),
                              gemm_config(dt, activation, True, params, aligned),
                              reduce_config(dt, activation, params, aligned))
    if split_k is None:
        split_k = 1
        if not empty and select_arch.backend is not None:
            tiles_mn = (size // plan[0]["block_m"]) * -(-n // plan[0]["block_n"])
            want = (2 * select_arch.num_cus) // max(1, tiles_mn)
            split_k = max(1, min(8, want, k // (4 * plan[0]["block_k"])))
    split_k = max(1, int(split_k))
    bufs = CONTRACT.prepare(x.device, dict(num_pairs=pairs, n=n, dtype=x.dtype, split_k=split_k, sorted_size=size),
                            out=out, scratch=scratch)
    if empty or k == 0:
        o = bufs["out"]
        if k == 0 and o.numel():
            o.zero_()  # an empty reduction: act(0) * 0
        bufs.finish(None)
        return bufs.result("out")  # empty work: nothing to launch
    params, c_plain, c_split, c_reduce = plan
    o, sc = bufs["out"], bufs["scratch"]
    for name, t in (("x", x), ("w1", w1), ("sorted_token_ids", sorted_token_ids), ("out", o)):
        checks.aligned(OP, name, t)
    bk = params["block_k"]
    k_per = -(-k // split_k)
    k_per = -(-k_per // bk) * bk
    grid = (size // params["block_m"], -(-n // params["block_n"]), split_k)
    args = (x, w1, sorted_token_ids, expert_ids, num_tokens_post_padded)
    tail = (x.stride(0), w1.stride(0), w1.stride(1), o.stride(0), pairs, int(topk), size, n, k, k_per, align_m)
    if split_k == 1:
        kern = runtime.kernel(SPEC, c_plain, x.device)
        kern[grid](*args, o, o, *tail)
    else:
        kern = runtime.kernel(SPEC, c_split, x.device)
        kern[grid](*args, o, sc, *tail)
        red = runtime.kernel(SPEC, c_reduce, x.device)
        red[grid[:2]](sorted_token_ids, num_tokens_post_padded, sc, o, o.stride(0), pairs, size, n, split_k)
    bufs.finish(kern)
    return bufs.result("out")


def alloc(x, w1, sorted_token_ids, expert_ids, num_tokens_post_padded, topk, activation="silu", split_k=None,
          out=None, scratch=None):
    """The ``out`` moe_gemm_stage1 allocates (torch.compile path)."""
    return {"out": torch.empty(x.shape[0] * topk, w1.shape[1] // 2, dtype=x.dtype, device=x.device)}


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
    doc=__doc__,
    extra={"contract": CONTRACT, "stages": ("gemm", "splitk_reduce"), "tunables": TUNABLES},
    mutates=("scratch",),
    outputs=("out",),
    alloc=alloc,
))
