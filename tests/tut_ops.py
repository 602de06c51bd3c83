"""Third-party ops declared the way the README shows, used by tests/test_pipeline_ops.py.

``tut_matmul``: a tiled fp32 matmul with tunable tiles (arch rules and JITKERN_TUT_MATMUL_* overrides
apply; over-budget tiles are skipped). ``tut_cpp_scale``: x *= 2 in place through a host C++ variant.
"""
from pathlib import Path
from typing import Optional

import torch

import jitkern
from jitkern import Candidate, Config, In, Launch, checks

HERE = Path(__file__).resolve().parent
#: preferred first: big tiles (which rules or budgets may exclude), then smaller ones
TILES = ({"block_m": 128, "block_n": 256, "block_k": 64, "num_stages": 3},
         {"block_m": 64, "block_n": 256, "block_k": 256, "num_stages": 3},
         {"block_m": 32, "block_n": 32, "block_k": 32, "num_stages": 2},
         {"block_m": 16, "block_n": 16, "block_k": 16, "num_stages": 1})


def matmul_plan(call):
    a, b, out = call.args
    m, k = a.shape
    n = b.shape[1]
    for name, t in (("a", a), ("b", b), ("out", out)):
        checks.tensor("tut_matmul", name, t, dtypes=(torch.float32,), ndim=2, like=a)
        checks.contiguous("tut_matmul", name, t)
    cands = []
    for t in call.tiles(TILES):
        cfg = Config.make("triton", num_warps=4, **t)
        grid = (-(-m // t["block_m"]), -(-n // t["block_n"]))
        cands.append(Candidate(Launch(cfg, grid, (In("a"), In("b"), In("out"), m, n, k))))
    return cands


def tut_matmul(a: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    if out is None:
        out = torch.empty(a.shape[0], b.shape[1], dtype=a.dtype, device=a.device)
    jitkern.dispatcher(MATMUL)(a, b, out)
    return out


MATMUL = jitkern.OpSpec(
    name="tut_matmul",
    variants=(jitkern.Variant("triton", "triton.py.j2", "tut_matmul_kernel", args=(
        jitkern.Arg("a_ptr", "*fp32"), jitkern.Arg("b_ptr", "*fp32"), jitkern.Arg("c_ptr", "*fp32"),
        jitkern.Arg("M", "i32"), jitkern.Arg("N", "i32"), jitkern.Arg("K", "i32"))),),
    template_dir=HERE / "tut_templates" / "tut_matmul",
    fn=tut_matmul, reference=lambda a, b, out=None: a @ b, plan=matmul_plan,
    configs=lambda arch: [Config.make("triton", num_warps=4, **t) for t in TILES],
    tunables={"block_m": (16, 32, 64, 128), "block_n": (16, 32, 64, 128, 256), "block_k": (16, 32, 64, 128, 256),
              "num_stages": (1, 2, 3, 4)},
    outputs=("out",), alloc=lambda a, b, out=None: {"out": torch.empty(a.shape[0], b.shape[1], dtype=a.dtype)},
)


def scale_plan(call):
    (x,) = call.args
    checks.tensor("tut_cpp_scale", "x", x, dtypes=(torch.float32,))
    checks.contiguous("tut_cpp_scale", "x", x)
    n = x.numel()
    return Candidate(Launch(Config.make("good", block=128, tag="tut"), (-(-n // 128),), (In("x"), n)))


def tut_cpp_scale(x: torch.Tensor) -> torch.Tensor:
    jitkern.dispatcher(CPP_SCALE)(x)
    return x


CPP_SCALE = jitkern.OpSpec(
    name="tut_cpp_scale",
    variants=(jitkern.Variant("good", "good.cpp.j2", "fb_kernel", (jitkern.Arg("x_ptr", "*fp32"), jitkern.Arg("n", "i32")),
                              kind="cpp"),),
    template_dir=HERE / "fallback_templates", fn=tut_cpp_scale, reference=lambda x: x.mul_(2).add_(1),
    plan=scale_plan, configs=lambda arch: [Config.make("good", block=128, tag="tut")], outputs=("x",),
)
