"""Input validation shared by op functions: each failure is a specific error naming the argument,
what was expected and what was given. Imports torch (only op modules use it)."""
from __future__ import annotations

import torch

import math
import operator

from .errors import ArgumentError, DeviceError, DTypeError, LayoutError, ShapeError

#: Kernel size and index arguments are 32-bit (``i32``) and grids are bounded by it.
MAX_I32 = 2**31 - 1

#: torch dtype -> Triton type name
TRITON_TYPE = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.uint8: "u8",
    torch.int8: "i8",
}
TORCH_DTYPE = {v: k for k, v in TRITON_TYPE.items()}
FLOAT_TYPES = ("bf16", "fp16", "fp32")


def tensor(op: str, name: str, t, *, dtypes=None, ndim=None, like=None):
    """Check that ``t`` is a tensor with an allowed dtype/ndim, on the same device as ``like``."""
    if not isinstance(t, torch.Tensor):
        raise DTypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise LayoutError(f"{op}: {name} is a {str(t.layout).replace('torch.', '')} tensor; kernels take dense "
                          f"(strided) tensors: pass {name}.to_dense()")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise DTypeError(f"{op}: {name} has dtype {str(t.dtype).replace('torch.', '')}; expected one of: {allowed}")
    if ndim is not None:
        ok = t.dim() in ndim if isinstance(ndim, (tuple, range)) else t.dim() == ndim
        if not ok:
            raise ShapeError(f"{op}: {name} must have {ndim} dimension(s), got shape {tuple(t.shape)}")
    if like is not None and t.device != like.device:
        raise DeviceError(f"{op}: {name} is on {t.device} but the other inputs are on {like.device}")
    return t


def scalar(op: str, name: str, value, *, minimum: float | None = None) -> float:
    """``value`` as a finite float (at least ``minimum``), else ArgumentError."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ArgumentError(f"{op}: {name} must be a real number, got {type(value).__name__} {value!r:.60}") from None
    if not math.isfinite(v) or (minimum is not None and v < minimum):
        bound = f" and at least {minimum:g}" if minimum is not None else ""
        raise ArgumentError(f"{op}: {name} must be finite{bound}, got {v!r}")
    return v


def integer(op: str, name: str, value, *, minimum: int | None = None) -> int:
    """``value`` as an int (a whole number type, not a float or bool; at least ``minimum``), else
    ArgumentError: ``num_kv_heads=1.5`` is an error, never truncated."""
    if isinstance(value, bool):
        raise ArgumentError(f"{op}: {name} must be an integer, got the bool {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise ArgumentError(f"{op}: {name} must be an integer, got {type(value).__name__} {value!r:.60}") from None
    if minimum is not None and v < minimum:
        raise ArgumentError(f"{op}: {name} must be at least {minimum}, got {v}")
    return v


def fits_i32(op: str, what: str, value: int):
    """Sizes passed to kernels as 32-bit integers (row lengths, grid sizes) must fit."""
    if value > MAX_I32:
        raise ShapeError(f"{op}: {what} is {value}, more than the kernel's 32-bit limit of {MAX_I32}; "
                         f"split the input into smaller pieces")


def same_dtype(op: str, name: str, t, ref, ref_name: str):
    if t.dtype != ref.dtype:
        raise DTypeError(f"{op}: {name} has dtype {str(t.dtype).replace('torch.', '')} but {ref_name} has "
                         f"{str(ref.dtype).replace('torch.', '')}; they must match")


def shape(op: str, name: str, t, expected: tuple):
    if tuple(t.shape) != tuple(expected):
        raise ShapeError(f"{op}: {name} has shape {tuple(t.shape)}; expected {tuple(expected)}")


def contiguous(op: str, name: str, t):
    if not t.is_contiguous():
        raise LayoutError(f"{op}: {name} must be contiguous (strides {tuple(t.stride())}); pass {name}.contiguous()")


def unit_last_stride(op: str, name: str, t):
    if t.dim() and t.stride(-1) != 1 and t.shape[-1] > 1:
        raise LayoutError(f"{op}: {name} must be contiguous in its last dimension (stride 1), got strides "
                          f"{tuple(t.stride())}; pass {name}.contiguous()")


def aligned(op: str, name: str, t, align: int = 16):
    if t.data_ptr() % align:
        raise LayoutError(f"{op}: {name} must start at a {align}-byte aligned address (kernels are compiled "
                          f"for aligned pointers); pass {name}.clone()")


def rows(op: str, name: str, t):
    """View ``t`` as 2-D (rows, last dim) without copying; LayoutError if that needs a copy."""
    unit_last_stride(op, name, t)
    try:
        return t.view(-1, t.shape[-1]) if t.dim() != 2 else t
    except RuntimeError:
        raise LayoutError(f"{op}: {name} with shape {tuple(t.shape)} and strides {tuple(t.stride())} cannot be "
                          f"viewed as rows without a copy; pass {name}.contiguous()") from None
