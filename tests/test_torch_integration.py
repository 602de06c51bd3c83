"""torch.library registration (jitkern.torch_ops): schemas with mutation annotations, fake
implementations, torch.compile(fullgraph=True) without graph breaks, CUDA-graph capture and replay.

CPU tests run the kernels through Triton's interpreter (conftest sets TRITON_INTERPRET=1); the
GPU tests (torch.compile with Inductor, CUDA graphs, the direct-launch fast path) run with
``TRITON_INTERPRET=0 pytest -m gpu`` on a GPU machine.
"""
from __future__ import annotations

import itertools
import logging
from typing import Optional

import pytest
import torch

import jitkern
from jitkern import registry, torch_ops
from jitkern.errors import LayoutError, SpecError
from jitkern.library import rms_norm as rn
from jitkern.spec import Config, OpSpec, Variant

from conftest import requires_gpu

_names = itertools.count()


def _toy(fn, **kw) -> OpSpec:
    """A spec whose fn is plain torch code: registration does not depend on kernels."""
    return OpSpec(name=f"toy_{next(_names)}", variants=(Variant("triton", "none.j2", "k"),), template_dir=".",
                  fn=fn, reference=fn, configs=lambda arch: [Config.make("triton")], **kw)


def _rms_inputs(device, dtype=torch.float32, rows=3, n=64):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(rows, n, generator=g).to(device, dtype)
    w = torch.randn(n, generator=g).to(device, dtype)
    r = torch.randn(rows, n, generator=g).to(device, dtype)
    return x, w, r


# ---- registration from the spec's declarations --------------------------------------------------
def test_rms_norm_schema_declares_its_mutations():
    op = torch_ops.register(registry.get("rms_norm"))
    schema = torch.ops.jitkern.rms_norm.default._schema
    mutable = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert mutable == {"residual", "out"}
    assert len(schema.returns) == 0  # returns the out= buffer from Python, never an alias from the op
    assert torch_ops.register(registry.get("rms_norm")) is op  # idempotent


@pytest.mark.parametrize("name", sorted(registry.BUILTIN))
def test_every_builtin_op_registers(name):
    """Every built-in op must declare what torch.library needs (see OpSpec: mutates/outputs/alloc/fake)."""
    spec = registry.get(name)
    torch_ops.register(spec)
    schema = getattr(torch.ops.jitkern, name).default._schema
    mutable = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert mutable == set(spec.mutates)
    assert torch_ops.registered(name) is not None
    eager = torch_ops.op_function(spec)
    assert eager is spec.fn and eager._torchdynamo_inline.__name__ == f"{name}_traced"  # no wrapper in eager


def test_opcheck_rms_norm_cpu():
    x, w, r = _rms_inputs("cpu")
    op = torch.ops.jitkern.rms_norm.default if torch_ops.registered("rms_norm") else \
        torch_ops.register(registry.get("rms_norm"))._opoverload
    for residual in (None, r):
        args = (x, w, 1e-6, None if residual is None else residual.clone(), torch.empty_like(x))
        torch.library.opcheck(op, args)  # schema (mutations), fake tensors, autograd registration, AOT dispatch


@pytest.mark.parametrize("name", sorted(registry.BUILTIN))
def test_no_in_place_argument_can_be_dropped_as_a_default(name):
    """The dispatcher drops trailing arguments equal to their defaults; torch 2.11 then indexes the
    mutated ones by position and fails (paged_attention_decode's trailing ``workspace=None`` on the
    H200). No mutated argument, nor any before it, may carry a default in the schema."""
    spec = registry.get(name)
    torch_ops.register(spec)
    args = getattr(torch.ops.jitkern, name).default._schema.arguments
    mutated = [i for i, a in enumerate(args) if a.alias_info is not None and a.alias_info.is_write]
    assert mutated
    assert not [a.name for a in args[:max(mutated) + 1] if a.has_default_value()]


def test_traced_call_passes_arguments_positionally_in_schema_order():
    """What Dynamo traces calls the custom op with every argument, positionally in schema order, the
    outputs filled in: torch 2.11's in-place kernel of a mutating op reads mutated arguments as
    ``args[i]`` (with the schema fix beside it, paged_attention_decode compiles on the H200)."""
    spec = registry.get("paged_attention_decode")
    sig = torch_ops._signature(spec)
    seen = []
    traced = torch_ops._traced(spec, sig, lambda *a, **kw: seen.append((a, kw)))
    q, kc, bt, sl = torch.zeros(1, 8, 64), torch.zeros(2, 16, 1, 64), torch.zeros(1, 2, dtype=torch.int32), \
        torch.ones(1, dtype=torch.int32)
    out = traced(q, kc, kc, bt, seq_lens=sl, scale=0.5)
    (args, kwargs), = seen
    assert kwargs == {} and len(args) == len(sig.parameters)
    assert args[:4] == (q, kc, kc, bt) and args[4] is sl and args[5] == 0.5
    named = dict(zip(sig.parameters, args))
    assert named["out"] is out and out.shape == q.shape and named["workspace"] is None


def test_declarations_are_checked():
    def f(x: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        return x if out is None else out.copy_(x)

    with pytest.raises(SpecError, match="alloc"):
        torch_ops.register(_toy(f, outputs=("out",)))
    with pytest.raises(SpecError, match="not parameters"):
        torch_ops.register(_toy(f, mutates=("nope",)))
    with pytest.raises(SpecError, match="neither outputs"):
        torch_ops.register(_toy(f))
    with pytest.raises(SpecError, match="tuple of parameter names"):
        _toy(f, mutates="out")

    def g(x, out=None):
        return x

    with pytest.raises(SpecError, match="no type annotation"):
        torch_ops.register(_toy(g, fake=g))


def test_unregistrable_op_stays_callable_with_one_warning(caplog):
    def g(x, y):
        return x + y

    spec = _toy(g)
    with caplog.at_level(logging.WARNING, logger="jitkern"):
        fn = torch_ops.op_function(spec)
        torch_ops.op_function(spec)
    assert fn is g
    assert sum("not registered with torch.library" in r.getMessage() for r in caplog.records) == 1


@pytest.fixture(params=["inline-hook", "wrapper"])
def eager_path(request, monkeypatch):
    """Both ways ``jitkern.ops.<name>`` can be made: the op function itself with Dynamo's inline hook
    set (torch versions it has been checked on), or a wrapper asking ``is_compiling()`` (others)."""
    if request.param == "wrapper":
        monkeypatch.setattr(torch_ops, "INLINE_HOOK_SINCE", (99, 0))
    return request.param


def test_three_kinds_of_op_compile_without_graph_breaks(eager_path):
    """outputs (out= buffer), an in-place input it returns, new tensors (fake), and -> None."""
    def scale_out(x: torch.Tensor, s: float, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = torch.empty_like(x) if out is None else out
        out.copy_(x * s)
        return out

    def bump_(x: torch.Tensor, s: float) -> torch.Tensor:
        x.add_(s)
        return x

    def pair(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x + 1, x * 2

    def zero_(x: torch.Tensor) -> None:
        x.zero_()

    specs = (_toy(scale_out, outputs=("out",), alloc=lambda x, s, out=None: {"out": torch.empty_like(x)}),
             _toy(bump_, outputs=("x",)), _toy(pair, fake=lambda x: (torch.empty_like(x), torch.empty_like(x))),
             _toy(zero_, mutates=("x",)))
    a, b, c, d = (torch_ops.op_function(spec) for spec in specs)
    for spec, eager in zip(specs, (a, b, c, d)):
        assert (eager is spec.fn) == (eager_path == "inline-hook")

    def model(x):
        y = a(x, 3.0)
        z = b(y.clone(), 1.0)
        p, q = c(z)
        t = q.clone()
        d(t)
        return p + q + t

    x = torch.randn(5)
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0
    called = {str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert {f"jitkern.{spec.name}.default" for spec in specs} <= called, called  # the ops, not their bodies
    torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="aot_eager")(x), model(x))
    torch.testing.assert_close(model(x), (x * 3 + 1 + 1) + (x * 3 + 1) * 2)


# ---- lazy registration: nothing is registered until a trace or torch.ops asks ------------------
LAZY_CHILD = r"""
import json, sys, torch, jitkern
from jitkern import registry, torch_ops
if sys.argv[1] == "wrapper":
    torch_ops.INLINE_HOOK_SINCE = (99, 0)
fns = {n: getattr(jitkern.ops, n) for n in sorted(registry.BUILTIN)}
res = {"after_lookup": sorted(n for n in fns if torch_ops.registered(n) is not None)}

def block(x, w, r):
    y = jitkern.ops.rms_norm(torch.nn.functional.silu(x), w, residual=r)
    return fns["rms_norm"](y * 2, w) + 1

x, w, r = torch.randn(3, 64), torch.randn(64), torch.randn(3, 64)
res["graph_breaks"] = torch._dynamo.explain(block)(x, w, r.clone()).graph_break_count
res["after_trace"] = sorted(n for n in fns if torch_ops.registered(n) is not None)
r1, r2 = r.clone(), r.clone()
torch.testing.assert_close(torch.compile(block, fullgraph=True, backend="aot_eager")(x, w, r1), block(x, w, r2))
torch.testing.assert_close(r1, r2)
res["direct"] = str(torch.ops.jitkern.gemm.default)  # a direct torch.ops lookup registers the op it names
res["after_direct"] = sorted(n for n in fns if torch_ops.registered(n) is not None)
res["unknown"] = hasattr(torch.ops.jitkern, "no_such_op")
res["module"] = torch.ops.jitkern.rms_norm.default.__module__
print(json.dumps(res))
"""


@pytest.mark.parametrize("mode", ["inline-hook", "wrapper"])
def test_lookup_registers_nothing_until_a_trace_or_torch_ops_asks(mode, tmp_path):
    """A fresh process: looking every built-in op up registers none (torch.library costs 1.5 ms an op
    that eager never uses); the first trace of a call registers that op, and compiles fullgraph;
    ``torch.ops.jitkern.<name>`` registers the op it names; an unknown name stays unknown."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "JITKERN_CACHE_DIR": str(tmp_path / "cache"), "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", LAZY_CHILD, mode.split("-")[0]], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["after_lookup"] == []
    assert res["graph_breaks"] == 0 and res["after_trace"] == ["rms_norm"]
    assert res["direct"] == "jitkern.gemm.default" and res["after_direct"] == ["gemm", "rms_norm"]
    assert res["unknown"] is False
    assert res["module"] == "torch._ops.jitkern"  # where Inductor's cache pickling looks the op up


def test_unschematizable_op_is_found_at_lookup(caplog):
    """What torch.library would refuse is found when the op is looked up, not at its first trace."""
    def f(x: torch.Tensor, table: dict) -> None:
        pass

    spec = _toy(f, mutates=("x",))
    with caplog.at_level(logging.WARNING, logger="jitkern"):
        assert torch_ops.op_function(spec) is f
    assert any("cannot infer a schema" in r.getMessage() for r in caplog.records)
    assert torch_ops.registered(spec.name) is None


# ---- the real op under torch.compile on the CPU (interpreter) -----------------------------------
def _block(norm, x, w, r):
    h = torch.nn.functional.silu(x)
    y = norm(h, w, residual=r)
    return norm(y * 2, w) + 1


def test_rms_norm_compiles_fullgraph_cpu():
    norm = jitkern.ops.rms_norm
    x, w, r = _rms_inputs("cpu")
    explained = torch._dynamo.explain(_block)(norm, x, w, r.clone())
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    r_eager, r_compiled = r.clone(), r.clone()
    want = _block(norm, x, w, r_eager)
    got = torch.compile(_block, fullgraph=True, backend="aot_eager")(norm, x, w, r_compiled)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(r_compiled, r_eager)  # the in-place residual update survives functionalization
    ref_r = r.clone()
    torch.testing.assert_close(want, _block(rn.reference, x, w, ref_r), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(r_eager, ref_r)


def _block_by_name(x, w, r):
    h = torch.nn.functional.silu(x)
    y = jitkern.ops.rms_norm(h, w, residual=r)
    return jitkern.ops.rms_norm(y * 2, w) + 1


def test_rms_norm_called_by_name_compiles_fullgraph_cpu():
    """The usual way a model calls an op: looked up by name inside the compiled function."""
    x, w, r = _rms_inputs("cpu")
    explained = torch._dynamo.explain(_block_by_name)(x, w, r.clone())
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    r_eager, r_compiled = r.clone(), r.clone()
    got = torch.compile(_block_by_name, fullgraph=True, backend="aot_eager")(x, w, r_compiled)
    torch.testing.assert_close(got, _block_by_name(x, w, r_eager))
    torch.testing.assert_close(r_compiled, r_eager)


def test_fake_tensor_trace_needs_no_kernel(cache_dir):
    """Tracing with fake tensors runs no kernel and builds nothing (the fake impl is shape-only)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    norm = jitkern.ops.rms_norm
    before = jitkern.stats()["compiles"]
    with FakeTensorMode():
        x, w = torch.empty(7, 64), torch.empty(64)
        out = torch.empty(7, 64)
        torch.ops.jitkern.rms_norm(x, w, 1e-6, None, out)
    assert jitkern.stats()["compiles"] == before
    assert not any(cache_dir.rglob("entry.json"))
    assert norm is jitkern.ops.rms_norm


# ---- GPU: Inductor, CUDA graphs, the direct launch -----------------------------------------------
@requires_gpu
def test_rms_norm_compiles_fullgraph_gpu_inductor():
    norm = jitkern.ops.rms_norm
    x, w, r = _rms_inputs("cuda", torch.bfloat16, rows=16, n=1024)
    r_eager, r_compiled = r.clone(), r.clone()
    want = _block(norm, x, w, r_eager)
    got = torch.compile(_block, fullgraph=True)(norm, x, w, r_compiled)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(r_compiled, r_eager)


def _graph_matches_eager(call, make_inputs):
    """Capture ``call(*inputs)`` in a CUDA graph, refill the inputs, replay: equal to eager on them."""
    static = make_inputs(0)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        call(*static)  # warm-up outside capture: loads the kernel, plans the signature
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        captured = call(*static)
    for seed in (1, 2):
        fresh = make_inputs(seed)
        for dst, src in zip(static, fresh):
            if isinstance(dst, torch.Tensor):
                dst.copy_(src)
        g.replay()
        torch.cuda.synchronize()
        want = call(*fresh)
        torch.testing.assert_close(captured, want)
        for a, b in zip(static, fresh):  # in-place effects too
            if isinstance(a, torch.Tensor):
                torch.testing.assert_close(a, b)


@requires_gpu
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_cuda_graph_replay_matches_eager(residual):
    norm = jitkern.ops.rms_norm

    def make(seed):
        g = torch.Generator(device="cpu").manual_seed(seed)
        x = torch.randn(8, 2048, generator=g).to("cuda", torch.bfloat16)
        w = torch.randn(2048, generator=g).to("cuda", torch.bfloat16)
        r = torch.randn(8, 2048, generator=g).to("cuda", torch.bfloat16) if residual else None
        return x, w, r

    _graph_matches_eager(lambda x, w, r: norm(x, w, residual=r), make)


@requires_gpu
def test_gemm_cuda_graph_replay_matches_eager():
    gemm = jitkern.ops.gemm

    def make(seed):
        g = torch.Generator(device="cpu").manual_seed(seed)
        return (torch.randn(64, 256, generator=g).to("cuda", torch.bfloat16),
                torch.randn(256, 128, generator=g).to("cuda", torch.bfloat16))

    _graph_matches_eager(gemm, make)


@requires_gpu
def test_qk_norm_rope_cuda_graph_replay_matches_eager():
    from jitkern.library.qk_norm_rope import cos_sin_table

    op = jitkern.ops.qk_norm_rope
    hq, hkv, d, t = 4, 2, 128, 16
    cs = cos_sin_table(256, d, device="cuda")

    def make(seed):
        g = torch.Generator(device="cpu").manual_seed(seed)
        qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=g).to("cuda", torch.bfloat16)
        qw = torch.randn(d, generator=g).to("cuda", torch.bfloat16)
        kw = torch.randn(d, generator=g).to("cuda", torch.bfloat16)
        pos = torch.randint(0, 256, (t,), generator=g).to("cuda")
        return qkv, qw, kw, cs, pos

    _graph_matches_eager(lambda qkv, qw, kw, c, p: op(qkv, qw, kw, c, p, hq, hkv, d), make)


@requires_gpu
def test_ops_compile_fullgraph_gpu_with_cudagraphs():
    """gemm + rms_norm + qk_norm_rope in one compiled function, Inductor with CUDA graphs."""
    from jitkern.library.qk_norm_rope import cos_sin_table

    hq, hkv, d, t = 4, 2, 64, 8
    cs = cos_sin_table(64, d, device="cuda")

    def f(x, w_qkv, nw, qw, kw, pos, r):
        h = jitkern.ops.rms_norm(x, nw, residual=r)
        qkv = jitkern.ops.gemm(h, w_qkv)
        return jitkern.ops.qk_norm_rope(qkv, qw, kw, cs, pos, hq, hkv, d)

    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(t, 256, generator=g).to("cuda", torch.bfloat16)
    w_qkv = (torch.randn(256, (hq + 2 * hkv) * d, generator=g) / 16).to("cuda", torch.bfloat16)
    nw, qw, kw = (torch.randn(n, generator=g).to("cuda", torch.bfloat16) for n in (256, d, d))
    pos = torch.randint(0, 64, (t,), generator=g).to("cuda")
    r = torch.randn(t, 256, generator=g).to("cuda", torch.bfloat16)
    assert torch._dynamo.explain(f)(x, w_qkv, nw, qw, kw, pos, r.clone()).graph_break_count == 0
    compiled = torch.compile(f, fullgraph=True, mode="reduce-overhead")
    for _ in range(3):  # recorded, then replayed from the CUDA graph
        r1, r2 = r.clone(), r.clone()
        torch.testing.assert_close(compiled(x, w_qkv, nw, qw, kw, pos, r1), f(x, w_qkv, nw, qw, kw, pos, r2))
        torch.testing.assert_close(r1, r2)


@requires_gpu
def test_fast_path_keeps_validation_on():
    """Same signature, misaligned address: the per-signature plan still checks what can change."""
    norm = jitkern.ops.rms_norm
    base = torch.randn(4 * 256 + 8, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(256, device="cuda", dtype=torch.bfloat16)
    x = base[:1024].view(4, 256)
    torch.testing.assert_close(norm(x, w), rn.reference(x, w), atol=2e-2, rtol=2e-2)
    shifted = base[1:1025].view(4, 256)  # same shape, strides, dtype, device; 2-byte offset
    with pytest.raises(LayoutError, match="aligned"):
        norm(shifted, w)
    with pytest.raises(Exception, match="dtype"):
        norm(x.float(), w)
