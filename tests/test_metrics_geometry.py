"""geometry_metrics against the numpy reference on planted bases and updates; the base cache round-trip."""

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from opd_dynamics.analysis.metrics.geometry import BaseDecomposition, decompose_base, geometry_metrics, top_k_for

from reference import planted, random_orthogonal, ref_geometry

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
KEYS = ["principal_energy_1pct", "principal_energy_5pct", "principal_energy_10pct", "principal_energy_20pct",
        "principal_rotation_deg", "spectral_drift"]


def _run(W0, Wt, device="cpu"):
    w0, wt = torch.tensor(W0, device=device), torch.tensor(Wt, device=device)
    return geometry_metrics(decompose_base(w0), wt, wt - w0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(48, 96), (220, 150)])
def test_random_update_matches_reference(shape, device):
    rng = np.random.default_rng(0)
    r = min(shape)
    W0 = planted(*shape, np.linspace(5.0, 0.5, r), rng)
    Wt = W0 + 0.05 * rng.standard_normal(shape)
    got, ref = _run(W0, Wt, device), ref_geometry(W0, Wt)
    for key in KEYS[:4] + ["spectral_drift"]:
        assert got[key] == pytest.approx(ref[key], rel=1e-4), key
    assert got["principal_rotation_deg"] == pytest.approx(ref["principal_rotation_deg"], abs=1e-3)


def test_update_inside_and_outside_principal_block():
    rng = np.random.default_rng(1)
    m, n = 100, 200  # r = 100: k = 1, 5, 10, 20
    U, V = random_orthogonal(m, m, rng), random_orthogonal(n, m, rng)
    W0 = planted(m, n, np.linspace(10, 1, m), rng, U=U, V=V)
    inside = (U[:, :5] * [1.0, 1.0, 1.0, 1.0, 1.0]) @ V[:, 5:10].T  # rows in top-5, cols in top-10
    got = _run(W0, W0 + 1e-3 * inside)
    assert got["principal_energy_1pct"] == pytest.approx(0.0, abs=1e-10)
    assert got["principal_energy_5pct"] == pytest.approx(0.0, abs=1e-10)
    assert got["principal_energy_10pct"] == pytest.approx(1.0, abs=1e-10)
    assert got["principal_energy_20pct"] == pytest.approx(1.0, abs=1e-10)
    outside = U[:, 50:51] @ V[:, 60:61].T
    got = _run(W0, W0 + 1e-3 * (outside + U[:, :1] @ V[:, :1].T))  # half the energy in the top-1 block
    assert got["principal_energy_1pct"] == pytest.approx(0.5, abs=1e-10)
    assert got["principal_energy_20pct"] == pytest.approx(0.5, abs=1e-10)


def test_known_rotation_and_drift():
    rng = np.random.default_rng(2)
    m, n = 150, 90  # r = 90: top-1% is k = 1
    U, V = random_orthogonal(m, n, rng), random_orthogonal(n, n, rng)
    s = np.linspace(9, 1, n)
    W0 = planted(m, n, s, rng, U=U, V=V)
    th = math.radians(20.0)
    U2 = U.copy()
    U2[:, 0] = math.cos(th) * U[:, 0] + math.sin(th) * U[:, 45]  # still orthonormal
    U2[:, 45] = -math.sin(th) * U[:, 0] + math.cos(th) * U[:, 45]
    got = _run(W0, planted(m, n, s, rng, U=U2, V=V))
    assert got["principal_rotation_deg"] == pytest.approx(20.0, abs=1e-6)
    assert got["spectral_drift"] == pytest.approx(0.0, abs=1e-10)
    got = _run(W0, 1.1 * W0)
    assert got["spectral_drift"] == pytest.approx(0.1, rel=1e-10)
    assert got["principal_rotation_deg"] == pytest.approx(0.0, abs=1e-5)
    assert got["principal_energy_1pct"] == pytest.approx(81 / np.sum(s**2), rel=1e-8)


def test_unchanged_weights_and_bf16_input():
    rng = np.random.default_rng(3)
    w0 = torch.tensor(planted(64, 128, np.linspace(4, 1, 64), rng), dtype=torch.bfloat16)
    got = geometry_metrics(decompose_base(w0), w0, torch.zeros(64, 128))
    assert all(math.isnan(got[k]) for k in KEYS[:4])  # no update: energy shares undefined
    assert got["principal_rotation_deg"] == pytest.approx(0.0, abs=1e-5)
    assert got["spectral_drift"] == 0.0


def test_zeroed_and_nonfinite_weights():
    """W_t = 0 drifts by exactly 1 (||0 - s0|| / ||s0||) and has no top subspace; NaN in W_t gives NaN drift."""
    rng = np.random.default_rng(5)
    W0 = planted(40, 60, np.linspace(3, 1, 40), rng)
    w0 = torch.tensor(W0)
    got = geometry_metrics(decompose_base(w0), torch.zeros(40, 60), -w0)
    assert got["spectral_drift"] == pytest.approx(1.0, abs=1e-12)
    sv = np.linspace(3, 1, 40)  # dW = -W_0: its energy in W_0's top 8 (20% of 40) directions
    assert got["principal_energy_20pct"] == pytest.approx(np.sum(sv[:8] ** 2) / np.sum(sv ** 2), abs=1e-9)
    assert math.isnan(got["principal_rotation_deg"])
    bad = w0.clone()
    bad[0, 0] = math.nan
    got = geometry_metrics(decompose_base(w0), bad, bad - w0)
    assert math.isnan(got["spectral_drift"]) and math.isnan(got["principal_rotation_deg"])


def test_nonfinite_base_gives_nan():
    w0 = torch.randn(40, 60)
    w0[0, 0] = math.inf
    got = geometry_metrics(decompose_base(w0), torch.randn(40, 60), torch.randn(40, 60))
    assert all(math.isnan(got[k]) for k in KEYS)


def test_cache_round_trip_through_safetensors(tmp_path):
    rng = np.random.default_rng(4)
    W0 = planted(120, 70, np.linspace(3, 1, 70), rng)
    base = decompose_base(torch.tensor(W0, dtype=torch.float32))
    assert base.U.shape == (120, 14) and base.V.shape == (70, 14)  # ceil(20% of 70)
    save_file({k: v.contiguous() for k, v in base.to_tensors().items()}, str(tmp_path / "b.safetensors"))
    back = BaseDecomposition.from_tensors(load_file(str(tmp_path / "b.safetensors")))
    assert back.method == base.method == "exact-gram-f64" and back.shape == (120, 70) and back.pcts == (1, 5, 10, 20)
    assert torch.equal(back.U, base.U) and torch.equal(back.singular_values, base.singular_values)
    Wt = W0 + 0.01 * rng.standard_normal(W0.shape)
    wt, d = torch.tensor(Wt), torch.tensor(Wt - W0)
    assert geometry_metrics(back, wt, d) == geometry_metrics(base, wt, d)
    with pytest.raises(ValueError):
        BaseDecomposition.from_tensors({**base.to_tensors(), "shape": torch.tensor([7, 70])})


def test_top_k_for():
    assert [top_k_for(p, 896) for p in (1, 5, 10, 20)] == [9, 45, 90, 180]
    assert [top_k_for(p, 100) for p in (1, 5, 10, 20)] == [1, 5, 10, 20]
    assert top_k_for(1, 3) == 1 and top_k_for(0.5, 300) == 2
