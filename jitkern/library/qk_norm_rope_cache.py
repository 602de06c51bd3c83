"""qk_norm_rope_cache: qk_norm_rope fused with the write of k and v into a paged KV cache (seed 002's
fused step: ATOM's ``fused_qk_norm_rope_cache_quant``, without the shuffle).

``qkv`` is ``[tokens, (Hq + 2*Hkv) * D]`` as in ``qk_norm_rope``: every q and k head is RMS-normalised
(fp32, per-head weight) and rotated by its token's position, in place. Then, for each token ``t`` with
``slot = slot_mapping[t] >= 0``, the rotated k heads and the (unchanged) v heads are written to
``k_cache`` / ``v_cache`` ``[num_blocks, block_size, Hkv, D]`` (contiguous) at flat slot ``slot``
(= block * block_size + offset); a negative slot (a padding token) writes nothing. The cache holds k
exactly as stored back into ``qkv``.

Caches are qkv's dtype, or ``torch.float8_e4m3fn`` with per-tensor fp32 scales ``k_scale``/``v_scale``
(1-element tensors, as vLLM keeps them): the cache holds ``fp8(clamp(x / scale, -448, 448))``, rounded
to nearest even. Rotary tables and positions are as in ``qk_norm_rope`` (``cos_sin_table``).

Variants, in fallback order: ``hip`` (HIP C++ using CK's bf16/fp16/fp8 conversions; AMD), ``cuda``
(CUDA C++, NVIDIA), ``triton`` (everywhere, incl. the CPU interpreter; its fp8 encoding is integer
arithmetic, so the interpreter and GPUs agree bit for bit). Without CK the hip variant is unavailable
and the op runs the next one, with one warning (seed 002). C++ variants take plain tensors only.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import checks, registry
from ..dispatch import dispatcher
from ..errors import DTypeError, ShapeError
from .qk_norm_rope import (HEADS_PER_BLOCK, PLAIN_DOC, check_qkv, launch_sizes, norm_rope_rows, variant_candidates,
                           variant_config, variant_configs)
from ..render import builtin_template_dir
from ..spec import Arg, Config, In, OpSpec, Scalar, Variant

OP = "qk_norm_rope_cache"
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
POS_DTYPES = (torch.int64, torch.int32)
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
PREBUILD_HEAD_DIMS = (64, 128)
PREBUILD_DTYPES = ("bf16",)


def reference(qkv, q_weight, k_weight, cos_sin_cache, positions, slot_mapping, k_cache, v_cache, num_q_heads,
              num_kv_heads, head_dim, eps=1e-6, is_neox=True, k_scale=None, v_scale=None):
    """PyTorch reference: same arguments and in-place effects as ``qk_norm_rope_cache``; returns ``qkv``."""
    t, d = qkv.shape[0], head_dim
    hq, hkv = num_q_heads, num_kv_heads
    h = hq + hkv
    rows = qkv.view(t, -1)
    max_pos = cos_sin_cache.shape[0]
    pos = positions.long()
    cs = cos_sin_cache.float()[pos.clamp(0, max_pos - 1)]
    cs = torch.where(((pos >= 0) & (pos < max_pos))[:, None], cs, torch.zeros_like(cs))  # out of range: zeros
    norm_rope_rows(qkv, q_weight, k_weight, cs, hq, hkv, d, eps, is_neox)
    slots = slot_mapping.long()
    keep = slots >= 0
    for src, cache, scale in ((rows[:, hq * d: h * d], k_cache, k_scale), (rows[:, h * d: (h + hkv) * d], v_cache,
                                                                            v_scale)):
        val = src.reshape(t, hkv, d)[keep]
        if cache.dtype == FP8:
            val = (val.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX)
        cache.view(-1, hkv, d)[slots[keep]] = val.to(cache.dtype)
    return qkv


# ---- configs -------------------------------------------------------------------------------------
def _common(dtype: str, cs_dtype: str, pos_dtype: str, kv_dtype: str, head_dim: int, is_neox: bool) -> dict:
    return dict(dtype=dtype, cs_dtype=cs_dtype, pos_dtype=pos_dtype, kv_dtype=kv_dtype,
                kv_type="u8" if kv_dtype == "fp8e4m3" else dtype, head_dim=head_dim, is_neox=is_neox)


def triton_config(dtype, cs_dtype, pos_dtype, kv_dtype, head_dim, is_neox) -> Config:
    return variant_config("triton", _common(dtype, cs_dtype, pos_dtype, kv_dtype, head_dim, is_neox), head_dim)


def cpp_config(variant, warp, dtype, cs_dtype, pos_dtype, kv_dtype, head_dim, is_neox) -> Config:
    return Config.make(variant, **_common(dtype, cs_dtype, pos_dtype, kv_dtype, head_dim, is_neox), block_x=warp,
                       block_y=HEADS_PER_BLOCK)


def configs_for(arch, dtype, cs_dtype, pos_dtype, kv_dtype, head_dim, is_neox) -> list[Config]:
    """One config per variant that applies to ``arch``, in fallback order (``qk_norm_rope``'s variants
    and launch shapes; the Triton tile is the default one on every arch)."""
    return variant_configs(arch, _common(dtype, cs_dtype, pos_dtype, kv_dtype, head_dim, is_neox), head_dim)


def configs(arch):
    """What prebuild compiles: bf16 qkv with an fp32 rotary table, bf16 or fp8 cache, both styles."""
    for dtype in PREBUILD_DTYPES:
        for kv_dtype in (dtype, "fp8e4m3"):
            for head_dim in PREBUILD_HEAD_DIMS:
                for is_neox in (True, False):
                    yield from configs_for(arch, dtype, "fp32", "i64", kv_dtype, head_dim, is_neox)


# ---- plan ----------------------------------------------------------------------------------------
def _plain(*args) -> bool:
    """The tensor arguments (the first eight, and the two scales last) are plain tensors."""
    t = torch.Tensor
    return all(type(a) is t for a in args[:8]) and type(args[13]) is t and type(args[14]) is t


def plan(call):
    """Validate one call signature; one candidate per variant that applies to the arch, in order."""
    (qkv, q_weight, k_weight, cos_sin_cache, positions, slot_mapping, k_cache, v_cache, num_q_heads, num_kv_heads,
     head_dim, eps, is_neox, k_scale, v_scale) = call.args
    n_q, n_kv, d, t = check_qkv(OP, qkv, q_weight, k_weight, cos_sin_cache, positions, num_q_heads, num_kv_heads,
                                head_dim)
    checks.tensor(OP, "slot_mapping", slot_mapping, dtypes=(torch.int64,), ndim=1, like=qkv)
    checks.shape(OP, "slot_mapping", slot_mapping, (t,))
    checks.contiguous(OP, "slot_mapping", slot_mapping)
    # the op function passes fp8 caches as their uint8 bits (see qk_norm_rope_cache)
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        checks.tensor(OP, name, c, dtypes=(qkv.dtype, torch.uint8), ndim=4, like=qkv)
        if c.shape[2:] != (n_kv, d):
            raise ShapeError(f"{OP}: {name} has shape {tuple(c.shape)}; expected [num_blocks, block_size, {n_kv}, {d}]")
        checks.contiguous(OP, name, c)
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ShapeError(f"{OP}: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must match in "
                         f"shape and dtype")
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        checks.tensor(OP, name, s, dtypes=(torch.float32,), like=qkv)
        checks.shape(OP, name, s, (1,))
    if t == 0:
        return None
    n_heads, max_pos = launch_sizes(OP, qkv, cos_sin_cache, n_q, n_kv)
    tt = checks.TRITON_TYPE
    kv_dtype = "fp8e4m3" if k_cache.dtype == torch.uint8 else tt[qkv.dtype]
    args = (In("qkv"), In("q_weight"), In("k_weight"), In("cos_sin_cache"), In("positions"), In("slot_mapping"),
            In("k_cache"), In("v_cache"), In("k_scale"), In("v_scale"), qkv.stride(0), cos_sin_cache.stride(0),
            n_q, n_heads, n_kv, max_pos, In("eps"))
    configs = configs_for(call.arch, tt[qkv.dtype], tt[cos_sin_cache.dtype], tt[positions.dtype], kv_dtype, d,
                          bool(is_neox))
    return variant_candidates(configs, t, n_heads, args, _plain)


_ones: dict = {}


def _unit_scale(device) -> torch.Tensor:
    s = _ones.get(device)
    if s is None:
        s = _ones[device] = torch.ones(1, dtype=torch.float32, device=device)
    return s


def qk_norm_rope_cache(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                       cos_sin_cache: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                       k_cache: torch.Tensor, v_cache: torch.Tensor, num_q_heads: int, num_kv_heads: int,
                       head_dim: int, eps: float = 1e-6, is_neox: bool = True, k_scale: Optional[torch.Tensor] = None,
                       v_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RMSNorm and rotate each q and k head of packed ``qkv`` in place, and write k and v into the paged
    caches at ``slot_mapping`` (see the module doc). ``k_cache``/``v_cache``: [num_blocks, block_size,
    Hkv, head_dim], qkv's dtype or float8_e4m3fn (then ``k_scale``/``v_scale``, fp32 [1], divide the
    values before the cast; default 1). ``slot_mapping``: [tokens] int64, negative = not cached. Returns ``qkv``.
    """
    if k_cache.dtype == FP8 or v_cache.dtype == FP8:
        if k_cache.dtype != v_cache.dtype:
            raise DTypeError(f"{OP}: k_cache is {k_cache.dtype} and v_cache {v_cache.dtype}; use one cache dtype")
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)  # the kernels write fp8 bits
    elif k_cache.dtype == torch.uint8:
        raise DTypeError(f"{OP}: k_cache is uint8; an fp8 cache is torch.float8_e4m3fn")
    k_scale = _unit_scale(qkv.device) if k_scale is None else k_scale
    v_scale = _unit_scale(qkv.device) if v_scale is None else v_scale
    _dispatch(qkv, q_weight, k_weight, cos_sin_cache, positions, slot_mapping, k_cache, v_cache, num_q_heads,
              num_kv_heads, head_dim, eps, is_neox, k_scale, v_scale)
    return qkv


_ARGS = (
    Arg("qkv_ptr", "*{dtype}"), Arg("qw_ptr", "*{dtype}"), Arg("kw_ptr", "*{dtype}"), Arg("cs_ptr", "*{cs_dtype}"),
    Arg("pos_ptr", "*{pos_dtype}"), Arg("slot_ptr", "*i64"), Arg("kc_ptr", "*{kv_type}"),
    Arg("vc_ptr", "*{kv_type}"), Arg("ks_ptr", "*fp32"), Arg("vs_ptr", "*fp32"), Arg("stride_t", "i64"),
    Arg("stride_cs", "i64"), Arg("n_q_heads", "i32"), Arg("n_heads", "i32"), Arg("n_kv_heads", "i32"),
    Arg("max_pos", "i32"), Arg("eps", "fp32"),
)
_KERNEL = "qk_norm_rope_cache_kernel"

SPEC = registry.register(OpSpec(
    name=OP,
    variants=(
        Variant(name="hip", template="hip.cpp.j2", kernel=_KERNEL, args=_ARGS, kind="hip"),
        Variant(name="cuda", template="cuda.cu.j2", kernel=_KERNEL, args=_ARGS, kind="cuda"),
        Variant(name="triton", template="triton.py.j2", kernel=_KERNEL, args=_ARGS),
    ),
    template_dir=builtin_template_dir() / OP,
    fn=qk_norm_rope_cache,
    reference=reference,
    configs=configs,
    plan=plan,
    scalars={"eps": Scalar(float, min=0.0)},
    doc=__doc__,
    extra={"guards": {"hip": PLAIN_DOC, "cuda": PLAIN_DOC}, "fallback": True},
    mutates=("qkv", "k_cache", "v_cache"),
    outputs=("qkv",),
))
_dispatch = dispatcher(SPEC)
