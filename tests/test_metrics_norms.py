"""norm_metrics against the float64 numpy reference on planted updates, bf16 inputs and bad values."""

import math

import numpy as np
import pytest
import torch

from opd_dynamics.analysis.metrics.norms import norm_metrics
from opd_dynamics.numerics import CHANGE_THRESHOLD, dot, fro2

from reference import planted, ref_norms

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _delta(w0, wt):
    return wt.to(torch.float32) - w0.to(torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(48, 96), (96, 48), (7, 1)])
def test_norms_match_reference(shape, device):
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal(shape)
    wt = w0 + 1e-2 * rng.standard_normal(shape) * (rng.random(shape) < 0.5)
    t0 = torch.tensor(w0, dtype=torch.float64, device=device)
    tt = torch.tensor(wt, dtype=torch.float64, device=device)
    got = norm_metrics(t0, tt, tt - t0)
    ref = ref_norms(w0, wt)
    for key in ("update_norm", "base_norm", "relative_update", "rms_update"):
        assert got[key] == pytest.approx(ref[key], rel=1e-5)
    assert got["changed_fraction"] == pytest.approx(ref["changed_fraction"], abs=1e-12)
    assert got["finite"] is True


def test_bf16_weights_upcast_before_subtracting():
    """A bf16 pair whose difference is one bf16 ulp per changed entry: the float32 delta keeps it."""
    w0 = torch.full((32, 64), 1.0, dtype=torch.bfloat16)
    wt = w0.clone()
    wt[:, :16] = 1.0078125  # next bf16 after 1.0
    got = norm_metrics(w0, wt, _delta(w0, wt))
    ref = ref_norms(w0.float().numpy(), wt.float().numpy())
    assert got["update_norm"] == pytest.approx(ref["update_norm"], rel=1e-5)
    assert got["update_norm"] == pytest.approx(0.0078125 * math.sqrt(32 * 16), rel=1e-6)
    assert got["changed_fraction"] == pytest.approx(0.25)


def test_rank1_planted_update_norm_is_its_singular_value():
    rng = np.random.default_rng(1)
    w0 = rng.standard_normal((64, 32))
    wt = w0 + planted(64, 32, [0.37], rng)
    t0, tt = torch.tensor(w0), torch.tensor(wt)
    assert norm_metrics(t0, tt, tt - t0)["update_norm"] == pytest.approx(0.37, rel=1e-12)


def test_nan_and_inf_are_flagged_not_raised():
    w0 = torch.ones(8, 8)
    wt = w0.clone()
    wt[0, 0] = math.nan
    wt[1, 1] = math.inf
    got = norm_metrics(w0, wt, wt - w0)
    assert got["finite"] is False
    assert math.isnan(got["update_norm"]) and math.isnan(got["rms_update"])
    assert got["base_norm"] == pytest.approx(8.0)
    w0[2, 2] = -math.inf
    assert norm_metrics(w0, torch.ones(8, 8), torch.ones(8, 8) - w0)["finite"] is False


def test_zero_base_and_zero_update():
    z = torch.zeros(4, 5)
    got = norm_metrics(z, z, z)
    assert got["update_norm"] == 0.0 and got["changed_fraction"] == 0.0 and got["finite"] is True
    assert math.isnan(got["relative_update"])


def test_half_precision_delta_rejected():
    with pytest.raises(ValueError, match="upcast"):
        norm_metrics(torch.ones(2, 2), torch.ones(2, 2), torch.zeros(2, 2, dtype=torch.bfloat16))


def test_blockwise_accumulation_matches_numpy(monkeypatch):
    import opd_dynamics.numerics as numerics

    monkeypatch.setattr(numerics, "BLOCK_ELEMS", 100)  # force many blocks
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((57, 31)), rng.standard_normal((57, 31))
    assert fro2(torch.tensor(a)) == pytest.approx(np.sum(a * a), rel=1e-12)
    assert dot(torch.tensor(a, dtype=torch.float32), torch.tensor(b)) == pytest.approx(
        np.sum(a.astype(np.float32).astype(np.float64) * b), rel=1e-12)


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [1, 4095, 4096, 4097, 3 * 4096 + 11])  # around the kernel's decode block
def test_fused_pass_matches_float64_reference(stored, n):
    """The one-pass CPU kernel (float32 base, step as stored) against numpy float64 on the same values."""
    from opd_dynamics.numerics.fused import fused_update_stats

    g = torch.Generator().manual_seed(n)
    w0 = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16).float()
    wt = (w0 + 1e-4 * torch.randn(n, generator=g) * (torch.rand(n, generator=g) < 0.7)).to(stored)
    got = fused_update_stats(w0, wt, CHANGE_THRESHOLD)
    assert got is not None, "the fused kernel must apply to a float32 base and a bf16/float32 step on CPU"
    ref = ref_norms(w0.numpy(), wt.float().numpy())
    assert math.sqrt(got[0]) == pytest.approx(ref["update_norm"], rel=1e-12)
    assert got[1] == round(ref["changed_fraction"] * n)
    assert 0 < got[1] < n or n == 1
    # norm_metrics takes the fused route without a delta and the torch route with one: same answer
    fused, eager = norm_metrics(w0, wt), norm_metrics(w0, wt, wt.float() - w0)
    assert fused["changed_fraction"] == eager["changed_fraction"]
    assert fused["update_norm"] == pytest.approx(eager["update_norm"], rel=1e-6)


def test_fused_pass_flags_nan_and_inf_and_declines_other_layouts():
    from opd_dynamics.numerics.fused import fused_update_stats

    w0 = torch.zeros(5000)
    for bad in (math.nan, math.inf):
        wt = w0.clone().to(torch.bfloat16)
        wt[4321] = bad
        assert norm_metrics(w0, wt)["finite"] is False
    assert fused_update_stats(w0.double(), w0, CHANGE_THRESHOLD) is None  # float64 base: torch route
    assert fused_update_stats(w0, w0.half(), CHANGE_THRESHOLD) is None
    assert fused_update_stats(w0.view(50, 100).T, w0.view(50, 100).T, CHANGE_THRESHOLD) is None  # not contiguous
    assert norm_metrics(w0.double(), w0.half())["update_norm"] == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_dot_and_sum_squares_match_float64(dtype):
    """dot / fro2 on float32 and bf16 CPU tensors take the kernels: float64 answers on those values."""
    from opd_dynamics.numerics.fused import fused_dot, fused_sum_squares

    rng = np.random.default_rng(4)
    a = torch.tensor(rng.standard_normal((37, 129)), dtype=dtype)
    b = torch.tensor(rng.standard_normal((37, 129)), dtype=dtype)
    a64, b64 = a.double().numpy(), b.double().numpy()
    assert fused_dot(a, b) is not None and fused_sum_squares(a) is not None
    assert dot(a, b) == pytest.approx(float(np.sum(a64 * b64)), rel=1e-12)
    assert fro2(a) == pytest.approx(float(np.sum(a64 * a64)), rel=1e-12)
    a[3, 4] = math.inf
    assert not math.isfinite(fro2(a))
