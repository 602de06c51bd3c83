"""An op library outside jitkern: declares `scale_add` (out = alpha * x + y) with its own template."""
from pathlib import Path

import torch

import jitkern
from jitkern import checks, runtime

BLOCK = 1024


def reference(x, y, alpha=1.0):
    return (alpha * x.float() + y.float()).to(x.dtype)


def configs(arch):
    for dtype in ("bf16", "fp16", "fp32"):
        yield jitkern.Config.make("triton", dtype=dtype, block=BLOCK, num_warps=4)


def scale_add(x: torch.Tensor, y: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    checks.tensor("scale_add", "x", x, dtypes=(torch.bfloat16, torch.float16, torch.float32))
    checks.tensor("scale_add", "y", y, like=x)
    checks.same_dtype("scale_add", "y", y, x, "x")
    checks.shape("scale_add", "y", y, x.shape)
    x, y = x.contiguous(), y.contiguous()
    out = torch.empty_like(x)
    cfg = jitkern.Config.make("triton", dtype=checks.TRITON_TYPE[x.dtype], block=BLOCK, num_warps=4)
    kernel = runtime.kernel(SPEC, cfg, x.device)
    n = x.numel()
    kernel[(triton_cdiv(n, BLOCK),)](x, y, out, n, float(alpha))
    return out


def triton_cdiv(a, b):
    return -(-a // b)


SPEC = jitkern.OpSpec(
    name="scale_add",
    variants=(jitkern.Variant(
        name="triton",
        template="scale_add.py.j2",
        kernel="scale_add_kernel",
        args=(jitkern.Arg("x", "*{dtype}"), jitkern.Arg("y", "*{dtype}"), jitkern.Arg("out", "*{dtype}"),
              jitkern.Arg("n", "i32"), jitkern.Arg("alpha", "fp32")),
    ),),
    template_dir=Path(__file__).parent / "templates",
    fn=scale_add,
    reference=reference,
    configs=configs,
    fake=lambda x, y, alpha=1.0: torch.empty_like(x),  # shapes for torch.compile (torch.library)
)
