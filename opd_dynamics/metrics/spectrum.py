"""Spectrum of one update matrix: an exact float64 decomposition (Gram + eigh, or SVD when the Gram
route cannot resolve the spectrum) or a labelled randomized top-q one, and the spectrum.csv columns.

Matrices are (out, in); the caller transposes Conv1D weights. Input may be float32 or float64; all
linear algebra is float64 on the tensor's device (CPU or CUDA).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

EPS64 = float(torch.finfo(torch.float64).eps)
#: below this smaller dimension the Gram route saves nothing: use the SVD directly.
MIN_GRAM_DIM = 32
#: the Gram route is kept only when its worst-case error on sum(sigma) stays below this fraction
#: (this bounds the effective-rank error to about 40x that, far inside the 1e-3 policy).
GRAM_L1_TOL = 1e-6
DEFAULT_KS = (1, 4, 16, 64)


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


def _fro2(M: Tensor) -> float:
    return float(torch.linalg.vector_norm(M)) ** 2


def _unit_columns(X: Tensor) -> Tensor:
    """Normalise columns to length 1; all-zero columns stay zero."""
    n = torch.linalg.vector_norm(X, dim=0)
    return X / torch.where(n > 0, n, torch.ones_like(n))


def _svd_route(M: Tensor, k_vec: int) -> Decomposition:
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    tol = max(M.shape) * EPS64 * float(S[0])
    k = min(k_vec, S.numel())
    return Decomposition(S, U[:, :k].contiguous(), Vh[:k].T.contiguous(), 0.0, "exact-svd-f64",
                         True, tuple(M.shape), int((S > tol).sum()))


def _gram_route(M: Tensor, k_vec: int) -> Decomposition | None:
    """Eigen-decompose the Gram matrix on the smaller side; None when it cannot resolve the spectrum.

    The eigenvalues of G carry an absolute error of about dl = max(m, n) * eps * lambda_max, so each
    sigma is known to min(sqrt(dl), dl / (2 sigma)). When the sum of those bounds exceeds GRAM_L1_TOL
    of sum(sigma) (exactly low-rank or badly conditioned matrices), the SVD is used instead.
    """
    rows, cols = M.shape
    left = rows <= cols
    G = M @ M.T if left else M.T @ M
    if k_vec > 0:
        lam, Q = torch.linalg.eigh(G)
        Q = Q.flip(1)
    else:
        lam, Q = torch.linalg.eigvalsh(G), None
    lam = lam.flip(0).clamp_min(0)
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
        other = M.T @ Qk if left else M @ Qk  # = sigma_i * (v_i or u_i)
        other[:, sig[:k] <= floor] = 0.0  # directions of unresolved values are not defined
        other = _unit_columns(other)
        U, V = (Qk.contiguous(), other) if left else (other, Qk.contiguous())
    return Decomposition(sig, U, V, 0.0, "exact-gram-f64", True, (rows, cols), rank)


def _randomized_route(M: Tensor, k_vec: int, oversample: int, niter: int, seed: int) -> Decomposition:
    r = min(M.shape)
    keep = min(max(k_vec, 64), r)
    q = min(max(k_vec, 64) + oversample, r)
    devices = [M.device] if M.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(M, q=q, niter=niter)
    S, U, V = S[:keep], U[:, :keep], V[:, :keep]
    tol = max(M.shape) * EPS64 * float(S[0])
    k = min(k_vec, keep)
    return Decomposition(S.contiguous(), U[:, :k].contiguous(), V[:, :k].contiguous(), 0.0,
                         f"randomized-q{q}", False, tuple(M.shape), int((S > tol).sum()))


def decompose(m: Tensor, k_vectors: int = 20, mode: str = "exact", oversample: int = 10,
              niter: int = 2, *, exact_method: str = "auto", seed: int = 0) -> Decomposition:
    """Decompose one (out, in) matrix in float64 on its device.

    mode='exact': Gram + eigh on the smaller side ('exact-gram-f64'); the float64 SVD
    ('exact-svd-f64') when min(m, n) < MIN_GRAM_DIM or the Gram route cannot resolve the spectrum
    (see _gram_route). ``exact_method`` 'gram' | 'svd' forces a route ('gram' still falls back when
    unsafe). mode='fast': torch.svd_lowrank with q = max(k_vectors, 64) + oversample (seeded, so
    reproducible), keeping the top max(k_vectors, 64) values, full=False. k_vectors=0 skips the
    singular vectors (eigvalsh only). A matrix with NaN/Inf gives method 'nonfinite' (all NaN,
    never raises); a zero matrix gives method 'zero' (all zeros, no vectors).
    """
    _check_matrix(m)
    if mode not in ("exact", "fast"):
        raise ValueError(f"decompose: mode must be 'exact' or 'fast', got {mode!r}")
    if exact_method not in ("auto", "gram", "svd"):
        raise ValueError(f"decompose: exact_method must be 'auto', 'gram' or 'svd', got {exact_method!r}")
    M = m.to(torch.float64)
    shape = (int(M.shape[0]), int(M.shape[1]))
    r = min(shape)
    fro2 = _fro2(M) if M.numel() else 0.0
    if not math.isfinite(fro2) or not bool(torch.isfinite(M).all()):
        n = r if mode == "exact" else min(max(k_vectors, 64), r)
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
            dec = _gram_route(M, k_vectors)
        if dec is None:
            dec = _svd_route(M, k_vectors)
            if k_vectors == 0:
                dec.U = dec.V = None
    dec.fro2 = fro2
    return dec


def _energy_cum(s: np.ndarray, fro2: float) -> np.ndarray:
    return np.minimum(np.cumsum(s * s) / fro2, 1.0)


def spectrum_metrics(dec: Decomposition, ks=DEFAULT_KS) -> dict:
    """spectrum.csv columns for one decomposition (definitions in DESIGN.md).

    Energies divide by the exact ||M||_F^2 and are capped at 1; energy_top{k} is 1 when k >= r and NaN
    when k exceeds the values a fast decomposition holds. effective_rank needs the full spectrum (NaN
    otherwise); rank90 is NaN only when a top-q spectrum never reaches 0.9. A zero matrix gives
    spectral_norm 0, ranks 0 and NaN ratios/energies; a non-finite one gives NaN everywhere.
    """
    nan = math.nan
    keys = ["spectral_norm", "spectral_ratio", "stable_rank", "effective_rank", "top1pct_norm_ratio",
            *[f"energy_top{k}" for k in ks], "rank90"]
    out: dict = dict.fromkeys(keys, nan)
    out["svd_method"] = dec.method
    fro2, r = dec.fro2, dec.r
    if not math.isfinite(fro2):
        return out
    if fro2 == 0.0:
        out.update(spectral_norm=0.0, stable_rank=0.0, effective_rank=0.0, rank90=0)
        return out
    s = dec.singular_values.detach().to("cpu", torch.float64).numpy()
    s1 = float(s[0])
    out["spectral_norm"] = s1
    out["spectral_ratio"] = s1 / math.sqrt(fro2)
    out["stable_rank"] = fro2 / (s1 * s1)
    if dec.full:
        p = s[s > 0] / s.sum()
        out["effective_rank"] = float(math.exp(-np.sum(p * np.log(p))))
    cum = _energy_cum(s, fro2)
    k1 = -(-r // 100)
    if k1 <= s.size:
        out["top1pct_norm_ratio"] = math.sqrt(float(cum[k1 - 1]))
    for k in ks:
        if k >= r:
            out[f"energy_top{k}"] = 1.0
        elif k <= s.size:
            out[f"energy_top{k}"] = float(cum[k - 1])
    hit = np.nonzero(cum >= 0.9 * (1 - 1e-12))[0]
    if hit.size:
        out["rank90"] = int(hit[0]) + 1
    elif dec.full:  # rounding kept the total just under 0.9 of fro2: all r values are needed
        out["rank90"] = r
    return out


def top_singular_values(dec: Decomposition, n: int = 64) -> Tensor:
    """The n largest singular values (fewer if the decomposition holds fewer), float64 on CPU."""
    return dec.singular_values[:n].detach().to("cpu", torch.float64)
