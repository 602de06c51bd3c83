"""The C hot path (jitkern/fastcall.c) against the Python one, with the real C extension built here.

On the CPU, ops run through Triton's interpreter, which takes tensors, so the C path never runs by
itself. These tests put a recording "direct" kernel in front of each loaded interpreter kernel: the
Python path records what it would pass to Triton's C launch, the C path calls the recorder as that
launch. The two must pass the same arguments for every call (grid, stream, function, constants,
addresses, converted scalars), raise the same errors, and share one memo. On a GPU the same path
launches for real (tests marked gpu, and every GPU test of an op)."""
import ctypes
import math
import struct
import sys
from pathlib import Path

import pytest
import torch

from conftest import requires_gpu
import jitkern
from jitkern import fallback, fastcall
from jitkern.builders.base import DirectLaunch
from jitkern.errors import ArgumentError, LayoutError
from jitkern.library import paged_attention_decode as pa
from jitkern.library import rms_norm as rn

STREAM, FUNCTION, FIXED = 0x5EA, 0xF00, (False, True, None, None, (4, 1, 0), None, None, None)


@pytest.fixture(scope="module")
def fc():
    m = fastcall.module()
    assert m is not None, "the C extension must build on the test machine (gcc and Python headers)"
    return m


class _Recording:
    """A loaded kernel as the GPU launcher makes it, launching into ``calls``."""

    takes_addresses = True
    direct = None

    def __init__(self, real, calls, with_c):
        self.key, self.name, self.job = real.key, real.name, real.job
        self._calls = calls
        if with_c:
            self.direct = DirectLaunch("triton", FUNCTION, lambda device: STREAM, 0,
                                       (lambda *a: calls.append(a), FIXED))

    def run(self, gx, gy, gz, *args):  # the Python path: what run_direct would hand to the C launch
        if gx > 0 and gy > 0 and gz > 0:
            self._calls.append((gx, gy, gz, STREAM, FUNCTION, *FIXED, *args))


@pytest.fixture(scope="module")
def torchsig_api(fc):
    """The C++ tensor reader's capsule (built here once per machine: about 25 s)."""
    assert fastcall.use_torch_signatures(wait=True), "torchsig.cpp must build against the installed torch"
    return sys.modules["jitkern_torchsig"].api


@pytest.fixture(params=["python_attributes", "torchsig"])
def reader(request, fc, torchsig_api):
    """The C path reading tensors through Python attributes, then through the C++ reader."""
    fc.use_torch(torchsig_api if request.param == "torchsig" else None)
    yield request.param
    fc.use_torch(torchsig_api)


@pytest.fixture
def recorded(monkeypatch, fc):
    """``run(with_c, fn)``: fn() with every kernel loaded through a recording direct kernel; returns the
    launches recorded."""
    real = fallback.runtime.kernel

    def run(with_c, fn):
        calls = []
        monkeypatch.setenv("JITKERN_FAST_CALL", "1" if with_c else "0")
        monkeypatch.setattr(fallback.runtime, "kernel", lambda *a, **k: _Recording(real(*a, **k), calls, with_c))
        jitkern.reset()
        try:
            fn()
        finally:
            monkeypatch.setattr(fallback.runtime, "kernel", real)
        return calls
    return run


_X, _R, _W, _OUT = torch.randn(4, 256), torch.randn(4, 256), torch.ones(256), torch.empty(4, 256)


def _rms_calls():
    x, r, w, out = _X, _R, _W, _OUT
    for eps in (1e-6, 1e-5, 1, True):  # float, float, an int and a bool (converted by the Python check)
        rn.rms_norm(x, w, eps=eps, out=out)
        rn.rms_norm(x, w, eps=eps, residual=r, out=out)
    rn.rms_norm(x[:2], w, out=out[:2])  # a second signature, then the first again
    rn.rms_norm(x, w, out=out)


def test_c_path_launches_what_the_python_path_launches(recorded, fc, reader):
    py = recorded(False, _rms_calls)
    c = recorded(True, _rms_calls)
    assert len(py) == 10 and c == py
    d = jitkern.dispatcher(rn.SPEC)
    assert isinstance(d._call, fc.Dispatch)  # the memo is served from C now
    assert [type(v).__name__ for v in d._memo.values()] == ["Fire"] * 3
    eps = [a[-1] for a in c[:8:2]]
    assert eps == [1e-6, 1e-5, 1.0, 1.0] and all(type(e) is float for e in eps)


def _pa_case(lens):
    """paged_attention_decode inputs: 2 sequences of ``lens`` tokens, 4 heads over 2 KV heads, pages of 16."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 64, generator=g).bfloat16()
    k = torch.randn(12, 16, 2, 64, generator=g).bfloat16()
    v = torch.randn(12, 16, 2, 64, generator=g).bfloat16()
    bt = torch.randint(0, 12, (2, 4), generator=g, dtype=torch.int32)
    return q, k, v, bt, torch.tensor(lens, dtype=torch.int32), torch.empty(2, 4, 64, dtype=torch.bfloat16)


def test_two_launches_and_per_call_scratch(recorded, reader):
    """paged_attention_decode: a partition kernel and a combine kernel, and a workspace the
    framework allocates for each call (its address is new each call, so compare all but that)."""
    q, k, v, bt, lens, out = _pa_case([40, 7])

    def calls():
        for _ in range(2):
            pa.paged_attention_decode(q, k, v, bt, lens, out=out)

    py, c = recorded(False, calls), recorded(True, calls)
    assert len(py) == len(c) == 4
    addresses = {t.data_ptr() for t in (q, k, v, bt, lens, out)}

    def without_scratch(launch):
        return tuple(a for a in launch if not (isinstance(a, int) and a > 1 << 20 and a not in addresses))
    assert [without_scratch(x) for x in c] == [without_scratch(x) for x in py]
    assert len(without_scratch(c[0])) < len(c[0])  # the workspace was passed, and left out above


def test_one_partition_allocates_no_workspace(recorded):
    """paged_attention_decode over one partition: one kernel writes the output itself, and the
    call passes only the caller's tensors (no workspace is allocated per call)."""
    q, k, v, bt, lens, out = _pa_case([16, 7])

    def calls():
        for _ in range(2):
            pa.paged_attention_decode(q, k, v, bt, lens, max_context_len=16, out=out)
    py, c = recorded(False, calls), recorded(True, calls)
    assert len(py) == len(c) == 2 and c == py
    addresses = {t.data_ptr() for t in (q, k, v, bt, lens, out)}
    assert all(a in addresses for a in c[0] if isinstance(a, int) and a > 1 << 20)
    jitkern.reset()  # the memo holds the recording kernels: decide again with the real ones
    want = pa.reference(q, k, v, bt, lens, 1.0 / 8)
    torch.testing.assert_close(pa.paged_attention_decode(q, k, v, bt, lens, max_context_len=16).float(),
                               want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("eps, error", [(float("nan"), ArgumentError), (-1.0, ArgumentError),
                                        (math.inf, ArgumentError), ("x", ArgumentError)])
def test_c_path_rejects_bad_scalars_like_the_python_path(recorded, eps, error):
    x, w, out = torch.randn(4, 256), torch.ones(256), torch.empty(4, 256)

    def calls():
        rn.rms_norm(x, w, out=out)
        with pytest.raises(error, match="eps"):
            rn.rms_norm(x, w, eps=eps, out=out)
    assert len(recorded(True, calls)) == 1


def test_c_path_rejects_misaligned_tensors(recorded, reader):
    x, w = torch.randn(4, 257), torch.ones(256)

    def calls():
        rn.rms_norm(x[:, :256].contiguous(), w)  # decided on an aligned tensor
        shifted = torch.randn(4 * 256 + 1)[1:].view(4, 256)  # same signature, address off by 4 bytes
        with pytest.raises(LayoutError, match="16-byte aligned"):
            rn.rms_norm(shifted, w, out=torch.empty(4, 256))
    assert len(recorded(True, calls)) == 1


def test_c_key_is_the_python_key(fc):
    d = jitkern.dispatcher(rn.SPEC)
    c = fc.Dispatch(d.tensors, d._static, {}, lambda args: None)
    x = torch.randn(4, 256)
    for args in [(x, torch.ones(256), 1e-6, None, None), (x.t(), torch.ones(4), 0.5, x, torch.empty(256, 4)),
                 (x.bfloat16(), torch.ones(256).bfloat16(), 1e-6, None, None)]:
        assert c.key(args) == d.key(args) and hash(c.key(args)) == hash(d.key(args))


def _python_key(args, tensors=(0, 1), statics=(2,)):
    return (*[None if args[i] is None else (type(args[i]), args[i].shape, args[i].stride(), args[i].dtype,
                                             args[i].device) for i in tensors], *[args[i] for i in statics])


def test_torchsig_key_tells_apart_what_the_python_key_does(fc, torchsig_api):
    """The compact key read in C++ is equal for two calls exactly when the Python key is."""
    fc.use_torch(torchsig_api)
    d = fc.Dispatch((0, 1), (2,), {}, lambda args: None, {})

    class Sub(torch.Tensor):
        pass

    x = torch.randn(4, 8)
    w = torch.nn.Parameter(torch.randn(8))
    calls = [(x, w, 3), (torch.randn(4, 8), w.detach().clone().requires_grad_(True), 3), (x, w.detach(), 3),
             (x, w, 4), (x, w, "s"), (x.t(), w, 3), (x.t().contiguous(), w, 3), (x[:, :4], w, 3),
             (x.reshape(32), w, 3), (x.reshape(2, 2, 8), w, 3), (x.half(), w, 3), (x, None, 3), (None, None, 3),
             (x.unsqueeze(0), w, 3), (torch.empty(0, 8), w, 3), (torch.empty(4, 8, device="meta"), w, 3),
             (torch.tensor(1.0), w, 3), (x.expand(2, 4, 8), w, 3), (x.as_strided((4, 8), (1, 4)), w, 3)]
    keys = [fc.compact_key(d, a) for a in calls]
    assert all(k is not None for k in keys)
    for a, ka in zip(calls, keys):
        for b, kb in zip(calls, keys):
            assert (ka == kb) == (_python_key(a) == _python_key(b)), (a, b)
    # not plain tensors: the Python key serves (None), and the data pointer is read the Python way
    assert fc.compact_key(d, (x.as_subclass(Sub), w, 3)) is None
    assert fc.compact_key(d, (x.to_sparse(), w, 3)) is None
    assert fc.compact_key(d, ("x", w, 3)) is None


def test_torchsig_cache_follows_the_memo(fc, torchsig_api):
    """The C path's compact-key cache is emptied whenever the memo changes, so a replaced decision
    runs at once; arguments it cannot read take the Python key."""
    from jitkern.dispatch import _Memo

    fc.use_torch(torchsig_api)
    memo, slow = _Memo(), []
    d = fc.Dispatch((0, 1), (2,), memo, lambda args: slow.append(args) or "slow", memo.fast)
    x, w = torch.randn(4, 8), torch.randn(8)
    assert d((x, w, 3)) == "slow" and not memo.fast
    memo[_python_key((x, w, 3))] = lambda args: "first"
    assert d((x, w, 3)) == "first" and len(memo.fast) == 1
    assert d((torch.randn(4, 8), torch.randn(8), 3)) == "first" and len(memo.fast) == 1  # same signature
    memo[_python_key((x, w, 3))] = lambda args: "second"
    assert not memo.fast and d((x, w, 3)) == "second"
    assert d((x, w, [1])) == "slow"  # unhashable static: neither key serves
    memo.clear()
    assert not memo.fast and d((x, w, 3)) == "slow"
    with pytest.raises(TypeError):
        memo.pop(1, None)


def test_torchsig_is_not_compiled_in_strict_mode(fc, torchsig_api, tmp_path, monkeypatch, caplog):
    """JITKERN_STRICT: the C++ reader is loaded where it is built, never compiled; the C path then
    reads Python attributes, with one warning that says why."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # no private build of this machine
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("JITKERN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("JITKERN_STRICT", "1")
    jitkern.reset()
    monkeypatch.setattr(fastcall, "_torch_state", None)
    try:
        assert fastcall.use_torch_signatures(wait=True) is False
        assert "JITKERN_STRICT is set" in caplog.text
        assert not list((tmp_path / "cache").rglob(f"*{fastcall.TORCH_NAME}*"))
    finally:
        fc.use_torch(torchsig_api)
        monkeypatch.setattr(fastcall, "_torch_state", "ready")


def test_c_dispatch_routes_unknown_and_unkeyable_calls_to_the_slow_path(fc):
    seen = []
    memo = {}
    c = fc.Dispatch((0,), (1,), memo, lambda args: seen.append(args) or "slow")
    t = torch.zeros(3)
    assert c((t, 4)) == "slow" and c(("not a tensor", 4)) == "slow" and c((t, [1])) == "slow"  # unhashable
    assert c((t,)) == "slow"  # too few arguments
    memo[(None, 4)] = None
    assert c((None, 4)) is None  # nothing to launch
    memo[((type(t), t.shape, t.stride(), t.dtype, t.device), 4)] = lambda args: "python route"
    assert c((t, 4)) == "python route"
    assert len(seen) == 4


def test_fast_call_off_keeps_python(recorded):
    recorded(False, _rms_calls)
    d = jitkern.dispatcher(rn.SPEC)
    assert d._call == d._call_python


def test_reset_returns_to_python_path(recorded, fc):
    recorded(True, _rms_calls)
    d = jitkern.dispatcher(rn.SPEC)
    assert isinstance(d._call, fc.Dispatch)
    jitkern.reset()
    assert d._call == d._call_python and not d._memo


def test_fire_objects_are_collected(fc):
    import gc
    import weakref

    class Marker:
        pass

    m = Marker()
    ref = weakref.ref(m)
    launch = ("triton", (1, 1, 1), lambda dev: 0, 0, 0, [("c", m)], lambda a: None, lambda a: (), lambda *a: None, ())
    fire = fc.Fire("x", [launch], None)
    assert fire(()) == "x"
    del m, fire, launch
    gc.collect()
    assert ref() is None


# ---- the driver launch of C++ kernels (cuLaunchKernel / hipModuleLaunchKernel) ------------------
_LAUNCH_T = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, *[ctypes.c_uint] * 7, ctypes.c_void_p,
                             ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)


def _fake_driver(record, rc=0):
    """A C function of cuLaunchKernel's signature recording (function, grid, block, shared, stream,
    every parameter's 8 bytes)."""
    nparams = []

    def launch(f, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        record.append((f, (gx, gy, gz), (bx, by, bz), shared, stream,
                       [ctypes.string_at(params[i], 8) for i in range(nparams[0])]))
        return rc
    return _LAUNCH_T(launch), nparams


def _device_kernel(sigs, api):
    from jitkern.builders.cpp import DeviceKernel

    k = DeviceKernel.__new__(DeviceKernel)  # what __init__ sets after loading the binary on a GPU
    k.name, k._function, k._device, k._stream = "fake/cuda", 0xF00D, 0, lambda device: 0x5EA
    k._bind(sigs, (128, 2, 1), api)
    return k


SIGS = ["*bf16", "*fp32", "i32", "i64", "fp32", "fp64", "i8", "u16", "u32", "u64", "i1"]
VALUES = [0x7F00, 0x8F00, -5, 1 << 40, 0.1, 1 / 3, -3, 65535, 1 << 31, (1 << 64) - 1, 1]


def test_driver_launch_packs_what_the_python_path_packs(fc):
    py_rec, c_rec = [], []
    api_py, n_py = _fake_driver(py_rec)
    api_c, n_c = _fake_driver(c_rec)
    n_py.append(len(SIGS))
    n_c.append(len(SIGS))
    k_py, k_c = _device_kernel(SIGS, api_py), _device_kernel(SIGS, api_c)
    k_py.run(3, 2, 1, *VALUES)
    d = k_c.direct
    slots = [("c", v) for v in VALUES]
    fire = fc.Fire("cuda", [(d.how, (3, 2, 1), d.stream, d.device, d.function, slots, None, None, *d.extra)], None)
    assert d.extra[-2:] == ((), None)  # no trailing constants, no scratch for C++ kernels
    assert fire(()) == "cuda"
    assert len(py_rec) == len(c_rec) == 1 and c_rec == py_rec
    f, grid, block, shared, stream, params = c_rec[0]
    assert (f, grid, block, shared, stream) == (0xF00D, (3, 2, 1), (128, 2, 1), 0, 0x5EA)
    assert params[2] == struct.pack("<i4x", -5) and params[4] == struct.pack("<f4x", 0.1)


def test_driver_launch_error_raises_launch_error(fc):
    from jitkern.errors import LaunchError

    rec = []
    api, n = _fake_driver(rec, rc=700)
    n.append(1)
    d = _device_kernel(["*fp32"], api).direct
    fire = fc.Fire("cuda", [(d.how, (1, 1, 1), d.stream, d.device, d.function, [("c", 0x100)], None, None,
                             *d.extra)], None)
    with pytest.raises(LaunchError, match="driver error 700"):
        fire(())
    assert len(rec) == 1


# ---- on a GPU: every op gives the same results through the C path as through the Python path -----
@requires_gpu
def test_gpu_every_op_gives_the_same_results_through_the_c_path(monkeypatch):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from bench_runtime import op_cases

    results = {}
    fc = fastcall.module()
    for fast in ("0", "1"):
        monkeypatch.setenv("JITKERN_FAST_CALL", fast)
        jitkern.reset()
        cases, specs = op_cases("cuda")  # seeded: the same inputs both times
        results[fast] = {name: [fn().clone() for _ in range(2)] for name, fn in cases.items()}
        torch.cuda.synchronize()
        for name in cases:
            d = jitkern.dispatcher(specs[name])
            assert isinstance(d._call, fc.Dispatch) == (fast == "1"), name
            if fast == "1":
                assert any(type(v).__name__ == "Fire" for v in d._memo.values()), name
    for name, got in results["1"].items():
        for a, b in zip(results["0"][name], got):
            assert torch.equal(a, b), name


def test_driver_launch_packs_half_floats_and_trailing_scratch(fc):
    """Triton kernels through the driver: fp16 as IEEE half, bf16 as the top half of the fp32 bits (as
    Triton's launcher packs them), then the trailing scratch pointers, the first one a buffer made per
    launch (grid size x bytes per program)."""
    rec, made = [], []
    api, n = _fake_driver(rec)
    n.append(4)

    def alloc(nbytes):
        made.append(torch.empty(nbytes, dtype=torch.uint8))
        return made[-1]
    launch = ("driver", (2, 3, 1), lambda device: 7, 0, 0xF00D, [("c", 1.5), ("c", 1.0 / 3)], None, None,
              ctypes.cast(api, ctypes.c_void_p).value, (128, 1, 1), 1024, "egPP", None, (0, 0), (96, alloc))
    fire = fc.Fire("triton", [launch], None)
    assert fire(()) == "triton" and fire(()) == "triton"
    assert [t.numel() for t in made] == [6 * 96, 6 * 96]
    (f, grid, block, shared, stream, params), second = rec
    assert (f, grid, block, shared, stream) == (0xF00D, (2, 3, 1), (128, 1, 1), 1024, 7)
    bf16 = (struct.unpack("<I", struct.pack("<f", 1.0 / 3))[0] >> 16).to_bytes(2, "little")
    assert params[0][:2] == struct.pack("<e", 1.5) and params[1][:2] == bf16
    assert params[2] == struct.pack("<Q", made[0].data_ptr()) and params[3] == bytes(8)
    assert second[5][2] == struct.pack("<Q", made[1].data_ptr())


@pytest.mark.parametrize("op", ["rms_norm", "gemm_tma"])
def test_driver_codes_of_real_sm90_entries(op):
    """What the driver path would pack for real sm_90 cross-compiles: the kernel's arguments by type
    and Triton's two scratch pointers; a Hopper gemm tile's device-made TMA descriptors need global
    scratch, which the driver path allocates per launch."""
    import json

    from jitkern import arch
    from jitkern.binaries import METADATA_FILE
    from jitkern.build import get_entry
    from jitkern.launcher import driver_codes
    from jitkern.library import gemm
    from jitkern.plan import plan

    a = arch.get("sm_90")
    if op == "rms_norm":
        job = plan(rn.SPEC, rn.config("bf16", True, True, 1024, True), a)
    else:
        tile = dict(gemm.HOPPER_CANDIDATES["large"][0])
        job = plan(gemm.SPEC, gemm.config("bf16", True, True, tile), a)
    entry, _ = get_entry(job)
    fields = json.loads(entry.read_bytes(METADATA_FILE))
    codes = driver_codes(job, fields)
    want = "".join("P" if t.startswith("*") else {"i32": "i", "i64": "q", "fp32": "f"}[t]
                   for t in job.signature.values()) + "PP"
    assert codes == want
    assert (fields["global_scratch_size"] > 0) == (op == "gemm_tma")


_WARM_CHILD = """
import sys, torch, jitkern
from jitkern.library import moe_gemm_stage1 as moe
dev, bf = "cuda", torch.bfloat16
torch.manual_seed(0)
x, w = torch.randn(4, 256, device=dev, dtype=bf), torch.ones(256, device=dev, dtype=bf)
a, b = torch.randn(128, 256, device=dev, dtype=bf), torch.randn(512, 256, device=dev, dtype=bf)
qkv = torch.randn(3, 6 * 128, device=dev, dtype=bf)
one = torch.ones(128, device=dev, dtype=bf)
cs, pos = torch.randn(16, 128, device=dev), torch.arange(3, device=dev)
outs = [jitkern.ops.rms_norm(x, w), jitkern.ops.gemm(a, b.t()),
        jitkern.ops.qk_norm_rope(qkv, one, one, cs, pos, 4, 1, 128)]
torch.cuda.synchronize()
print(sum(float(o.float().sum()) for o in outs), "triton" in sys.modules, jitkern.stats()["compiles"])
"""


@requires_gpu
def test_gpu_a_warm_process_never_imports_triton(tmp_path):
    """All kernels cached (a Triton gemm tile with TMA descriptors, a CUDA C++ variant, a plain Triton
    kernel): a fresh process loads and launches them through the CUDA driver without importing Triton."""
    import os
    import subprocess

    env = {**os.environ, "JITKERN_CACHE_DIR": str(tmp_path / "cache"), "TRITON_CACHE_DIR": str(tmp_path / "tc")}
    env.pop("TRITON_INTERPRET", None)
    runs = [subprocess.run([sys.executable, "-c", _WARM_CHILD], env=env, capture_output=True, text=True, timeout=600)
            for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
    cold, warm = (r.stdout.split() for r in runs)
    assert cold[0] == warm[0]  # the same results
    assert warm[1:] == ["False", "0"], (cold, warm)


def test_prebuild_ships_the_host_module_and_a_later_layer_serves_it(tmp_path):
    """``jitkern prebuild`` for a CUDA arch builds the extension into the layer it fills; a process
    whose own writable layer is empty finds it there and builds nothing."""
    import os
    import subprocess

    from jitkern import arch, prebuild

    layer, fresh = tmp_path / "layer", tmp_path / "fresh"
    res = prebuild.prebuild(ops=["rms_norm"], arches=[arch.get("sm_90")], cache_dir=str(layer), limit=1)
    assert not res.summary.get("failed")
    shipped = list(layer.rglob(f"host/{fastcall.artifact_name()}"))
    assert len(shipped) == 1
    assert len(list(layer.rglob(f"host/{fastcall.torch_artifact_name()}"))) == 1  # and the C++ tensor reader
    env = {**os.environ, "JITKERN_CACHE_DIR": f"{fresh}{os.pathsep}{layer}"}
    r = subprocess.run([sys.executable, "-c", "import jitkern.fastcall as f; print(f.module().__file__)"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(shipped[0]) and not list(fresh.rglob("host/*"))
