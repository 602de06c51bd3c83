"""rms_norm: ``out = x * rsqrt(mean(x², -1) + eps) * weight``, optionally fused with a residual add.

With ``residual``, ``residual += x`` is written back in place (as serving engines' fused add+norm
does) and the sum is what gets normalised. bf16/fp16/fp32 in, fp32 accumulation.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import checks, registry, runtime
from ..render import builtin_template_dir
from ..spec import Arg, Config, OpSpec, Variant

OP = "rms_norm"
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
#: Rows up to this many elements are normalised in one pass held in registers; longer rows loop.
MAX_SINGLE_PASS = 8192
BLOCKS = (256, 512, 1024, 2048, 4096, 8192)
LOOP_BLOCK = 4096


def reference(x, weight, eps=1e-6, residual=None, out=None):
    h = x.float()
    if residual is not None:
        h = h + residual.float()
        residual.copy_(h.to(residual.dtype))
    y = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
    if out is not None:
        out.copy_(y)
        return out
    return y


def block_for(n: int) -> tuple[int, bool]:
    """(block_n, single_pass) for a row of ``n`` elements."""
    if n <= MAX_SINGLE_PASS:
        return max(BLOCKS[0], 1 << max(0, (n - 1).bit_length())), True
    return LOOP_BLOCK, False


def num_warps_for(block_n: int) -> int:
    return max(4, min(16, block_n // 256))


def config(dtype: str, residual: bool, aligned: bool, block_n: int, single_pass: bool) -> Config:
    return Config.make("triton", dtype=dtype, residual=residual, aligned=aligned, block_n=block_n,
                       single_pass=single_pass, num_warps=num_warps_for(block_n))


def configs(arch):
    for dtype in ("bf16", "fp16", "fp32"):
        for residual in (False, True):
            for aligned in (True, False):
                for b in BLOCKS:
                    yield config(dtype, residual, aligned, b, True)
                yield config(dtype, residual, aligned, LOOP_BLOCK, False)


_plans = runtime.plan_cache()


def _plan(x, weight, eps, residual, out):
    """Validate one (shapes, dtypes, strides, devices) signature and decide everything that follows
    from it: ``(run, rows, n, strides, addresses)``, or None when there is nothing to launch."""
    checks.tensor(OP, "x", x, dtypes=DTYPES)
    if x.dim() == 0:
        raise checks.ShapeError(f"{OP}: x must have at least 1 dimension, got a scalar")
    checks.scalar(OP, "eps", eps, minimum=0.0)
    n = x.shape[-1]
    checks.tensor(OP, "weight", weight, ndim=1, like=x)
    checks.same_dtype(OP, "weight", weight, x, "x")
    checks.shape(OP, "weight", weight, (n,))
    checks.unit_last_stride(OP, "weight", weight)
    x2 = checks.rows(OP, "x", x)
    r2 = None
    if residual is not None:
        checks.tensor(OP, "residual", residual, like=x)
        checks.same_dtype(OP, "residual", residual, x, "x")
        checks.shape(OP, "residual", residual, x.shape)
        r2 = checks.rows(OP, "residual", residual)
    checks.tensor(OP, "out", out, like=x)
    checks.same_dtype(OP, "out", out, x, "x")
    checks.shape(OP, "out", out, x.shape)
    o2 = checks.rows(OP, "out", out)
    m = x2.shape[0]
    if m == 0 or n == 0:
        return None
    checks.fits_i32(OP, "the row length (x.shape[-1])", n)
    checks.fits_i32(OP, "the number of rows (x.numel() // x.shape[-1])", m)
    rs = r2.stride(0) if r2 is not None else 0
    strides = (x2.stride(0), rs, o2.stride(0))
    aligned = n % 16 == 0 and all(s % 16 == 0 for s in strides)
    block_n, single = block_for(n)
    cfg = config(checks.TRITON_TYPE[x.dtype], residual is not None, aligned, block_n, single)
    k = runtime.kernel(SPEC, cfg, x.device)
    return k.run, m, n, strides, k.takes_addresses


def _check_aligned(x, weight, residual, out):
    for name, t in (("x", x), ("weight", weight), ("residual", residual), ("out", out)):
        if t is not None:
            checks.aligned(OP, name, t)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: Optional[torch.Tensor] = None,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RMSNorm over the last dimension of ``x`` (any leading shape).

    ``weight``: [N], same dtype as ``x``. ``residual``: like ``x``; updated in place to ``x + residual``.
    ``out``: like ``x``; allocated if not given. Returns ``out``.

    Validation runs in full once per signature (shapes, strides, dtypes, devices of every tensor);
    later calls with the same signature check only what can change between them: the addresses.
    """
    try:
        if out is None:
            out = torch.empty_like(x)
        sig = (x.shape, x.stride(), x.dtype, x.device, weight.shape, weight.stride(), weight.dtype, weight.device,
               out.shape, out.stride(), out.dtype, out.device,
               None if residual is None else (residual.shape, residual.stride(), residual.dtype, residual.device))
        plan = _plans.get(sig, False)
    except (AttributeError, TypeError):  # not tensors: the full checks below say what is wrong
        sig, plan = None, False
    if plan is False:
        plan = _plan(x, weight, eps, residual, out)
        if sig is not None:
            _plans[sig] = plan
    if plan is None:
        return out
    run, m, n, strides, addresses = plan
    try:
        eps = float(eps)
    except (TypeError, ValueError):  # the plan was made with a good eps; this call's is not
        checks.scalar(OP, "eps", eps, minimum=0.0)
    if addresses:
        xp, wp, op = x.data_ptr(), weight.data_ptr(), out.data_ptr()
        rp = xp if residual is None else residual.data_ptr()
        if (xp | wp | rp | op) & 15:
            _check_aligned(x, weight, residual, out)
        run(m, 1, 1, xp, wp, rp, op, n, *strides, eps)
    else:
        _check_aligned(x, weight, residual, out)
        x2 = x.view(m, n)
        run(m, 1, 1, x2, weight, x2 if residual is None else residual.view(m, n), out.view(m, n), n, *strides,
            eps)
    return out


def alloc(x, weight, eps=1e-6, residual=None, out=None):
    """The output buffer ``rms_norm`` allocates when ``out`` is None (torch.compile path)."""
    return {"out": torch.empty_like(x)}


SPEC = registry.register(OpSpec(
    name=OP,
    variants=(Variant(
        name="triton",
        template="triton.py.j2",
        kernel="rms_norm_kernel",
        args=(
            Arg("x_ptr", "*{dtype}"), Arg("w_ptr", "*{dtype}"), Arg("res_ptr", "*{dtype}"),
            Arg("out_ptr", "*{dtype}"), Arg("N", "i32", divisible_if="aligned"),
            Arg("stride_x", "i64", divisible_if="aligned"), Arg("stride_res", "i64", divisible_if="aligned"),
            Arg("stride_out", "i64", divisible_if="aligned"), Arg("eps", "fp32"),
        ),
    ),),
    template_dir=builtin_template_dir() / OP,
    fn=rms_norm,
    reference=reference,
    configs=configs,
    doc=__doc__,
    mutates=("residual",),
    outputs=("out",),
    alloc=alloc,
))
