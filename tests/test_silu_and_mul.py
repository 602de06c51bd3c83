"""silu_and_mul: the SwiGLU gate of a fused gate/up projection, one Triton kernel, against torch's
silu * up under Triton's interpreter (views, leading dims, given outputs, bad arguments); on a GPU at
an MLP's size."""
import pytest
import torch

import jitkern
from conftest import requires_gpu
from jitkern.errors import DTypeError, LayoutError, ShapeError
from jitkern.library import silu_and_mul as sm


def _tol(dtype):
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}


@pytest.mark.parametrize("shape,dtype", [
    ((5, 64), torch.float32),
    ((3, 7, 600), torch.bfloat16),      # leading dims; D=300, not a multiple of the block
    ((2, 2 * 2048 + 2), torch.float16),  # D wider than the widest block: several programs per row
    ((1, 8), torch.float32),
])
def test_matches_torch(shape, dtype):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    got = jitkern.ops.silu_and_mul(x)
    want = torch.nn.functional.silu(x[..., : shape[-1] // 2].float()) * x[..., shape[-1] // 2:].float()
    assert got.shape == (*shape[:-1], shape[-1] // 2) and got.dtype == dtype
    torch.testing.assert_close(got.float(), want, **_tol(dtype))


def test_row_view_and_given_out():
    big = torch.randn(6, 400)
    x = big[:, :192]  # rows 400 apart
    out = torch.full((6, 96), 7.0)
    got = jitkern.ops.silu_and_mul(x, out=out)
    assert got is out
    torch.testing.assert_close(out, sm.reference(x))


def test_no_rows_is_no_launch(launches):
    y = jitkern.ops.silu_and_mul(torch.randn(0, 8))
    assert y.shape == (0, 4) and launches == []


def test_bad_arguments():
    with pytest.raises(ShapeError, match="even"):
        jitkern.ops.silu_and_mul(torch.randn(4, 7))
    with pytest.raises(DTypeError):
        jitkern.ops.silu_and_mul(torch.randn(4, 8).to(torch.int32))
    with pytest.raises(ShapeError):
        jitkern.ops.silu_and_mul(torch.randn(4, 8), out=torch.empty(4, 8))
    with pytest.raises(LayoutError):
        jitkern.ops.silu_and_mul(torch.randn(8, 4).t())


@requires_gpu
def test_mlp_size_on_gpu():
    x = torch.randn(128, 2 * 12288, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(jitkern.ops.silu_and_mul(x).float(), sm.reference(x).float(), atol=2e-2, rtol=2e-2)
