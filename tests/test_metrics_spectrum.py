"""decompose / spectrum_metrics against np.linalg.svd on planted spectra (exact and fast modes)."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opd_dynamics.analysis.metrics.spectrum import spectrum_metrics, top_singular_values
from opd_dynamics.numerics.decomposition import decompose

from reference import planted, ref_singular_values, ref_spectrum

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
KS = (1, 4, 16, 64)
RATIO_KEYS = ["spectral_ratio", "stable_rank", "top1pct_norm_ratio", *[f"energy_top{k}" for k in KS]]


def _spectra(r):
    i = np.arange(1, r + 1, dtype=np.float64)
    return {"geometric": 0.9**i, "power": 1.0 / i, "flat": 1.0 + 0.01 * i[::-1],
            "conditioned1e6": np.logspace(0, -6, r)}


def check_exact(got, ref):
    assert got["spectral_norm"] == pytest.approx(ref["spectral_norm"], rel=1e-5)
    for key in RATIO_KEYS:
        assert got[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-12), key
    assert got["effective_rank"] == pytest.approx(ref["effective_rank"], rel=1e-3)
    assert got["rank90"] == ref["rank90"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(48, 96), (96, 48)])
@pytest.mark.parametrize("spectrum", ["geometric", "power", "flat", "conditioned1e6"])
@pytest.mark.parametrize("route", ["auto", "gram", "svd"])
def test_exact_matches_reference(shape, spectrum, route, device):
    rng = np.random.default_rng([*shape, len(spectrum)])  # not hash(): str hashes change per process
    r = min(shape)
    M = planted(*shape, _spectra(r)[spectrum], rng)
    dec = decompose(torch.tensor(M, device=device), exact_method=route)
    assert dec.full and dec.method.startswith("exact-")
    assert dec.method == ("exact-svd-f64" if route == "svd" else "exact-gram-f64")
    assert dec.singular_values.device.type == device
    np.testing.assert_allclose(dec.singular_values.cpu().numpy(), ref_singular_values(M), rtol=1e-5,
                               atol=1e-7 * ref_singular_values(M)[0])
    check_exact(spectrum_metrics(dec, KS), ref_spectrum(M, KS))
    assert dec.fro2 == pytest.approx(float(np.sum(M * M)), rel=1e-12)


def test_slice_of_real_shape_float32_input():
    """A 896x4864 slice (Qwen2.5-0.5B down_proj^T shape) with a power-law spectrum, given in float32."""
    rng = np.random.default_rng(7)
    s = 1.0 / np.arange(1, 897) ** 0.7
    M = planted(896, 4864, s, rng).astype(np.float32)
    dec = decompose(torch.from_numpy(M))
    assert dec.method == "exact-gram-f64" and dec.U.shape == (896, 20) and dec.V.shape == (4864, 20)
    got, ref = spectrum_metrics(dec), ref_spectrum(M.astype(np.float64))
    check_exact(got, ref)
    assert got["top1pct_norm_ratio"] == pytest.approx(ref["top1pct_norm_ratio"], rel=1e-4)  # 9 values


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(64, 128), (128, 64)])
def test_rank1_update(shape, device):
    rng = np.random.default_rng(3)
    M = planted(*shape, [2.5], rng)
    dec = decompose(torch.tensor(M, device=device))
    got = spectrum_metrics(dec)
    assert dec.method == "exact-svd-f64"  # the Gram route cannot resolve 63 zero values: falls back
    assert dec.rank == 1
    assert got["energy_top1"] == pytest.approx(1.0, abs=1e-12)
    assert got["rank90"] == 1
    assert got["stable_rank"] == pytest.approx(1.0, abs=1e-12)
    assert got["effective_rank"] == pytest.approx(1.0, rel=1e-6)
    assert got["spectral_ratio"] == pytest.approx(1.0, abs=1e-12)
    assert got["spectral_norm"] == pytest.approx(2.5, rel=1e-12)


def test_low_rank_planted_known_values():
    rng = np.random.default_rng(4)
    s = np.array([4.0, 2.0, 1.0, 1.0])
    M = planted(100, 60, s, rng)
    got = spectrum_metrics(decompose(torch.tensor(M)))
    F2 = float(np.sum(s**2))
    assert got["energy_top1"] == pytest.approx(16 / F2, rel=1e-10)
    assert got["energy_top4"] == pytest.approx(1.0, rel=1e-10)
    assert got["rank90"] == 2  # 16 / 22 = 0.727, (16 + 4) / 22 = 0.909
    ps = s / s.sum()
    assert got["effective_rank"] == pytest.approx(math.exp(-np.sum(ps * np.log(ps))), rel=1e-6)
    assert got["energy_top64"] == 1.0  # k > r


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_zero_matrix(mode):
    dec = decompose(torch.zeros(40, 70), mode=mode)
    got = spectrum_metrics(dec)
    assert dec.method == "zero" and dec.U is None and dec.fro2 == 0.0
    assert got["spectral_norm"] == 0.0 and got["stable_rank"] == 0.0
    assert got["effective_rank"] == 0.0 and got["rank90"] == 0
    for key in RATIO_KEYS[:1] + RATIO_KEYS[2:]:
        assert math.isnan(got[key]), key


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_nan_matrix_never_raises(mode):
    M = torch.randn(40, 70)
    M[3, 5] = math.nan
    dec = decompose(M, mode=mode)
    got = spectrum_metrics(dec)
    assert dec.method == "nonfinite" and math.isnan(dec.fro2)
    assert got["svd_method"] == "nonfinite"
    assert all(math.isnan(v) for k, v in got.items() if k != "svd_method")
    M[3, 5] = math.inf
    assert spectrum_metrics(decompose(M, mode=mode))["svd_method"] == "nonfinite"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(200, 400), (400, 200), (128, 896)])
def test_fast_mode_decaying_spectrum(shape, device):
    rng = np.random.default_rng(5)
    r = min(shape)
    M = planted(*shape, 0.85 ** np.arange(r), rng)
    dec = decompose(torch.tensor(M, device=device), mode="fast")
    got, ref = spectrum_metrics(dec), ref_spectrum(M)
    assert dec.method == "randomized-q74" and got["svd_method"] == "randomized-q74" and not dec.full
    assert dec.singular_values.numel() == 64
    assert dec.fro2 == pytest.approx(float(np.sum(M * M)), rel=1e-12)  # exact F^2 even in fast mode
    for k in (1, 4, 16):
        assert got[f"energy_top{k}"] == pytest.approx(ref[f"energy_top{k}"], abs=1e-2)
    assert got["spectral_norm"] == pytest.approx(ref["spectral_norm"], rel=1e-2)
    assert math.isnan(got["effective_rank"])
    assert got["rank90"] == ref["rank90"]  # reached inside the top 64


def test_fast_mode_full_spectrum_metrics_empty_when_out_of_reach():
    rng = np.random.default_rng(6)
    M = planted(300, 300, np.ones(300), rng)  # flat: top 64 hold 21% of the energy
    got = spectrum_metrics(decompose(torch.tensor(M), mode="fast"))
    assert math.isnan(got["effective_rank"]) and math.isnan(got["rank90"])
    assert got["energy_top64"] == pytest.approx(64 / 300, abs=2e-2)
    assert got["top1pct_norm_ratio"] == pytest.approx(math.sqrt(3 / 300), abs=2e-2)  # ceil(3) <= 64


def test_fast_mode_is_reproducible():
    M = torch.randn(100, 150, dtype=torch.float64)
    a, b = decompose(M, mode="fast"), decompose(M, mode="fast")
    np.testing.assert_allclose(a.singular_values.cpu().numpy(), b.singular_values.cpu().numpy(), rtol=1e-10,
                               atol=1e-12 * float(b.singular_values[0]))  # eigvalsh vs eigh values


@pytest.mark.parametrize("shape", [(200, 300), (300, 200)])
def test_fast_mode_rank_deficient_update(shape):
    """A rank-3 float32 update: three exact values, rank 3, unit vectors for them and no NaN beyond."""
    rng = np.random.default_rng(12)
    M = planted(*shape, np.array([3.0, 2.0, 1.0]), rng)
    dec = decompose(torch.tensor(M, dtype=torch.float32), k_vectors=20, mode="fast")
    np.testing.assert_allclose(dec.singular_values[:3].numpy(), [3.0, 2.0, 1.0], rtol=1e-6)
    assert dec.rank == 3 and bool(torch.isfinite(dec.U).all() and torch.isfinite(dec.V).all())
    np.testing.assert_allclose(torch.linalg.vector_norm(dec.V, dim=0).numpy(), [1.0] * 3 + [0.0] * 17, atol=1e-6)
    got = spectrum_metrics(dec)
    assert got["energy_top1"] == pytest.approx(9 / 14, abs=1e-6) and got["rank90"] == 2


def test_k_vectors_zero_skips_vectors_and_top_values():
    rng = np.random.default_rng(8)
    M = planted(80, 50, np.linspace(3, 1, 50), rng)
    dec = decompose(torch.tensor(M), k_vectors=0)
    assert dec.U is None and dec.V is None and dec.method == "exact-gram-f64"
    top = top_singular_values(dec, n=10)
    assert top.shape == (10,) and top.dtype == torch.float64
    np.testing.assert_allclose(top.numpy(), np.linspace(3, 1, 50)[:10], rtol=1e-10)


def test_singular_vectors_are_the_planted_ones():
    rng = np.random.default_rng(9)
    from reference import random_orthogonal

    U, V = random_orthogonal(60, 30, rng), random_orthogonal(90, 30, rng)
    s = np.linspace(30, 1, 30)
    for shape, (A, B) in {(60, 90): (U, V), (90, 60): (V, U)}.items():
        M = planted(*shape, s, rng, U=A, V=B)
        dec = decompose(torch.tensor(M), k_vectors=5)
        assert dec.method == "exact-gram-f64"
        np.testing.assert_allclose(np.abs(np.sum(dec.U.numpy() * A[:, :5], axis=0)), 1.0, atol=1e-10)
        np.testing.assert_allclose(np.abs(np.sum(dec.V.numpy() * B[:, :5], axis=0)), 1.0, atol=1e-10)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="2-D"):
        decompose(torch.ones(3, 4, 5))
    with pytest.raises(ValueError, match="mode"):
        decompose(torch.ones(3, 4), mode="approx")


@settings(max_examples=25, deadline=None)
@given(m=st.integers(2, 40), n=st.integers(2, 40), seed=st.integers(0, 2**16),
       mode=st.sampled_from(["exact", "fast"]))
def test_energies_monotone_and_bounded(m, n, seed, mode):
    M = torch.from_numpy(np.random.default_rng(seed).standard_normal((m, n)))
    got = spectrum_metrics(decompose(M, mode=mode), ks=(1, 2, 4, 8, 16, 64))
    e = [got[f"energy_top{k}"] for k in (1, 2, 4, 8, 16, 64)]
    assert all(0 < x <= 1.0 for x in e)
    assert all(a <= b for a, b in zip(e, e[1:]))
    assert 1.0 <= got["stable_rank"] <= min(m, n) + 1e-9
    assert 1 <= got["rank90"] <= min(m, n)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(300, 500), (500, 300)])
def test_certified_subspace_vectors_equal_eigh_vectors(shape, device):
    """The eigvalsh + certified subspace-iteration route gives the same top-20 vectors as full eigh."""
    from opd_dynamics.numerics.decomposition import subspace_top

    rng = np.random.default_rng(10)
    r = min(shape)
    s = np.concatenate([10 * 0.85 ** np.arange(40), np.linspace(0.2, 0.01, r - 40)])
    M = torch.tensor(planted(*shape, s, rng), device=device)
    G = M @ M.T if shape[0] <= shape[1] else M.T @ M
    lam = torch.linalg.eigvalsh(G).flip(0)
    assert subspace_top(G, lam, 20) is not None  # certified, not a silent fallback
    a = decompose(M, vectors="subspace")
    b = decompose(M, vectors="eigh")
    assert a.method == b.method == "exact-gram-f64"
    np.testing.assert_allclose(a.singular_values.cpu().numpy(), b.singular_values.cpu().numpy(), rtol=1e-10,
                               atol=1e-12 * float(b.singular_values[0]))  # eigvalsh vs eigh values
    for x, y in ((a.U, b.U), (a.V, b.V)):
        np.testing.assert_allclose((x * y).sum(0).abs().cpu().numpy(), 1.0, atol=1e-10)


def test_subspace_route_declines_without_a_gap_and_falls_back():
    from opd_dynamics.numerics.decomposition import subspace_top

    rng = np.random.default_rng(11)
    M = torch.tensor(planted(200, 300, np.ones(200) + 1e-6 * rng.random(200), rng))
    G = M @ M.T
    lam = torch.linalg.eigvalsh(G).flip(0)
    assert subspace_top(G, lam, 20) is None  # sigma_20 and sigma_31 coincide: nothing to certify
    dec = decompose(M, vectors="subspace")  # still exact: full eigh
    assert dec.method == "exact-gram-f64" and dec.U.shape == (200, 20)
    np.testing.assert_allclose((dec.U.T @ dec.U).numpy(), np.eye(20), atol=1e-10)
    with pytest.raises(ValueError, match="vectors"):
        decompose(M, vectors="lanczos")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,k", [((300, 500), 20), ((500, 300), 20), ((400, 64), 64), ((64, 400), 100),
                                     ((256, 256), 1)])
def test_tridiagonal_route_matches_float64_svd(shape, k, device):
    """The syrk + dsytrd + dsterf + dstein + dormqr route: all values and the top-k vectors of a planted
    spectrum equal numpy's float64 SVD (k beyond the side gives every vector)."""
    rng = np.random.default_rng(12)
    r = min(shape)
    s = np.sort(np.concatenate([10 * 0.8 ** np.arange(30), np.linspace(0.3, 0.02, r - 30)]))[::-1]
    A = planted(*shape, s, rng)
    dec = decompose(torch.tensor(A, device=device), k_vectors=k, vectors="tridiagonal")
    assert dec.method == "exact-gram-f64" and dec.full
    np.testing.assert_allclose(dec.singular_values.cpu().numpy(), s, rtol=1e-9, atol=1e-12 * s[0])
    U, _, Vt = np.linalg.svd(A, full_matrices=False)
    kk = min(k, r)
    assert dec.U.shape == (shape[0], kk) and dec.V.shape == (shape[1], kk)
    np.testing.assert_allclose(np.abs((dec.U.cpu().numpy() * U[:, :kk]).sum(0)), 1.0, atol=1e-9)
    np.testing.assert_allclose(np.abs((dec.V.cpu().numpy() * Vt[:kk].T).sum(0)), 1.0, atol=1e-9)
    np.testing.assert_allclose(dec.U.cpu().numpy().T @ dec.U.cpu().numpy(), np.eye(kk), atol=1e-10)


def test_tridiagonal_and_eigh_routes_agree_on_values_only():
    rng = np.random.default_rng(13)
    M = torch.tensor(planted(700, 200, np.geomspace(5, 1e-2, 200), rng))
    a = decompose(M, k_vectors=0, vectors="tridiagonal")
    b = decompose(M, k_vectors=0, vectors="eigh")
    assert a.U is None and b.U is None
    np.testing.assert_allclose(a.singular_values.numpy(), b.singular_values.numpy(), rtol=1e-10)


def test_tridiagonal_route_on_a_flat_spectrum_gives_an_orthonormal_basis():
    """Every singular value equal (a scaled orthogonal matrix): the top-k eigenspace is not unique, but the
    vectors returned must still be orthonormal, paired (M v_i = sigma u_i) and the values exact."""
    rng = np.random.default_rng(14)
    Q, _ = np.linalg.qr(rng.standard_normal((300, 300)))
    M = torch.tensor(3.0 * Q[:, :120])  # 300 x 120, all sigma = 3
    dec = decompose(M, k_vectors=20, vectors="tridiagonal")
    np.testing.assert_allclose(dec.singular_values.numpy(), 3.0, rtol=1e-12)
    np.testing.assert_allclose((dec.V.T @ dec.V).numpy(), np.eye(20), atol=1e-10)
    np.testing.assert_allclose((M @ dec.V).numpy(), 3.0 * dec.U.numpy(), atol=1e-10)


def test_inverse_iteration_that_fails_falls_back_to_mrrr(monkeypatch):
    """dstein reports vectors that did not converge (injected: no real input makes it fail on demand):
    dstemr computes them instead and the answer is the float64 SVD's."""
    from opd_dynamics.numerics import decomposition as spectrum

    rng = np.random.default_rng(16)
    s = np.geomspace(6, 0.05, 120)
    A = planted(400, 120, s, rng)
    calls = []
    lapack = spectrum.lapack

    class FailingStein:
        def __getattr__(self, name):
            return getattr(lapack, name)

        @staticmethod
        def dstein(*a):
            calls.append("dstein")
            z, _ = lapack.dstein(*a)
            return z, 3  # info > 0: three vectors failed to converge

        @staticmethod
        def dstemr(*a):
            calls.append("dstemr")
            return lapack.dstemr(*a)

    monkeypatch.setattr(spectrum, "lapack", FailingStein())
    dec = decompose(torch.tensor(A), k_vectors=24, vectors="tridiagonal")
    assert calls == ["dstein", "dstemr"] and dec.method == "exact-gram-f64"
    _, _, Vt = np.linalg.svd(A, full_matrices=False)
    np.testing.assert_allclose(np.abs((dec.V.numpy() * Vt[:24].T).sum(0)), 1.0, atol=1e-9)
    np.testing.assert_allclose((torch.tensor(A) @ dec.V).numpy(), dec.U.numpy() * s[:24], atol=1e-9)


def test_a_lapack_failure_on_the_tridiagonal_route_falls_back_to_eigh(monkeypatch):
    """_tridiagonal_gram_eig returns None when LAPACK reports a failure; the Gram route then takes full eigh
    and still gives the exact answer (the failure is injected: no real input makes dstemr fail on demand)."""
    from opd_dynamics.numerics import decomposition as spectrum

    rng = np.random.default_rng(15)
    s = np.geomspace(4, 0.05, 90)
    M = torch.tensor(planted(90, 300, s, rng))
    calls = []
    monkeypatch.setattr(spectrum, "tridiagonal_gram_eig", lambda *a: calls.append(a) or None)
    dec = decompose(M, k_vectors=8)
    assert calls and dec.method == "exact-gram-f64"
    np.testing.assert_allclose(dec.singular_values.numpy(), s, rtol=1e-9)
    np.testing.assert_allclose((M.T @ dec.U).numpy(), dec.V.numpy() * s[:8], atol=1e-9)


def test_fast_mode_keeps_enough_values_for_the_top_1pct_ratio():
    from opd_dynamics.numerics.decomposition import fast_keep

    assert fast_keep(20, 896) == 64 and fast_keep(80, 896) == 80 and fast_keep(20, 40) == 40
    assert fast_keep(20, 8192) == 82  # a 70B model's 8192-wide matrices: ceil(8192 / 100)


def test_fast_mode_top_1pct_ratio_on_a_70b_wide_matrix():
    """r = 6500: the top-1% ratio needs 65 values, more than the 64 fast mode keeps by default."""
    rng = np.random.default_rng(8)
    s = np.geomspace(1.0, 1e-3, 100)
    U, _ = np.linalg.qr(rng.standard_normal((6500, 100)))
    V, _ = np.linalg.qr(rng.standard_normal((6500, 100)))
    M = torch.tensor((U * s) @ V.T, dtype=torch.float32)
    got = spectrum_metrics(decompose(M, mode="fast"), KS)
    assert got["top1pct_norm_ratio"] == pytest.approx(math.sqrt(np.sum(s[:65] ** 2) / np.sum(s ** 2)), abs=1e-2)
