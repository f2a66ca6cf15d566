"""The decomposition engine: one update matrix's spectrum, an exact float64 decomposition (of the Gram matrix, or
SVD when the Gram route cannot resolve the spectrum) or a labelled randomized top-q one, with its top singular
vectors. The analysis (`analysis.metrics.spectrum` turns it into spectrum.csv's columns), the recorder and the
extrapolators all decompose through `decompose`.

Matrices are (out, in); the caller transposes Conv1D weights. Input may be float32 or float64; all
linear algebra is float64 on the tensor's device (CPU or CUDA).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import blas, lapack, lu
from torch import Tensor

from opd_dynamics import numerics
from opd_dynamics.numerics import upcast

EPS64 = float(torch.finfo(torch.float64).eps)
EPS32 = float(torch.finfo(torch.float32).eps)
#: below this smaller dimension the Gram route saves nothing: use the SVD directly.
MIN_GRAM_DIM = 32
#: the Gram route is kept only when its worst-case error on sum(sigma) stays below this fraction
#: (this bounds the effective-rank error to about 40x that, far inside the 1e-3 policy).
GRAM_L1_TOL = 1e-6

#: a Ritz pair is accepted when its residual and its distance to the exact eigenvalue are below this x lambda_1
RITZ_TOL = 1e-10


@dataclass
class Decomposition:
    """Singular values (and top singular vectors) of one (out, in) matrix, float64 on its device."""

    singular_values: Tensor  # descending: full spectrum when ``full``, else the top q
    U: Tensor | None  # (m, k_vec) top left singular vectors, None for a zero or non-finite matrix
    V: Tensor | None  # (n, k_vec) top right singular vectors
    fro2: float  # exact ||M||_F^2 (also in fast mode); NaN when M has NaN/Inf
    method: str  # 'exact-gram-f64' | 'exact-svd-f64' | 'randomized-q{q}' | 'zero' | 'nonfinite'
    full: bool  # singular_values holds all r = min(m, n) values
    shape: tuple[int, int] = (0, 0)  # (m, n) of the matrix
    rank: int = 0  # numerical rank: values above the route's resolution floor (counted in the top q if not full)

    @property
    def r(self) -> int:
        """min(m, n): the length of the full spectrum."""
        return min(self.shape)


def _check_matrix(m: Tensor) -> None:
    if m.dim() != 2:
        raise ValueError(f"decompose expects a 2-D (out, in) matrix, got shape {tuple(m.shape)}")
    if not (m.is_floating_point()):
        raise ValueError(f"decompose expects a floating-point matrix, got {m.dtype}")


def _unit_columns(X: Tensor) -> Tensor:
    """Normalise columns to length 1; all-zero columns stay zero."""
    n = torch.linalg.vector_norm(X, dim=0)
    return X / torch.where(n > 0, n, torch.ones_like(n))


def _directions(X: Tensor, sig: Tensor, floor: float) -> Tensor:
    """Unit columns of X (sigma_i times a singular vector each); zero where sigma_i <= floor, whose
    direction the route cannot resolve."""
    X[:, sig <= floor] = 0.0
    return _unit_columns(X)


def _svd_route(M: Tensor, k_vec: int) -> Decomposition:
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    tol = max(M.shape) * EPS64 * float(S[0])
    k = min(k_vec, S.numel())
    return Decomposition(S, U[:, :k].contiguous(), Vh[:k].T.contiguous(), 0.0, "exact-svd-f64",
                         True, tuple(M.shape), int((S > tol).sum()))


def _cheb_x(lam: float, a: float, b: float) -> float:
    return (2 * lam - a - b) / (b - a)


def _chebyshev_filter(op, X: Tensor, a: float, b: float, top: float, degree: int) -> Tensor:
    """Scaled Chebyshev filter (Zhou & Saad 2007) of the operator ``op``: damps eigenvalues in [a, b],
    amplifies those above b, scaled so that p(top) = 1 (no overflow)."""
    e, c = (b - a) / 2, (b + a) / 2
    sigma = e / (c - top)
    tau = 2 / sigma
    Y = (op(X) - c * X) * (sigma / e)
    for _ in range(degree - 1):
        sigma_new = 1 / (tau - sigma)
        Y, X = (op(Y) - c * Y) * (2 * sigma_new / e) - (sigma * sigma_new) * X, Y
        sigma = sigma_new
    return Y


def subspace_top(G: Tensor, lam: Tensor, k: int, extra: int = 10, max_products: int = 300,
                  dynamic_range: float = 1e8) -> Tensor | None:
    """Top-k eigenvectors of symmetric PSD G given its exact eigenvalues lam (descending), or None.

    Chebyshev-filtered subspace iteration with locking on a block of k + extra vectors. A Ritz pair is
    locked only when certified: residual ||G x - theta x|| and |theta - lam_i| (its exact eigenvalue
    in order) both below RITZ_TOL * lam_1, so a missed direction cannot pass. Locked vectors are
    deflated (mapped to eigenvalue 0, inside the damped interval). The filter degree is capped so the
    spread between the largest and smallest wanted values stays within ``dynamic_range`` (beyond that
    the small wanted components would drown in rounding). None when not certified within
    ``max_products`` block products with G.
    """
    m = G.shape[0]
    p = min(m, k + extra)
    lam_h = lam.tolist()
    lam1 = lam_h[0]
    if p >= m or lam1 <= 0:
        return None
    a, b = min(lam_h[-1], 0.0), lam_h[p]
    if not lam_h[k - 1] > b * (1 + 1e-3) or b - a <= 1e-14 * lam1:
        return None  # no usable gap between the wanted and the damped parts
    tol = RITZ_TOL * lam1
    gen = torch.Generator(device=G.device).manual_seed(0)
    X = torch.randn(m, p, generator=gen, device=G.device, dtype=G.dtype)
    L = X[:, :0]
    lam_t = lam.to(G.dtype)
    used = 0
    while used < max_products:
        j = L.shape[1]
        lamL = lam_t[:j]

        def op(Y, L=L, lamL=lamL):
            return G @ Y - L @ (lamL[:, None] * (L.T @ Y))

        x_top, x_k = _cheb_x(lam_h[j], a, b), _cheb_x(lam_h[k - 1], a, b)
        spread = math.acosh(x_top) - math.acosh(x_k)
        degree = int(max(1, min(20, math.log(dynamic_range) // max(spread, 1e-12))))
        X = torch.linalg.qr(X - L @ (L.T @ X))[0]
        X = _chebyshev_filter(op, X, a, b, lam_h[j], degree)
        used += degree + 1
        X = torch.linalg.qr(X - L @ (L.T @ X))[0]
        theta, W = torch.linalg.eigh(X.T @ op(X))
        X = X @ W.flip(1)
        theta = theta.flip(0)
        R = G @ X[:, : k - j] - X[:, : k - j] * theta[: k - j]
        ok = (torch.linalg.vector_norm(R, dim=0) <= tol) & ((theta[: k - j] - lam_t[j:k]).abs() <= tol)
        n_ok = int(torch.cumprod(ok.to(torch.int64), 0).sum())  # lock a leading run only
        if n_ok:
            L = torch.cat([L, X[:, :n_ok]], dim=1)
            X = X[:, n_ok:]
            if L.shape[1] >= k:
                return L[:, :k].contiguous()
    return None


VECTOR_ROUTES = ("auto", "tridiagonal", "subspace", "eigh")


def gram_eig(G: Tensor, k: int, vectors: str = "auto") -> tuple[Tensor, Tensor | None]:
    """All eigenvalues of symmetric PSD G (descending) and its top-k eigenvectors (None when k == 0).

    vectors='auto' or 'eigh': one full eigh. On an H100 (torch 2.11, CUDA 13) a 3584-side float64
    eigh takes 94 ms against 87.5 ms for eigvalsh alone, so the vectors cost less than any iteration
    for them: eigvalsh plus the certified subspace iteration took 119-131 ms. 'subspace' uses that
    iteration (an uncertified one falls back to eigh). (On CPU, _gram_route skips G altogether: see
    tridiagonal_gram_eig.)
    """
    if vectors not in ("auto", "subspace", "eigh"):
        raise ValueError(f"vectors must be 'auto', 'subspace' or 'eigh', got {vectors!r}")
    m = G.shape[0]
    k = min(k, m)
    if k == 0:
        return torch.linalg.eigvalsh(G).flip(0), None
    if vectors == "subspace":
        lam = torch.linalg.eigvalsh(G).flip(0)
        Q = subspace_top(G, lam, k)
        if Q is not None:
            return lam, Q
    lam, Q = torch.linalg.eigh(G)
    return lam.flip(0), Q.flip(1)[:, :k].contiguous()


def _top_tridiagonal_vectors(d: np.ndarray, e: np.ndarray, lam: np.ndarray, k: int) -> np.ndarray | None:
    """The eigenvectors of the top k of ``lam`` (all eigenvalues of the tridiagonal (d, e), ascending),
    descending, Fortran-ordered; None when LAPACK fails.

    Inverse iteration from the known eigenvalues (dstein, which reorthogonalises within clusters) is
    4-5x faster than MRRR (dstemr), which finds the eigenvalues again: 11 ms against 45-60 ms for 180
    vectors of an 896-side Gram (the base's top 20%), 1.2 against 8-10 ms for 20. dstemr stays the
    fallback for a cluster inverse iteration cannot separate.
    """
    n = d.size
    block = np.ones(n, dtype=np.int32)
    split = np.zeros(n, dtype=np.int32)
    split[0] = n  # one block: every eigenvalue is one of the whole matrix
    z, info = lapack.dstein(d, e, lam[n - k :], block, split)
    if info == 0:
        return np.array(z[:, ::-1], order="F")
    m, _, z, info = lapack.dstemr(d, np.append(e, 0.0), 3, 0.0, 0.0, n - k + 1, n)  # it overwrites e
    if info != 0 or m != k:
        return None
    return np.array(z[:, k - 1 :: -1], order="F")


def tridiagonal_gram_eig(M: Tensor, left: bool, k: int) -> tuple[Tensor, Tensor | None, Tensor | None] | None:
    """On CPU: the eigenvalues of M's float64 Gram on the ``left`` (M M^T) or right side (descending),
    its top-k eigenvectors Q, and M^T Q (left) or M Q (right) (None, None for k = 0); None when LAPACK
    reports a failure.

    Only what the metrics need is computed: the Gram's lower triangle by BLAS syrk (half the flops of
    a matmul), one tridiagonal reduction (dsytrd), all eigenvalues from it (dsterf), k eigenvectors
    (inverse iteration, then the Householder back-transform, dormqr). All of it, the product with M included, runs
    in one BLAS (scipy's) so the torch and BLAS thread pools do not take turns spinning. On the 2-core
    CPU: 0.085 s for a 4864x896 matrix against 0.16 s for matmul + full eigh, with the same eigenvalues
    (the reduction is the one eigh uses).
    """
    A = M.detach().to("cpu", torch.float64).contiguous().numpy().T  # Fortran-ordered view of M^T
    G = blas.dsyrk(1.0, A, trans=1 if left else 0, lower=1)  # M M^T (left) or M^T M
    n = G.shape[0]
    lwork, info = lapack.dsytrd_lwork(n, lower=1)  # scipy's default lwork = n forces the unblocked code (2x slower)
    c, d, e, tau, info = lapack.dsytrd(G, lower=1, lwork=max(int(lwork), n), overwrite_a=1)
    if info != 0:
        return None
    lam, info = lapack.dsterf(d, e)  # the wrapper copies d and e
    if info != 0:
        return None
    lam_t = torch.from_numpy(lam[::-1].copy())
    k = min(k, n)
    if k == 0:
        return lam_t, None, None
    Z = _top_tridiagonal_vectors(d, e, lam, k)
    if Z is None:
        return None
    if n > 1:  # Q = H(1)...H(n-1); the reflectors are those of a QR of c[1:, :n-1]
        # LAPACK's blocked code needs lwork >= k*nb + (nb+1)*nb (nb = 64); with less it runs the unblocked
        # one (20 vectors of an 896-side Gram: 7.3 ms against 3.8 ms, copies included)
        cq, _, info = lapack.dormqr(b"L", b"N", c[1:, : n - 1], tau, Z[1:], k * 64 + 65 * 64, overwrite_c=1)
        if info != 0:
            return None
        Z[1:] = cq
    other = blas.dgemm(1.0, A, Z) if left else blas.dgemm(1.0, A, Z, trans_a=1)
    return lam_t, torch.from_numpy(np.array(Z, order="C")), torch.from_numpy(np.array(other, order="C"))


def _gram_route(M: Tensor, k_vec: int, vectors: str = "auto") -> Decomposition | None:
    """Eigen-decompose the Gram matrix on the smaller side; None when it cannot resolve the spectrum.

    The eigenvalues of G carry an absolute error of about dl = max(m, n) * eps * lambda_max, so each
    sigma is known to min(sqrt(dl), dl / (2 sigma)). When the sum of those bounds exceeds GRAM_L1_TOL
    of sum(sigma) (exactly low-rank or badly conditioned matrices), the SVD is used instead.
    """
    rows, cols = M.shape
    left = rows <= cols
    eig = None
    if vectors == "tridiagonal" or (vectors == "auto" and not M.is_cuda):
        eig = tridiagonal_gram_eig(M, left, k_vec)
        if eig is not None:
            eig = tuple(None if x is None else x.to(M.device) for x in eig)
    if eig is None:
        G = M @ M.T if left else M.T @ M
        eig = (*gram_eig(G, k_vec, "eigh" if vectors == "tridiagonal" else vectors), None)
    lam, Q, other = eig  # descending; other = M^T Q or M Q when the route formed it
    lam = lam.clamp_min(0)
    sig = lam.sqrt()
    dl = max(rows, cols) * EPS64 * float(lam[0])
    floor = math.sqrt(dl)
    bound = float(torch.minimum(torch.full_like(sig, floor), dl / (2 * sig)).sum())
    if bound > GRAM_L1_TOL * float(sig.sum()):
        return None
    rank = int((sig > floor).sum())
    U = V = None
    if Q is not None:
        k = min(k_vec, sig.numel())
        Qk = Q[:, :k]
        if other is None:
            other = M.T @ Qk if left else M @ Qk  # = sigma_i * (v_i or u_i)
        other = _directions(other, sig[:k], floor)
        U, V = (Qk.contiguous(), other) if left else (other, Qk.contiguous())
    return Decomposition(sig, U, V, 0.0, "exact-gram-f64", True, (rows, cols), rank)


def _range_sketch_cpu(M: Tensor, q: int, niter: int, k: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Halko-Martinsson-Tropp randomized SVD of M on the CPU in scipy's BLAS, float64: the top q values,
    the top k left singular vectors, and the top k right ones scaled by their values.

    The same algorithm as torch.svd_lowrank (Gaussian sketch, ``niter`` power iterations, one QR, the SVD of
    the q x n projection), but the products run in scipy's BLAS on all its threads (torch keeps one thread
    where spectra run: see engine), the power iterations are normalised by LU instead of QR (the span is
    what matters; as scikit-learn does), and the projection's SVD comes from its q x q Gram in float64. On
    the 2-core CPU, a 4864x896 float32 matrix with q = 74: 38 ms against 70 ms for torch.svd_lowrank, the
    same top-64 energies to 1e-6.
    """
    A = M.detach().numpy()
    f = "s" if A.dtype == np.float32 else "d"
    gemm = getattr(blas, f + "gemm")
    At = A.T  # Fortran-ordered view of M^T: BLAS reads M without a copy
    n = At.shape[0]
    Y = gemm(1.0, At, np.asfortranarray(np.random.default_rng(seed).standard_normal((n, q)).astype(A.dtype)),
             trans_a=1)  # M Omega, (m, q)
    def basis(X: np.ndarray) -> np.ndarray:  # P L of X = P L U: the same span, well conditioned
        return lu(X, permute_l=True, overwrite_a=True, check_finite=False)[0]

    for _ in range(niter):
        Z = gemm(1.0, At, basis(Y))  # M^T Y
        Y = gemm(1.0, At, basis(Z), trans_a=1)
    Q = np.asfortranarray(torch.linalg.qr(torch.from_numpy(Y))[0].numpy())  # torch's QR: 3.5 vs 7.6 ms
    Bt = gemm(1.0, At, Q).astype(np.float64, order="F")  # (Q^T M)^T, (n, q)
    w, W, info = lapack.dsyevd(blas.dsyrk(1.0, Bt, trans=1, lower=1), lower=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"dsyevd failed (info={info}) in the randomized SVD")
    s = np.sqrt(np.clip(w[::-1], 0.0, None))
    W = np.asfortranarray(W[:, ::-1][:, :k])
    U = blas.dgemm(1.0, Q.astype(np.float64, order="F"), W)
    V = blas.dgemm(1.0, Bt, W)  # = sigma_i v_i: the caller makes them directions
    return torch.from_numpy(s), torch.from_numpy(np.ascontiguousarray(U)), torch.from_numpy(np.ascontiguousarray(V))


def fast_keep(k_vec: int, r: int) -> int:
    """How many top values fast mode keeps: 64 (energy_top64), k_vec, or ceil(r/100) when more (the top-1%
    ratio of matrices with r > 6400, e.g. a 70B model's 8192-wide ones), at most r."""
    return min(max(k_vec, 64, -(-r // 100)), r)


def _randomized_route(M: Tensor, k_vec: int, oversample: int, niter: int, seed: int) -> Decomposition:
    """Randomized top-q decomposition in the input's precision (float32 for float32 deltas: the sketch only
    has to meet the 1e-2 fast-mode policy), results returned in float64: torch.svd_lowrank on CUDA,
    _range_sketch_cpu on the CPU."""
    r = min(M.shape)
    keep = fast_keep(k_vec, r)
    q = min(keep + oversample, r)
    k = min(k_vec, keep)
    tol_rel = max(M.shape) * float(torch.finfo(M.dtype).eps)
    if M.device.type == "cpu":
        S, U, V = _range_sketch_cpu(M, q, niter, k, seed)
        V = _directions(V, S[:k], tol_rel * float(S[0]))
    else:
        with torch.random.fork_rng(devices=[M.device]):
            torch.manual_seed(seed)
            U, S, V = torch.svd_lowrank(M, q=q, niter=niter)
    S, U, V = (x.to(torch.float64) for x in (S[:keep], U[:, :k], V[:, :k]))
    tol = tol_rel * float(S[0])
    return Decomposition(S.contiguous(), U.contiguous(), V.contiguous(), 0.0,
                         f"randomized-q{q}", False, tuple(M.shape), int((S > tol).sum()))


def decompose(m: Tensor, k_vectors: int = 20, mode: str = "exact", oversample: int = 10,
              niter: int = 2, *, exact_method: str = "auto", vectors: str = "auto",
              seed: int = 0) -> Decomposition:
    """Decompose one (out, in) matrix in float64 on its device.

    mode='exact': the float64 Gram on the smaller side ('exact-gram-f64'); the float64 SVD
    ('exact-svd-f64') when min(m, n) < MIN_GRAM_DIM or the Gram route cannot resolve the spectrum
    (see _gram_route). ``exact_method`` 'gram' | 'svd' forces a route ('gram' still falls back when
    unsafe). ``vectors`` picks how the Gram route gets its eigenpairs: 'auto' is 'tridiagonal' on CPU
    (see tridiagonal_gram_eig) and one eigh on CUDA; 'subspace' and 'eigh' are gram_eig's.
    mode='fast': a randomized SVD (see _randomized_route) keeping the top fast_keep(k_vectors, r) values
    from q = that + oversample (seeded, so reproducible; float32 for float32 input),
    full=False. ``rank`` counts the values above max(m, n) * eps * sigma_1 (numpy's matrix_rank), with
    the input's eps: float32's for anything narrower than float64, the precision updates are formed in.
    k_vectors=0 skips the singular vectors (eigvalsh only in exact mode). A matrix with
    NaN/Inf gives method 'nonfinite' (all NaN, never raises); a zero matrix gives method 'zero' (all
    zeros, no vectors).
    """
    _check_matrix(m)
    if mode not in ("exact", "fast"):
        raise ValueError(f"decompose: mode must be 'exact' or 'fast', got {mode!r}")
    if exact_method not in ("auto", "gram", "svd"):
        raise ValueError(f"decompose: exact_method must be 'auto', 'gram' or 'svd', got {exact_method!r}")
    if vectors not in VECTOR_ROUTES:
        raise ValueError(f"decompose: vectors must be one of {', '.join(VECTOR_ROUTES)}, got {vectors!r}")
    M = upcast(m, torch.float32 if (mode == "fast" and m.dtype != torch.float64) else torch.float64)
    shape = (int(M.shape[0]), int(M.shape[1]))
    r = min(shape)
    fro2 = numerics.fro2(m) if m.numel() else 0.0  # on the input: the fused kernel reads float32 as is
    # squares of finite float32/bf16 values cannot overflow a float64 sum, so a finite fro2 proves them all
    # finite; float64 input needs the elementwise check
    if not math.isfinite(fro2) or (m.dtype == torch.float64 and not bool(torch.isfinite(M).all())):
        n = r if mode == "exact" else fast_keep(k_vectors, r)
        return Decomposition(torch.full((n,), math.nan, dtype=torch.float64, device=M.device),
                             None, None, math.nan, "nonfinite", False, shape, 0)
    if fro2 == 0.0:
        return Decomposition(torch.zeros(r, dtype=torch.float64, device=M.device), None, None, 0.0,
                             "zero", True, shape, 0)
    if mode == "fast":
        dec = _randomized_route(M, k_vectors, oversample, niter, seed)
    else:
        dec = None
        if exact_method == "gram" or (exact_method == "auto" and r >= MIN_GRAM_DIM):
            dec = _gram_route(M, k_vectors, vectors)
        if dec is None:
            dec = _svd_route(M, k_vectors)
            if k_vectors == 0:
                dec.U = dec.V = None
        if m.dtype != torch.float64:  # float32 rounding in forming m (a LoRA B @ A) is not rank
            tol = max(shape) * EPS32 * float(dec.singular_values[0])
            dec.rank = min(dec.rank, int((dec.singular_values > tol).sum()))
    dec.fro2 = fro2
    return dec
