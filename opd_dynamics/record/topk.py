"""Top-k singular triplets of an update that changes a little every step, found from products with ΔW alone.

`certified_topk` (the recorder's default, ``svd="certified"``): block Lanczos on the Gram of ΔW's smaller side,
applied as two products (ΔW X, then ΔWᵀ of that: m·n·b flops per block of b columns; the m × m Gram is never
formed), with full reorthogonalisation and Rayleigh–Ritz over the whole Krylov basis, started from the previous
step's top Ritz vectors plus a few fresh Gaussian columns. It stops when every kept triplet is certified: with v_i a
Ritz vector, σ̃_i² its Ritz value and u_i = ΔW v_i / σ̃_i (so ΔW v_i − σ̃_i u_i = 0 exactly), the other residual s_i
= ΔWᵀ u_i − σ̃_i v_i gives, for the unit vector (u_i, v_i)/√2 of the symmetric matrix [[0, ΔW], [ΔWᵀ, 0]] (whose
eigenvalues are ±σ_j), the residual ‖s_i‖/√2; by Weyl's theorem (the Bauer–Fike bound for a symmetric matrix) a
singular value σ of ΔW lies within ε_i = ‖s_i‖/√2 of σ̃_i. Accepted when ε_i ≤ ``tol`` · σ̃_i for every kept i
(default 5e-7, so that the float32 storage of the sketch, 6e-8, keeps the stored values within 1e-6 of a float64
SVD's). Values at or below max(m, n)·ε32·σ̃_1 (what a float32-formed update resolves: the exact route's rank floor)
are not kept, and are shown by their residuals to be below twice that, so that fewer than k kept means the rest of
the spectrum is below resolution. Ritz values are also lower bounds of the ordered singular values (Cauchy
interlacing: σ̃_i ≤ σ_i), so the bound is one-sided in practice. What no residual can show is that no larger
singular value was missed altogether (a direction the start has no component along); that is what the block's extra
columns, the fresh random ones each step and the Krylov growth guard against, as in any Krylov solver; the tests
plant clustered and degenerate spectra. When the basis would pass ``max_basis`` columns (the caller sets it where
the products would cost about what the exact decomposition costs), or when the rate at which the bound has fallen
over the last block says it would (with half the cap again to spare: the rate improves as the basis grows), it gives
up (a result not ``certified``): the caller falls back to the exact route.

`warm_topk` (``svd="fast"``): the older warm-started randomized range finder, a fixed number of iterations and no
certificate (its tail values are approximate, see docs/BENCHMARKS.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

#: a Ritz value at or below this fraction × max(m, n) of σ̃_1 is below what a float32-formed update resolves
#: (the exact route's numerical rank for float32 input, `numerics.decomposition.decompose`)
EPS32 = float(torch.finfo(torch.float32).eps)
#: the default certified relative bound on each kept σ
CERTIFY_TOL = 5e-7


@dataclass
class TopK:
    """The certified top triplets: U (m × k'), S (k', descending), V (n × k'); ``basis``: the top Ritz vectors of
    the smaller side to start the next step from; ``products``: block products with ΔW or ΔWᵀ; ``bound``: the
    largest certified ε_i / σ̃_i (0 when none is kept). Not ``certified``: U, S, V and basis are None, and the
    products and columns say what the try cost."""

    U: Tensor | None
    S: Tensor | None
    V: Tensor | None
    basis: Tensor | None
    products: int
    columns: int
    bound: float
    certified: bool = True


def _orth_against(X: Tensor, Q: Tensor | None, scale: float) -> Tensor:
    """Orthonormal columns spanning X's part outside span(Q) (classical Gram–Schmidt twice, then QR); columns whose
    remainder is at rounding level of ``scale`` are dropped (the Krylov space has become invariant there)."""
    for _ in range(2):
        if Q is not None and Q.shape[1]:
            X = X - Q @ (Q.T @ X)
    q, r = torch.linalg.qr(X)
    keep = r.diagonal().abs() > 1e-10 * scale
    q = q[:, keep]
    if Q is not None and Q.shape[1] and q.shape[1]:  # once more against Q after dropping: orthogonal to 1e-15
        q = torch.linalg.qr(q - Q @ (Q.T @ q)).Q
    return q


def certified_topk(delta: Tensor, k: int, start: Tensor | None, *, extra: int = 8, fresh: int = 4,
                   tol: float = CERTIFY_TOL, max_basis: int | None = None, seed: int = 0) -> TopK:
    """Top-k triplets of ``delta`` (float64, m × n) certified to ``tol`` (module docstring), or a TopK that is not
    ``certified`` when the Krylov basis would pass ``max_basis`` columns first. ``start``: the previous step's
    ``basis`` (d × b, d the smaller side), or None; ``extra`` columns beyond k in each block, ``fresh`` of them new
    Gaussian ones."""
    m, n = delta.shape
    right = n <= m  # Krylov vectors on the smaller side: the right singular vectors when n ≤ m
    A = delta if right else delta.T  # big × d
    d = A.shape[1]
    b = min(k + extra, d)
    cap = d if max_basis is None else min(max_basis, d)
    g = torch.Generator(device=delta.device).manual_seed(seed)
    cols = []
    if start is not None and start.shape[0] == d and start.shape[1]:
        cols.append(start[:, : max(0, b - fresh)].to(delta.dtype))
    width = b - (cols[0].shape[1] if cols else 0)
    cols.append(torch.randn(d, width, generator=g, device=delta.device, dtype=delta.dtype))
    X = torch.cat(cols, 1)
    scale = float(torch.linalg.matrix_norm(A)) or 1.0
    Q = _orth_against(X, None, float(torch.linalg.vector_norm(X, dim=0).max()))
    Qs, Ps, Ws = [], [], []  # the basis, ΔW times it and the Gram times it, block by block
    products = 0
    worst: list[float] = []  # the largest ε_i / σ̃_i after each block
    while True:
        P = A @ Q
        W = A.T @ P
        products += 2
        Qs.append(Q), Ps.append(P), Ws.append(W)
        Qa, Wa = torch.cat(Qs, 1), torch.cat(Ws, 1)
        H = Qa.T @ Wa
        theta, Y = torch.linalg.eigh((H + H.T) / 2)
        theta, Y = theta.flip(0), Y.flip(1)
        kk = min(k, theta.numel())
        sig = theta[:kk].clamp_min(0).sqrt()
        floor = max(m, n) * EPS32 * float(sig[0]) if kk else 0.0
        keep = int((sig > floor).sum()) if kk and sig[0] > 0 else 0
        R = Wa @ Y[:, :kk] - Qa @ (Y[:, :kk] * theta[:kk])  # Gram · v_i − σ̃_i² v_i = σ̃_i s_i
        rho = torch.linalg.vector_norm(R, dim=0)
        Yk = Y[:, :keep]
        eps = rho[:keep] / (math.sqrt(2) * sig[:keep])  # ε_i = ‖s_i‖ / √2
        rel = eps / sig[:keep]
        nxt = None
        # the kept values certified to tol; those below the resolution floor shown to be below twice it (an
        # eigenvalue of the Gram lies within ρ_i of θ_i), so that fewer than k kept means the rest is below it
        below = (theta[keep:kk].clamp_min(0) + rho[keep:kk]).sqrt() <= 2 * floor
        certified = bool((rel <= tol).all()) and bool(below.all())
        if not certified:
            nxt = _orth_against(W, Qa, scale * scale)
            if nxt.shape[1] == 0:  # nothing new at rounding level, yet not certified: leave it to the exact route
                return _failed(products, Qa.shape[1], rel)
        if certified:
            V = Qa @ Yk
            U = torch.cat(Ps, 1) @ Yk
            U = U / torch.linalg.vector_norm(U, dim=0).clamp_min(torch.finfo(U.dtype).tiny)
            U, V = (U, V) if right else (V, U)
            basis = Qa @ Y[:, : min(b, Y.shape[1])]
            return TopK(U, sig[:keep], V, basis, products, Qa.shape[1],
                        float(rel.max()) if keep else 0.0)
        if Qa.shape[1] + nxt.shape[1] > cap:
            return _failed(products, Qa.shape[1], rel)
        worst.append(float(rel.max()))
        if len(worst) >= 2 and worst[-1] < worst[-2]:  # give up early when its rate will not reach tol in the cap
            blocks = math.log(tol / worst[-1]) / math.log(worst[-1] / worst[-2])
            if Qa.shape[1] + blocks * b > cap * 1.5:
                return _failed(products, Qa.shape[1], rel)
        Q = nxt


def _failed(products: int, columns: int, rel: Tensor) -> TopK:
    return TopK(None, None, None, None, products, columns, float(rel.max()) if rel.numel() else math.nan, False)


def warm_topk(delta: Tensor, k: int, start: Tensor | None, oversample: int = 8, power: int = 1,
              seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A randomized range finder started from the previous step's right singular subspace, so that consecutive
    steps continue one subspace iteration (``svd="fast"``; no certificate). At the lab's matrices (128 × 256) 0.3
    ms against 1.3–2 ms for a full float32 SVD; at 4864 × 896, 19 ms against 0.5 s. Each step adds ``power``
    iterations to the ones the earlier steps did; a first step (or a shape change) starts from a seeded Gaussian
    with ``power + 2`` iterations. The energies divide by the exact ‖ΔW‖F² computed apart. Returns (U (m × k'),
    S (k'), V (n × k'), the basis to start the next step from (n × l)), k' = min(k, m, n)."""
    m, n = delta.shape
    width = min(k + oversample, m, n)
    if start is None or start.shape != (n, width):
        g = torch.Generator(device=delta.device).manual_seed(seed)
        start = torch.randn(n, width, generator=g, device=delta.device, dtype=delta.dtype)
        power += 2
    x = start.to(delta.dtype)
    y = delta @ x
    for _ in range(power):
        x = torch.linalg.qr(delta.T @ torch.linalg.qr(y).Q).Q
        y = delta @ x
    q = torch.linalg.qr(y).Q
    ub, s, vh = torch.linalg.svd(q.T @ delta, full_matrices=False)
    kk = min(k, s.shape[0])
    v = vh.T
    return q @ ub[:, :kk], s[:kk], v[:, :kk], v
