"""alignment_metrics on planted early/final subspaces with known overlaps, angles and cosines."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opd_dynamics.analysis.metrics.subspace import alignment_metrics, principal_angles
from opd_dynamics.numerics.decomposition import decompose

from reference import random_orthogonal, ref_alignment

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
M_, N_ = 96, 64
TOP = np.linspace(10.0, 5.0, 24)  # 24 distinct dominant values (covers k=16 and K=20)
TAIL = np.linspace(0.05, 0.01, N_ - 24)


def _bases(seed):
    rng = np.random.default_rng(seed)
    return random_orthogonal(M_, M_, rng), random_orthogonal(N_, N_, rng), rng


def _update(Qu, Qv, top_u, top_v):
    """Dominant part on the given (M, 24)/(N, 24) bases, a small tail on the rest of Qu, Qv."""
    tail_u = Qu[:, 40 : 40 + TAIL.size]
    tail_v = Qv[:, 24 : 24 + TAIL.size]
    return (top_u * TOP) @ top_v.T + (tail_u * TAIL) @ tail_v.T


def _metrics(Dt, DT, device="cpu", **kw):
    dt, dT = torch.tensor(Dt, device=device), torch.tensor(DT, device=device)
    return alignment_metrics(decompose(dt), decompose(dT), dt, dT, **kw)


def _check_reference(got, Dt, DT):
    ref = ref_alignment(Dt, DT)
    for key in ("subspace_overlap_u", "subspace_overlap_v", "paired_cosine", "rank1_cosine"):
        assert got[key] == pytest.approx(ref[key], abs=1e-3), key
    assert got["direction_cosine"] == pytest.approx(ref["direction_cosine"], abs=1e-6)
    assert got["max_principal_angle_deg"] == pytest.approx(ref["max_principal_angle_deg"], abs=1e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_same_subspace_rotated_inside_has_overlap_one(device):
    Qu, Qv, rng = _bases(0)
    DT = _update(Qu, Qv, Qu[:, :24], Qv[:, :24])
    R = np.eye(24)
    R[:16, :16] = random_orthogonal(16, 16, rng)  # rotate inside the top-16 subspace
    Dt = _update(Qu, Qv, Qu[:, :24] @ R, Qv[:, :24] @ R.T)
    got = _metrics(Dt, DT, device)
    assert got["k"] == 16
    assert got["subspace_overlap_u"] == pytest.approx(1.0, abs=1e-9)
    assert got["subspace_overlap_v"] == pytest.approx(1.0, abs=1e-9)
    assert got["max_principal_angle_deg"] == pytest.approx(0.0, abs=1e-5)
    assert got["paired_cosine"] < 0.9  # individual directions were rotated
    _check_reference(got, Dt, DT)


@pytest.mark.parametrize("device", DEVICES)
def test_orthogonal_subspaces_have_overlap_zero(device):
    Qu, Qv, _ = _bases(1)
    DT = _update(Qu, Qv, Qu[:, :24], Qv[:, :24])
    Dt = _update(np.roll(Qu, -24, axis=1), Qv, Qu[:, 24:48], Qv[:, 24:48])  # tails sit elsewhere
    got = _metrics(Dt, DT, device)
    assert got["subspace_overlap_u"] == pytest.approx(0.0, abs=1e-9)
    assert got["subspace_overlap_v"] == pytest.approx(0.0, abs=1e-9)
    assert got["max_principal_angle_deg"] == pytest.approx(90.0, abs=1e-6)
    assert got["rank1_cosine"] == pytest.approx(0.0, abs=1e-9)
    _check_reference(got, Dt, DT)


@pytest.mark.parametrize("theta_deg", [10.0, 35.0, 60.0])
def test_partial_overlap_known_angle(theta_deg):
    """Each top direction tilted by theta into an orthogonal one: overlap cos^2(theta), angles theta."""
    Qu, Qv, _ = _bases(2)
    th = math.radians(theta_deg)
    DT = _update(Qu, Qv, Qu[:, :24], Qv[:, :24])
    tilted_u = math.cos(th) * Qu[:, :24] + math.sin(th) * Qu[:, 24:48]  # stays orthonormal
    Dt = (tilted_u * TOP) @ Qv[:, :24].T + (Qu[:, 72:96] * TAIL[:24]) @ Qv[:, 24:48].T
    got = _metrics(Dt, DT)
    assert got["subspace_overlap_u"] == pytest.approx(math.cos(th) ** 2, abs=1e-9)
    assert got["subspace_overlap_v"] == pytest.approx(1.0, abs=1e-9)
    assert got["max_principal_angle_deg"] == pytest.approx(theta_deg, abs=1e-6)
    assert got["paired_cosine"] == pytest.approx(math.cos(th), abs=1e-9)
    assert got["rank1_cosine"] == pytest.approx(math.cos(th), abs=1e-9)
    _check_reference(got, Dt, DT)


def test_scaled_and_negated_update_direction_cosine():
    Qu, Qv, _ = _bases(3)
    DT = _update(Qu, Qv, Qu[:, :24], Qv[:, :24])
    got = _metrics(0.5 * DT, DT)
    assert got["direction_cosine"] == pytest.approx(1.0, abs=1e-12)
    assert got["paired_cosine"] == pytest.approx(1.0, abs=1e-9)
    assert _metrics(-DT, DT)["direction_cosine"] == pytest.approx(-1.0, abs=1e-12)


def test_random_updates_match_reference_and_k_K():
    rng = np.random.default_rng(4)
    Dt, DT = rng.standard_normal((80, 120)), rng.standard_normal((80, 120))
    got = _metrics(Dt, DT, k=8, K=12)
    ref = ref_alignment(Dt, DT, k=8, K=12)
    assert got["k"] == 8
    for key in ("subspace_overlap_u", "subspace_overlap_v", "paired_cosine", "rank1_cosine"):
        assert got[key] == pytest.approx(ref[key], abs=1e-3), key


def test_low_rank_update_uses_k_up_to_its_rank():
    Qu, Qv, _ = _bases(5)
    DT = (Qu[:, :3] * [3.0, 2.0, 1.0]) @ Qv[:, :3].T
    got = _metrics(0.1 * DT, DT)
    assert got["k"] == 3
    assert got["subspace_overlap_u"] == pytest.approx(1.0, abs=1e-9)
    assert got["paired_cosine"] == pytest.approx(1.0, abs=1e-9)


def test_an_update_of_rank_between_k_and_K_records_both_counts_it_used():
    """Rank 18: the overlaps use k = 16 of them, paired_cosine all 18 (K = 20 asked); both are recorded."""
    rng = np.random.default_rng(6)
    Qu, Qv, _ = _bases(6)
    s = np.linspace(4.0, 1.0, 18)
    Dt = (Qu[:, :18] * s) @ Qv[:, :18].T
    Rv = random_orthogonal(18, 18, rng)  # the same subspaces, the directions mixed within them
    DT = (Qu[:, :18] @ Rv * s[::-1]) @ (Qv[:, :18] @ Rv).T
    got = _metrics(Dt, DT)
    assert (got["k"], got["paired_k"]) == (16, 18)
    ref = ref_alignment(Dt, DT, k=16, K=18)
    for key in ("subspace_overlap_u", "paired_cosine", "rank1_cosine"):
        assert got[key] == pytest.approx(ref[key], abs=1e-6), key


@pytest.mark.parametrize("m, n, r", [(96, 64, 3), (256, 1024, 8)])
def test_float32_low_rank_update_counts_rounding_as_no_rank(m, n, r):
    """A rank-r update formed in float32 (a LoRA B @ A): its rounding noise is not rank, so k = r and the
    shared subspaces overlap fully."""
    rng = np.random.default_rng(m)
    U, V = random_orthogonal(m, r, rng), random_orthogonal(n, r, rng)
    B, A = torch.tensor(U @ rng.standard_normal((r, r)), dtype=torch.float32), torch.tensor(V.T, dtype=torch.float32)
    dt, dT = B @ A, (B @ torch.tensor(rng.standard_normal((r, r)), dtype=torch.float32)) @ A
    da, dT_ = decompose(dt, k_vectors=20), decompose(dT, k_vectors=20)
    assert da.rank == dT_.rank == r
    got = alignment_metrics(da, dT_, dt, dT)
    assert got["k"] == r
    for key in ("subspace_overlap_u", "subspace_overlap_v"):
        assert got[key] == pytest.approx(1.0, abs=1e-6), key
    assert got["max_principal_angle_deg"] == pytest.approx(0.0, abs=0.05)


def test_zero_and_nonfinite_updates_give_nan_not_errors():
    Qu, Qv, _ = _bases(6)
    DT = torch.tensor(_update(Qu, Qv, Qu[:, :24], Qv[:, :24]))
    z = torch.zeros_like(DT)
    got = alignment_metrics(decompose(z), decompose(DT), z, DT)
    assert got["k"] == 0 and math.isnan(got["subspace_overlap_u"]) and math.isnan(got["direction_cosine"])
    bad = DT.clone()
    bad[0, 0] = math.nan
    got = alignment_metrics(decompose(bad), decompose(DT), bad, DT)
    assert got["k"] == 0 and math.isnan(got["paired_cosine"]) and math.isnan(got["direction_cosine"])


def test_fast_mode_overlap_close_on_decaying_spectrum():
    Qu, Qv, rng = _bases(7)
    DT = _update(Qu, Qv, Qu[:, :24], Qv[:, :24])
    Dt = DT + 0.01 * rng.standard_normal(DT.shape)
    dt, dT = torch.tensor(Dt), torch.tensor(DT)
    got = alignment_metrics(decompose(dt, mode="fast"), decompose(dT, mode="fast"), dt, dT)
    ref = ref_alignment(Dt, DT)
    assert got["subspace_overlap_u"] == pytest.approx(ref["subspace_overlap_u"], abs=1e-2)


def test_principal_angles_small_angle_accuracy():
    """atan2 of sines and cosines resolves a 1e-9 rad angle that arccos alone would lose."""
    Q = torch.from_numpy(random_orthogonal(50, 4, np.random.default_rng(8)))
    A = Q[:, :3]
    B = A.clone()
    B[:, 0] = math.cos(1e-9) * Q[:, 0] + math.sin(1e-9) * Q[:, 3]
    ang = principal_angles(A, B)
    assert float(ang.max()) == pytest.approx(1e-9, rel=1e-6)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(1, 16))
def test_overlap_bounded_and_symmetric(seed, k):
    rng = np.random.default_rng(seed)
    Dt, DT = rng.standard_normal((40, 60)), rng.standard_normal((40, 60))
    a, b = _metrics(Dt, DT, k=k), _metrics(DT, Dt, k=k)
    for key in ("subspace_overlap_u", "subspace_overlap_v", "max_principal_angle_deg", "direction_cosine"):
        assert a[key] == pytest.approx(b[key], abs=1e-9)
    assert 0.0 <= a["subspace_overlap_u"] <= 1.0 + 1e-12 and 0.0 <= a["subspace_overlap_v"] <= 1.0 + 1e-12
    assert 0.0 <= a["max_principal_angle_deg"] <= 90.0 + 1e-9


@pytest.mark.parametrize("device", DEVICES)
def test_subspace_iteration_vectors_give_the_same_alignment(device):
    Qu, Qv, _ = _bases(9)
    th = math.radians(35.0)
    DT = _update(Qu, Qv, Qu[:, :24], Qv[:, :24])
    Dt = ((math.cos(th) * Qu[:, :24] + math.sin(th) * Qu[:, 24:48]) * TOP) @ Qv[:, :24].T \
        + (Qu[:, 72:96] * TAIL[:24]) @ Qv[:, 24:48].T
    dt, dT = torch.tensor(Dt, device=device), torch.tensor(DT, device=device)
    got = alignment_metrics(decompose(dt, vectors="subspace"), decompose(dT, vectors="subspace"), dt, dT)
    assert got["subspace_overlap_u"] == pytest.approx(math.cos(th) ** 2, abs=1e-9)
    assert got["paired_cosine"] == pytest.approx(math.cos(th), abs=1e-9)
