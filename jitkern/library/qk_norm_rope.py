"""qk_norm_rope: per-head RMSNorm of q and k, then rotary embedding, in place on packed qkv.

``qkv`` is ``[tokens, (Hq + 2*Hkv) * D]``: Hq query heads, then Hkv key heads, then Hkv value heads,
each ``D = head_dim`` wide (the layout of a fused QKV projection). For every query head
``q <- rope(rms_norm(q) * q_weight)`` and for every key head ``k <- rope(rms_norm(k) * k_weight)``,
with fp32 arithmetic throughout and one rounding at the store; value heads are not touched.

Rotary embedding uses the token's position ``positions[t]`` and a cos/sin table
``cos_sin_cache`` of shape ``[max_pos, D]`` whose row ``p`` is ``[cos(p*f_0) .. cos(p*f_{D/2-1}),
sin(p*f_0) .. sin(p*f_{D/2-1})]`` (the layout vLLM keeps; ``cos_sin_table()`` makes one). The whole
head is rotated (rotary dim = head dim). Two pairings of elements:

* NeoX style (``is_neox=True``): element ``i`` pairs with ``i + D/2``;
* GPT-J style (``is_neox=False``): element ``2i`` pairs with ``2i + 1``;

and pair ``(a, b)`` with frequency ``i`` becomes ``(a*cos - b*sin, b*cos + a*sin)``. A position
outside ``[0, max_pos)`` is not read (it would need a device sync to report): it yields zeros.

Variants, in fallback order (seed 002): ``hip`` (HIP C++ with Composable Kernel headers, AMD),
``cuda`` (CUDA C++, NVIDIA), ``triton`` (everywhere, including the CPU interpreter). The C++
variants only take plain ``torch.Tensor`` arguments (guard); everything else goes to Triton.
"""
from __future__ import annotations

import torch

from .. import checks, constraints, tuning, registry
from ..dispatch import dispatcher
from ..errors import ShapeError
from ..render import builtin_template_dir
from ..spec import Arg, Candidate, Config, In, Launch, OpSpec, Scalar, Variant

OP = "qk_norm_rope"
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
POS_DTYPES = (torch.int64, torch.int32)
#: Elements of one head-pair block a Triton program holds in registers (heads x D/2).
TRITON_TILE = 1024
#: Heads per CUDA/HIP thread block (one warp / wavefront per head).
HEADS_PER_BLOCK = 4
#: What prebuild compiles: the common head sizes and dtypes, both styles.
PREBUILD_HEAD_DIMS = (64, 128, 256)
PREBUILD_DTYPES = ("bf16", "fp16")


def cos_sin_table(max_pos: int, head_dim: int, base: float = 10000.0, dtype=torch.float32, device=None):
    """``[max_pos, head_dim]`` rows of ``[cos(p*f) | sin(p*f)]`` with ``f_i = base^(-2i/head_dim)``."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    angles = torch.arange(max_pos, dtype=torch.float64, device=device)[:, None] * inv_freq[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1).to(dtype)


def reference(qkv, q_weight, k_weight, cos_sin_cache, positions, num_q_heads, num_kv_heads, head_dim,
              eps=1e-6, is_neox=True):
    """PyTorch reference: same arguments and in-place effect as ``qk_norm_rope``; returns ``qkv``."""
    norm_rope_rows(qkv, q_weight, k_weight, cos_sin_cache.float()[positions.long()], num_q_heads, num_kv_heads,
                   head_dim, eps, is_neox)
    return qkv


def norm_rope_rows(qkv, q_weight, k_weight, cs, num_q_heads, num_kv_heads, head_dim, eps, is_neox):
    """The references' shared step (``qk_norm_rope_cache`` too): RMSNorm each q and k head of ``qkv``'s
    rows and rotate it by ``cs`` (``[tokens, head_dim]`` fp32 rows of cos | sin), in place."""
    t, d, half = qkv.shape[0], head_dim, head_dim // 2
    h = num_q_heads + num_kv_heads
    rows = qkv.view(t, -1)
    x = rows[:, : h * d].float().reshape(t, h, d)
    w = torch.cat([q_weight.float().expand(num_q_heads, d), k_weight.float().expand(num_kv_heads, d)])
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    if is_neox:
        a, b = y[..., :half], y[..., half:]
        out = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
    else:
        a, b = y[..., 0::2], y[..., 1::2]
        out = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)
    rows[:, : h * d].copy_(out.reshape(t, h * d).to(qkv.dtype))


# ---- configs -------------------------------------------------------------------------------------
def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


#: Tile parameters (values ``JITKERN_QK_NORM_ROPE_<PARAM>`` may set). Triton variant: elements per
#: program (heads x D/2; heads per program = tile // (D/2)) and warps. CUDA variant: ``cuda_tok``
#: tokens per block in the 16-byte row layout (0: the head-per-warp layout, one token per block) and
#: ``cuda_warps`` warps per block in it.
TUNABLES = {"tile": (256, 512, 1024, 2048, 4096), "num_warps": (1, 2, 4, 8), "cuda_tok": (0, 1, 2, 4, 8),
            "cuda_warps": (1, 2, 4, 8)}
TRITON_TILES = {  # H200 sweep (tools/check_qk_norm_rope_gpu.py --sweep, 2026-12-01): 1.7 -> 2.4 TB/s
    "sm_90": {"tile": 512, "num_warps": 1, "cuda_tok": 0, "cuda_warps": 4}}
DEFAULT_TRITON_TILES = {"tile": TRITON_TILE, "num_warps": 4, "cuda_tok": 0, "cuda_warps": 4}
#: bytes per element, for the CUDA row layout's lanes per head (16 bytes each)
ELEM_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


#: The bucket of this op's winners in the shipped tables (``jitkern/tuned/<arch>.json``, written by
#: ``tools/sweep_membw.py --apply``): one tile per arch and dtype, looked up before ``TRITON_TILES``.
TUNED_BUCKET = "default"


def _listed(arch_name: str, dtype: str) -> list[dict]:
    """The tile candidates before rules and overrides: the shipped winner (if any), then ``TRITON_TILES``."""
    base = TRITON_TILES.get(arch_name, DEFAULT_TRITON_TILES)
    won = tuning.shipped(arch_name, OP, dtype, TUNED_BUCKET)
    return ([{**base, **won}] if won else []) + [base]


def triton_tiles(arch_name: str, dtype: str = "bf16") -> dict:
    return constraints.apply(arch_name, OP, _listed(arch_name, dtype), TUNABLES)[0]


#: The C++ variants, in fallback order: the vendors whose arches they apply to, and their lanes per head
#: (``block_x``: a wavefront of 64 on AMD, a warp of 32 on NVIDIA). The Triton variant applies everywhere.
CPP_VARIANTS = (("hip", ("amd", "cpu"), 64), ("cuda", ("nvidia", "cpu"), 32))


def variant_config(variant: str, params: dict, head_dim: int, tile: dict | None = None) -> Config:
    """One variant's config over an op's common ``params`` (shared with ``qk_norm_rope_cache``): the
    C++ variants' launch shape, or the Triton variant's from ``tile`` (default ``DEFAULT_TRITON_TILES``)."""
    if variant == "triton":
        block_d = _pow2(head_dim // 2)
        t = tile or DEFAULT_TRITON_TILES
        return Config.make("triton", **params, block_d=block_d, block_h=max(1, t["tile"] // block_d),
                           num_warps=t["num_warps"])
    warp = next(w for v, _, w in CPP_VARIANTS if v == variant)
    return Config.make(variant, **params, block_x=warp, block_y=HEADS_PER_BLOCK)


def variant_configs(arch, params: dict, head_dim: int, tile: dict | None = None) -> list[Config]:
    """One config per variant that applies to ``arch``, in fallback order."""
    return [*(variant_config(v, params, head_dim) for v, vendors, _ in CPP_VARIANTS if arch.vendor in vendors),
            variant_config("triton", params, head_dim, tile)]


def _params(dtype: str, cache_dtype: str, pos_dtype: str, head_dim: int, is_neox: bool) -> dict:
    return dict(dtype=dtype, cache_dtype=cache_dtype, pos_dtype=pos_dtype, head_dim=head_dim, is_neox=is_neox)


def triton_config(dtype: str, cache_dtype: str, pos_dtype: str, head_dim: int, is_neox: bool,
                  arch_name: str = "", tile: dict | None = None) -> Config:
    return variant_config("triton", _params(dtype, cache_dtype, pos_dtype, head_dim, is_neox), head_dim,
                          tile or triton_tiles(arch_name, dtype))


def cpp_config(variant: str, warp: int, dtype: str, cache_dtype: str, pos_dtype: str, head_dim: int,
               is_neox: bool, tok: int = 0, warps: int = 4) -> Config:
    """``tok`` > 0 (CUDA only): the 16-byte row layout, ``tok`` tokens x ``warps`` warps per block."""
    if tok:
        return Config.make(variant, **_params(dtype, cache_dtype, pos_dtype, head_dim, is_neox), block_x=warp,
                           block_y=warps, tok=tok)
    return Config.make(variant, **_params(dtype, cache_dtype, pos_dtype, head_dim, is_neox), block_x=warp,
                       block_y=HEADS_PER_BLOCK)


def row_lanes(dtype: str, head_dim: int) -> int:
    """Lanes per head of the CUDA row layout (16 bytes each), or 0 where the layout does not apply
    (it needs a power-of-two count from 2 to 32)."""
    nbytes = head_dim * ELEM_BYTES[dtype]
    lanes = nbytes // 16
    return lanes if nbytes % 16 == 0 and 2 <= lanes <= 32 and lanes & (lanes - 1) == 0 else 0


def configs_for(arch, dtype: str, cache_dtype: str, pos_dtype: str, head_dim: int, is_neox: bool,
                tile: dict | None = None) -> list[Config]:
    """One config per variant that applies to ``arch``, in fallback order (``tile``: the Triton
    variant's tile, as the arch's rules and overrides give it)."""
    return variant_configs(arch, _params(dtype, cache_dtype, pos_dtype, head_dim, is_neox), head_dim,
                           tile or triton_tiles(arch.name, dtype))


def configs(arch):
    for dtype in PREBUILD_DTYPES:
        for cache_dtype in (dtype, "fp32"):
            for head_dim in PREBUILD_HEAD_DIMS:
                for is_neox in (True, False):
                    for c in configs_for(arch, dtype, cache_dtype, "i64", head_dim, is_neox):
                        yield c
                        if c.variant == "triton":  # and the one for 16-aligned row strides (the common case)
                            yield Config.make(c.variant, **c.p, aligned=True)
                    t = triton_tiles(arch.name, dtype)
                    if arch.vendor in ("nvidia", "cpu") and t.get("cuda_tok") and row_lanes(dtype, head_dim):
                        yield cpp_config("cuda", 32, dtype, cache_dtype, "i64", head_dim, is_neox, t["cuda_tok"],
                                         t["cuda_warps"])


# ---- plan ----------------------------------------------------------------------------------------
def _plain(qkv, qw, kw, cs, pos, *rest) -> bool:
    t = torch.Tensor
    return type(qkv) is t and type(qw) is t and type(kw) is t and type(cs) is t and type(pos) is t


PLAIN_DOC = "plain torch.Tensor arguments only (no subclasses)"


def check_qkv(op: str, qkv, q_weight, k_weight, cos_sin_cache, positions, num_q_heads, num_kv_heads, head_dim):
    """The checks of packed ``qkv`` and its norm weights, rotary table and positions (shared with
    ``qk_norm_rope_cache``); returns ``(num_q_heads, num_kv_heads, head_dim, tokens)`` as ints."""
    checks.tensor(op, "qkv", qkv, dtypes=DTYPES, ndim=2)
    n_q = checks.integer(op, "num_q_heads", num_q_heads, minimum=1)
    n_kv = checks.integer(op, "num_kv_heads", num_kv_heads, minimum=1)
    d = checks.integer(op, "head_dim", head_dim, minimum=2)
    if d % 2:
        raise ShapeError(f"{op}: need an even head_dim (elements pair up for the rotation), got {d}")
    t = qkv.shape[0]
    checks.shape(op, "qkv", qkv, (t, (n_q + 2 * n_kv) * d))
    checks.unit_last_stride(op, "qkv", qkv)
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        checks.tensor(op, name, w, ndim=1, like=qkv)
        checks.same_dtype(op, name, w, qkv, "qkv")
        checks.shape(op, name, w, (d,))
        checks.unit_last_stride(op, name, w)
    checks.tensor(op, "cos_sin_cache", cos_sin_cache, dtypes=(qkv.dtype, torch.float32), ndim=2, like=qkv)
    if cos_sin_cache.shape[1] != d:
        raise ShapeError(f"{op}: cos_sin_cache has shape {tuple(cos_sin_cache.shape)}; expected [max_pos, {d}] "
                         f"(cos for the {d // 2} frequencies, then sin)")
    checks.unit_last_stride(op, "cos_sin_cache", cos_sin_cache)
    checks.tensor(op, "positions", positions, dtypes=POS_DTYPES, ndim=1, like=qkv)
    checks.shape(op, "positions", positions, (t,))
    checks.contiguous(op, "positions", positions)
    return n_q, n_kv, d, t


def plan(call):
    """Validate one call signature; one candidate per variant that applies to the arch, in order."""
    qkv, q_weight, k_weight, cos_sin_cache, positions, num_q_heads, num_kv_heads, head_dim, eps, is_neox = call.args
    n_q, n_kv, d, t = check_qkv(OP, qkv, q_weight, k_weight, cos_sin_cache, positions, num_q_heads, num_kv_heads,
                                head_dim)
    if t == 0:
        return None
    n_heads, max_pos = launch_sizes(OP, qkv, cos_sin_cache, n_q, n_kv)
    tt = checks.TRITON_TYPE
    args = (In("qkv"), In("q_weight"), In("k_weight"), In("cos_sin_cache"), In("positions"), qkv.stride(0),
            cos_sin_cache.stride(0), n_q, n_heads, max_pos, In("eps"))
    tile = call.tiles([TRITON_TILES.get(call.arch.name, DEFAULT_TRITON_TILES)], dtype=tt[qkv.dtype],
                      bucket=TUNED_BUCKET)[0]
    configs = configs_for(call.arch, tt[qkv.dtype], tt[cos_sin_cache.dtype], tt[positions.dtype], d, bool(is_neox),
                          tile)
    lanes = row_lanes(tt[qkv.dtype], d)
    rows_ok = (tile.get("cuda_tok", 0) and lanes and (qkv.stride(0) * qkv.element_size()) % 16 == 0
               and (cos_sin_cache.stride(0) * cos_sin_cache.element_size()) % 16 == 0)
    if rows_ok:  # the 16-byte row layout (16-byte aligned rows; base addresses are 16-byte aligned)
        configs = [cpp_config("cuda", 32, *(tt[x.dtype] for x in (qkv, cos_sin_cache, positions)), d, bool(is_neox),
                              tile["cuda_tok"], tile["cuda_warps"]) if c.variant == "cuda" else c for c in configs]
    if qkv.stride(0) % 16 == 0 and cos_sin_cache.stride(0) % 16 == 0:  # Triton: compiled as multiples of 16
        configs = [Config.make(c.variant, **c.p, aligned=True) if c.variant == "triton" else c for c in configs]
    return variant_candidates(configs, t, n_heads, args, _plain, extra={"cuda": (t,)})


def launch_sizes(op: str, qkv, cos_sin_cache, n_q: int, n_kv: int) -> tuple[int, int]:
    """``(heads, rotary-table rows)`` of a launch (shared with ``qk_norm_rope_cache``), after checking
    that qkv's row stride and the table's rows fit the kernels' int32 arguments."""
    max_pos = cos_sin_cache.shape[0]
    for what, v in (("qkv's row stride", qkv.stride(0)), ("cos_sin_cache's rows", max_pos)):
        checks.fits_i32(op, what, v)
    return n_q + n_kv, max_pos


def variant_candidates(configs, tokens: int, n_heads: int, args: tuple, plain, extra: dict | None = None
                       ) -> list[Candidate]:
    """One candidate per config, each over a ``(tokens, head groups)`` grid (a CUDA row-layout config,
    with ``tok``: ``(token groups, head groups)``); the C++ variants behind the ``plain`` guard (they read
    the tensors' memory directly, so no subclasses). ``extra``: arguments appended for a variant."""
    out = []
    for cfg in configs:
        p = cfg.p
        a = args + tuple((extra or {}).get(cfg.variant, ()))
        if "tok" in p:
            per_program = p["block_y"] * (32 // row_lanes(p["dtype"], p["head_dim"]))
            launch = Launch(cfg, (-(-tokens // p["tok"]), -(-n_heads // per_program)), a)
        else:
            per_program = p["block_h"] if cfg.variant == "triton" else p["block_y"]
            launch = Launch(cfg, (tokens, -(-n_heads // per_program)), a)
        out.append(Candidate(launch) if cfg.variant == "triton" else
                   Candidate(launch, guard=plain, guard_doc=PLAIN_DOC))
    return out


def qk_norm_rope(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, cos_sin_cache: torch.Tensor,
                 positions: torch.Tensor, num_q_heads: int, num_kv_heads: int, head_dim: int, eps: float = 1e-6,
                 is_neox: bool = True) -> torch.Tensor:
    """RMSNorm each q and k head of packed ``qkv`` and rotate it by its token's position, in place.

    qkv: [tokens, (Hq + 2*Hkv) * head_dim], bf16/fp16/fp32, rows contiguous.
    q_weight, k_weight: [head_dim], qkv's dtype. cos_sin_cache: [max_pos, head_dim], qkv's dtype or
    fp32 (see the module doc). positions: [tokens], int64 or int32. Returns ``qkv``.
    """
    _dispatch(qkv, q_weight, k_weight, cos_sin_cache, positions, num_q_heads, num_kv_heads, head_dim, eps, is_neox)
    return qkv


_ARGS = (
    Arg("qkv_ptr", "*{dtype}"), Arg("qw_ptr", "*{dtype}"), Arg("kw_ptr", "*{dtype}"),
    Arg("cs_ptr", "*{cache_dtype}"), Arg("pos_ptr", "*{pos_dtype}"),
    # divisible by 16 where a config says ``aligned`` (the Triton variant's 16-byte vectors; C++ configs carry no
    # such parameter and are unaffected)
    Arg("stride_t", "i64", divisible_if="aligned"), Arg("stride_cs", "i64", divisible_if="aligned"), Arg("n_q_heads", "i32"), Arg("n_heads", "i32"), Arg("max_pos", "i32"),
    Arg("eps", "fp32"),
)
_CUDA_ARGS = _ARGS + (Arg("n_tokens", "i32"),)  # the row layout's token bound (one token per block otherwise)

SPEC = registry.register(OpSpec(
    name=OP,
    variants=(
        Variant(name="hip", template="hip.cpp.j2", kernel="qk_norm_rope_kernel", args=_ARGS, kind="hip"),
        Variant(name="cuda", template="cuda.cu.j2", kernel="qk_norm_rope_kernel", args=_CUDA_ARGS, kind="cuda"),
        Variant(name="triton", template="triton.py.j2", kernel="qk_norm_rope_kernel", args=_ARGS),
    ),
    template_dir=builtin_template_dir() / OP,
    fn=qk_norm_rope,
    reference=reference,
    configs=configs,
    plan=plan,
    scalars={"eps": Scalar(float, min=0.0)},
    doc=__doc__,
    tunables=TUNABLES,
    extra={"guards": {"hip": PLAIN_DOC, "cuda": PLAIN_DOC}, "fallback": True},
    mutates=("qkv",),
    outputs=("qkv",),
))
_dispatch = dispatcher(SPEC)
