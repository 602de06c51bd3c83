"""Redzone debug mode: a deliberately unmasked kernel is caught (CPU interpreter here; the same
tests run on the H100), naming op, variant, buffer and offset; off by default; in-bounds kernels
pass and give identical results; a caller's out= is shadowed and written back."""
import pytest
import torch

import jitkern
from conftest import requires_gpu
from jitkern import redzone, runtime
from jitkern.contracts import Buffer, Contract
from jitkern.errors import RedzoneError
from jitkern.spec import Arg, Config, OpSpec, Variant

# A copy kernel whose last block stores BLOCK elements with no mask when "masked" is false, and
# that can write one element before the start ("underflow").
TEMPLATE = """
import triton
import triton.language as tl


@triton.jit
def copy_kernel(x_ptr, out_ptr, n):
    offs = tl.program_id(0) * {{ block }} + tl.arange(0, {{ block }})
    v = tl.load(x_ptr + offs, mask=offs < n, other=-1.0)
{% if underflow %}
    tl.store(out_ptr + offs - 1, v, mask=offs < n)
{% elif masked %}
    tl.store(out_ptr + offs, v, mask=offs < n)
{% else %}
    tl.store(out_ptr + offs, v)
{% endif %}
"""
BLOCK = 64
CONTRACT = Contract("redzone_copy", (Buffer("out", lambda d: (d.n,), torch.float32),))


@pytest.fixture
def copy_spec(tmp_path):
    (tmp_path / "copy.py.j2").write_text(TEMPLATE)

    def copy(x, out=None, masked=True, underflow=False):
        bufs = CONTRACT.prepare(x.device, dict(n=x.numel()), out=out)
        if x.numel() == 0:
            return bufs.result("out")
        k = runtime.kernel(spec, Config.make("v1", block=BLOCK, masked=masked, underflow=underflow, num_warps=4),
                           x.device)
        k[(-(-x.numel() // BLOCK),)](x, bufs["out"], x.numel())
        bufs.finish(k)
        return bufs.result("out")

    spec = OpSpec(name="redzone_copy", template_dir=tmp_path, fn=copy, reference=lambda x, out=None: x.clone(),
                  configs=lambda arch: [],
                  variants=(Variant("v1", "copy.py.j2", "copy_kernel",
                                    (Arg("x_ptr", "*fp32"), Arg("out_ptr", "*fp32"), Arg("n", "i32"))),))
    return copy


@pytest.fixture
def rz(monkeypatch):
    monkeypatch.setenv("JITKERN_DEBUG", "redzone")


def _unmasked_is_caught(copy, device):
    x = torch.arange(100, dtype=torch.float32, device=device)  # 100 = 64 + 36: 28 elements too many
    with pytest.raises(RedzoneError) as e:
        copy(x, masked=False)
    err = e.value
    assert (err.op, err.buffer, err.offset, err.row) == ("redzone_copy", "out", 0, None)
    assert "v1(" in err.variant and "masked=False" in err.variant
    msg = str(err)
    assert "redzone_copy" in msg and "'out'" in msg and "offset +0 past the end of the buffer (400 bytes)" in msg


def test_unmasked_store_is_caught_cpu(copy_spec, rz):
    _unmasked_is_caught(copy_spec, "cpu")


def test_store_before_start_is_caught(copy_spec, rz):
    with pytest.raises(RedzoneError, match="offset -4, before the start") as e:
        copy_spec(torch.ones(10), underflow=True)
    assert e.value.offset == -4


def test_masked_kernel_passes_and_matches_off_mode(copy_spec, rz, monkeypatch):
    x = torch.randn(100)
    y = copy_spec(x)
    assert torch.equal(y, x)
    monkeypatch.delenv("JITKERN_DEBUG")
    assert torch.equal(copy_spec(x), y)


def test_callers_out_is_shadowed_and_written_back(copy_spec, rz):
    x = torch.randn(100)
    out = torch.zeros(100)
    assert copy_spec(x, out=out) is out
    assert torch.equal(out, x)
    # a hit leaves the caller's buffer untouched (the damage happened in the shadow)
    out2 = torch.zeros(100)
    with pytest.raises(RedzoneError):
        copy_spec(x, out=out2, masked=False)
    assert torch.equal(out2, torch.zeros(100))


def test_off_by_default_costs_no_guard(copy_spec, monkeypatch):
    monkeypatch.delenv("JITKERN_DEBUG", raising=False)
    x = torch.randn(100)
    y = copy_spec(x)
    assert torch.equal(y, x) and y.untyped_storage().nbytes() == 400


def test_seed001_unmasked_logits_rows_caught_at_full_context(rz, monkeypatch):
    """paged_mqa_logits with its row-end store masks removed (the seed-001 bug) at
    context_len == max_model_len: the overflow into the next row is caught, naming the row."""
    from jitkern.library import paged_mqa_logits as mqa

    torch.manual_seed(0)
    b, nn, h, d, page, max_len = 2, 1, 16, 64, 16, 40  # 40 = 2.5 tiles of 16
    q = torch.randn(b, nn, h, d, dtype=torch.bfloat16)
    kv = torch.randn(6, page, d, dtype=torch.bfloat16)
    w = torch.rand(b * nn, h)
    bt = torch.arange(6, dtype=torch.int32).view(2, 3)
    lens = torch.tensor([max_len, max_len], dtype=torch.int32)
    ok = mqa.paged_mqa_logits(q, kv, w, lens, bt, max_len)  # masked: passes
    assert torch.allclose(ok, mqa.reference(q.float(), kv.float(), w, lens, bt, max_len), rtol=1e-4, atol=1e-3)
    monkeypatch.setattr(mqa, "MASK_STORES", False)
    jitkern.reset()  # the plan reads MASK_STORES once per signature
    with pytest.raises(RedzoneError) as e:
        mqa.paged_mqa_logits(q, kv, w, lens, bt, max_len)
    assert e.value.op == "paged_mqa_logits" and e.value.buffer == "out"
    assert e.value.row == 0 and e.value.offset == 0 and "mask_stores=False" in e.value.variant


def test_sentinel_band_sizes():
    assert redzone.GUARD_BYTES >= 512  # seed 001 overshot by up to 512 B
    assert redzone.GUARD_BYTES % 256 == 0  # keeps the body as aligned as the allocation


@requires_gpu
def test_unmasked_store_is_caught_gpu(copy_spec, rz):
    _unmasked_is_caught(copy_spec, "cuda")


@requires_gpu
def test_seed001_unmasked_logits_caught_gpu(rz, monkeypatch):
    from jitkern.library import paged_mqa_logits as mqa

    b, nn, h, d, page, max_len = 4, 2, 64, 128, 64, 1000  # 1000 = 15.6 tiles of 64
    q = torch.randn(b, nn, h, d, dtype=torch.bfloat16, device="cuda")
    kv = torch.randn(b * 16, page, d, dtype=torch.bfloat16, device="cuda")
    w = torch.rand(b * nn, h, device="cuda")
    bt = torch.arange(b * 16, dtype=torch.int32, device="cuda").view(b, 16)
    lens = torch.full((b,), max_len, dtype=torch.int32, device="cuda")
    ref = mqa.reference(q, kv, w, lens, bt, max_len)
    ok = mqa.paged_mqa_logits(q, kv, w, lens, bt, max_len)
    torch.testing.assert_close(ok, ref, rtol=2e-2, atol=2e-1)
    monkeypatch.setattr(mqa, "MASK_STORES", False)
    jitkern.reset()  # the plan reads MASK_STORES once per signature
    with pytest.raises(RedzoneError) as e:
        mqa.paged_mqa_logits(q, kv, w, lens, bt, max_len)
    assert e.value.buffer == "out" and e.value.row is not None and e.value.offset == 0
