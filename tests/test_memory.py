"""Huge-page-backed CPU upcasts and subtraction: the same values as torch's own, for every layout."""

import pytest
import torch

from opd_dynamics.numerics import HUGE_BYTES, subtract, upcast


@pytest.mark.parametrize("rows", [8, 2048])  # 8x300 stays with torch; 2048x300 is over HUGE_BYTES in float32
@pytest.mark.parametrize("src", [torch.bfloat16, torch.float16, torch.float32])
def test_upcast_matches_torch_bit_for_bit(rows, src):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(rows, 300, generator=g).to(src)
    assert (rows * 300 * 4 >= HUGE_BYTES) == (rows == 2048)
    for view in (t, t.T, t[::2]):  # contiguous, transposed, strided
        for dtype in (torch.float32, torch.float64):
            if view.dtype == dtype:
                assert upcast(view, dtype) is view
                continue
            got = upcast(view, dtype)
            assert got.dtype == dtype and got.shape == view.shape
            assert torch.equal(got, view.to(dtype))


def test_subtract_matches_torch_and_leaves_inputs():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(1024, 600, generator=g), torch.randn(1024, 600, generator=g)
    a0, b0 = a.clone(), b.clone()
    assert torch.equal(subtract(a, b), a - b)
    assert torch.equal(subtract(a[:4], b[:4]), a[:4] - b[:4])  # small: torch's own path
    assert torch.equal(a, a0) and torch.equal(b, b0)


def test_tensors_that_need_grad_keep_autograd():
    t = torch.randn(1024, 600, requires_grad=True)
    assert upcast(t, torch.float64).grad_fn is not None
