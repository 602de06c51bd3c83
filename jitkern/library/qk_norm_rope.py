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

from .. import checks, constraints, fallback, registry, runtime
from ..errors import ShapeError
from ..render import builtin_template_dir
from ..spec import Arg, Config, OpSpec, Variant

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
    t, d, half = qkv.shape[0], head_dim, head_dim // 2
    h = num_q_heads + num_kv_heads
    rows = qkv.view(t, -1)
    x = rows[:, : h * d].float().reshape(t, h, d)
    w = torch.cat([q_weight.float().expand(num_q_heads, d), k_weight.float().expand(num_kv_heads, d)])
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
    cs = cos_sin_cache.float()[positions.long()][:, None, :]  # [t, 1, d]
    cos, sin = cs[..., :half], cs[..., half:]
    if is_neox:
        a, b = y[..., :half], y[..., half:]
        out = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
    else:
        a, b = y[..., 0::2], y[..., 1::2]
        out = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)
    rows[:, : h * d].copy_(out.reshape(t, h * d).to(qkv.dtype))
    return qkv


# ---- configs -------------------------------------------------------------------------------------
def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


#: Triton variant tile (values ``JITKERN_QK_NORM_ROPE_<PARAM>`` may set): elements per program
#: (heads x D/2; heads per program = tile // (D/2)) and warps, per arch.
TUNABLES = {"tile": (256, 512, 1024, 2048, 4096), "num_warps": (1, 2, 4, 8)}
TRITON_TILES = {  # H200 sweep (tools/check_qk_norm_rope_gpu.py --sweep, 2026-12-01): 1.7 -> 2.4 TB/s
    "sm_90": {"tile": 512, "num_warps": 1}}
DEFAULT_TRITON_TILES = {"tile": TRITON_TILE, "num_warps": 4}


def triton_tiles(arch_name: str) -> dict:
    return constraints.apply(arch_name, OP, [TRITON_TILES.get(arch_name, DEFAULT_TRITON_TILES)], TUNABLES)[0]


def triton_config(dtype: str, cache_dtype: str, pos_dtype: str, head_dim: int, is_neox: bool,
                  arch_name: str = "") -> Config:
    block_d = _pow2(head_dim // 2)
    t = triton_tiles(arch_name)
    return Config.make("triton", dtype=dtype, cache_dtype=cache_dtype, pos_dtype=pos_dtype, head_dim=head_dim,
                       is_neox=is_neox, block_d=block_d, block_h=max(1, t["tile"] // block_d), num_warps=t["num_warps"])


def cpp_config(variant: str, warp: int, dtype: str, cache_dtype: str, pos_dtype: str, head_dim: int,
               is_neox: bool) -> Config:
    return Config.make(variant, dtype=dtype, cache_dtype=cache_dtype, pos_dtype=pos_dtype, head_dim=head_dim,
                       is_neox=is_neox, block_x=warp, block_y=HEADS_PER_BLOCK)


def configs_for(arch, dtype: str, cache_dtype: str, pos_dtype: str, head_dim: int, is_neox: bool) -> list[Config]:
    """One config per variant that applies to ``arch``, in fallback order."""
    out = []
    if arch.vendor == "amd" or arch.vendor == "cpu":
        out.append(cpp_config("hip", 64, dtype, cache_dtype, pos_dtype, head_dim, is_neox))
    if arch.vendor == "nvidia" or arch.vendor == "cpu":
        out.append(cpp_config("cuda", 32, dtype, cache_dtype, pos_dtype, head_dim, is_neox))
    out.append(triton_config(dtype, cache_dtype, pos_dtype, head_dim, is_neox, arch.name))
    return out


def configs(arch):
    for dtype in PREBUILD_DTYPES:
        for cache_dtype in (dtype, "fp32"):
            for head_dim in PREBUILD_HEAD_DIMS:
                for is_neox in (True, False):
                    yield from configs_for(arch, dtype, cache_dtype, "i64", head_dim, is_neox)


# ---- launches ------------------------------------------------------------------------------------
def _plain(qkv, qw, kw, cs, pos, *rest) -> bool:
    t = torch.Tensor
    return type(qkv) is t and type(qw) is t and type(kw) is t and type(cs) is t and type(pos) is t


def _launcher(heads_per_program: int):
    def launch(k, qkv, qw, kw, cs, pos, n_q, n_heads, max_pos, eps):
        k.run(qkv.shape[0], -(-n_heads // heads_per_program), 1,
              qkv, qw, kw, cs, pos, qkv.stride(0), cs.stride(0), n_q, n_heads, max_pos, eps)
    return launch


def candidates(arch, dtype, cache_dtype, pos_dtype, head_dim, is_neox) -> list[fallback.Candidate]:
    out = []
    for cfg in configs_for(arch, dtype, cache_dtype, pos_dtype, head_dim, is_neox):
        p = cfg.p
        if cfg.variant == "triton":
            out.append(fallback.Candidate(cfg, _launcher(p["block_h"])))
        else:
            out.append(fallback.Candidate(cfg, _launcher(p["block_y"]), guard=_plain,
                                          guard_doc="plain torch.Tensor arguments only (no subclasses)"))
    return out


_routes = runtime.plan_cache()  # (dtypes, head_dim, style, device) -> fallback.Route
_plans = runtime.plan_cache()  # full call signature -> (route, n_q, n_heads, max_pos) | None (empty)


def qk_norm_rope(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, cos_sin_cache: torch.Tensor,
                 positions: torch.Tensor, num_q_heads: int, num_kv_heads: int, head_dim: int, eps: float = 1e-6,
                 is_neox: bool = True) -> torch.Tensor:
    """RMSNorm each q and k head of packed ``qkv`` and rotate it by its token's position, in place.

    qkv: [tokens, (Hq + 2*Hkv) * head_dim], bf16/fp16/fp32, rows contiguous.
    q_weight, k_weight: [head_dim], qkv's dtype. cos_sin_cache: [max_pos, head_dim], qkv's dtype or
    fp32 (see the module doc). positions: [tokens], int64 or int32. Returns ``qkv``.

    Validation runs in full once per signature (shapes, strides, dtypes, devices); later calls with
    the same signature check only the addresses' alignment.
    """
    try:
        sig = (qkv.shape, qkv.stride(), qkv.dtype, qkv.device, q_weight.shape, q_weight.stride(), q_weight.dtype,
               q_weight.device, k_weight.shape, k_weight.stride(), k_weight.dtype, k_weight.device,
               cos_sin_cache.shape, cos_sin_cache.stride(), cos_sin_cache.dtype, cos_sin_cache.device,
               positions.shape, positions.stride(), positions.dtype, positions.device,
               num_q_heads, num_kv_heads, head_dim, bool(is_neox))
        plan = _plans.get(sig, False)
    except (AttributeError, TypeError):  # not tensors: the full checks say what is wrong
        sig, plan = None, False
    if plan is False:
        plan = _plan(qkv, q_weight, k_weight, cos_sin_cache, positions, num_q_heads, num_kv_heads, head_dim,
                     is_neox)
        if sig is not None:
            _plans[sig] = plan
    if plan is None:
        return qkv
    if (qkv.data_ptr() | q_weight.data_ptr() | k_weight.data_ptr() | cos_sin_cache.data_ptr()
            | positions.data_ptr()) & 15:
        _check_aligned(qkv, q_weight, k_weight, cos_sin_cache, positions)
    route, n_q, n_heads, max_pos = plan
    route(qkv, q_weight, k_weight, cos_sin_cache, positions, n_q, n_heads, max_pos, float(eps))
    return qkv


def _check_aligned(qkv, q_weight, k_weight, cos_sin_cache, positions):
    for name, x in (("qkv", qkv), ("q_weight", q_weight), ("k_weight", k_weight),
                    ("cos_sin_cache", cos_sin_cache), ("positions", positions)):
        checks.aligned(OP, name, x)


def _plan(qkv, q_weight, k_weight, cos_sin_cache, positions, num_q_heads, num_kv_heads, head_dim, is_neox):
    """Validate a call signature in full; return (route, n_q, n_heads, max_pos), or None for no tokens."""
    checks.tensor(OP, "qkv", qkv, dtypes=DTYPES, ndim=2)
    n_q, n_kv, d = int(num_q_heads), int(num_kv_heads), int(head_dim)
    if n_q < 1 or n_kv < 1 or d < 2 or d % 2:
        raise ShapeError(f"{OP}: need num_q_heads >= 1, num_kv_heads >= 1 and an even head_dim >= 2; got "
                         f"{n_q}, {n_kv}, {d}")
    t = qkv.shape[0]
    checks.shape(OP, "qkv", qkv, (t, (n_q + 2 * n_kv) * d))
    checks.unit_last_stride(OP, "qkv", qkv)
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        checks.tensor(OP, name, w, ndim=1, like=qkv)
        checks.same_dtype(OP, name, w, qkv, "qkv")
        checks.shape(OP, name, w, (d,))
        checks.unit_last_stride(OP, name, w)
    checks.tensor(OP, "cos_sin_cache", cos_sin_cache, dtypes=(qkv.dtype, torch.float32), ndim=2, like=qkv)
    if cos_sin_cache.shape[1] != d:
        raise ShapeError(f"{OP}: cos_sin_cache has shape {tuple(cos_sin_cache.shape)}; expected [max_pos, {d}] "
                         f"(cos for the {d // 2} frequencies, then sin)")
    checks.unit_last_stride(OP, "cos_sin_cache", cos_sin_cache)
    checks.tensor(OP, "positions", positions, dtypes=POS_DTYPES, ndim=1, like=qkv)
    checks.shape(OP, "positions", positions, (t,))
    if positions.shape[0] > 1 and positions.stride(0) != 1:
        raise checks.LayoutError(f"{OP}: positions must be contiguous; pass positions.contiguous()")
    if t == 0:
        return None
    _check_aligned(qkv, q_weight, k_weight, cos_sin_cache, positions)
    tt = checks.TRITON_TYPE
    key = (qkv.dtype, cos_sin_cache.dtype, positions.dtype, d, bool(is_neox), qkv.device)
    r = _routes.get(key)
    if r is None:
        select_arch, _ = runtime.arches_for(qkv.device)
        cands = candidates(select_arch, tt[qkv.dtype], tt[cos_sin_cache.dtype], tt[positions.dtype], d,
                           bool(is_neox))
        r = _routes[key] = fallback.route(SPEC, cands, qkv.device, inplace=(0,))
    return r, n_q, n_q + n_kv, cos_sin_cache.shape[0]


_ARGS = (
    Arg("qkv_ptr", "*{dtype}"), Arg("qw_ptr", "*{dtype}"), Arg("kw_ptr", "*{dtype}"),
    Arg("cs_ptr", "*{cache_dtype}"), Arg("pos_ptr", "*{pos_dtype}"), Arg("stride_t", "i64"),
    Arg("stride_cs", "i64"), Arg("n_q_heads", "i32"), Arg("n_heads", "i32"), Arg("max_pos", "i32"),
    Arg("eps", "fp32"),
)

SPEC = registry.register(OpSpec(
    name=OP,
    variants=(
        Variant(name="hip", template="hip.cpp.j2", kernel="qk_norm_rope_kernel", args=_ARGS, kind="hip"),
        Variant(name="cuda", template="cuda.cu.j2", kernel="qk_norm_rope_kernel", args=_ARGS, kind="cuda"),
        Variant(name="triton", template="triton.py.j2", kernel="qk_norm_rope_kernel", args=_ARGS),
    ),
    template_dir=builtin_template_dir() / OP,
    fn=qk_norm_rope,
    reference=reference,
    configs=configs,
    doc=__doc__,
    extra={"guards": {"hip": "plain torch.Tensor arguments only (no subclasses)",
                      "cuda": "plain torch.Tensor arguments only (no subclasses)"},
           "inplace": ("qkv",), "fallback": True, "tunables": TUNABLES},
    mutates=("qkv",),
    outputs=("qkv",),
))
