"""Float64 numpy reference implementations of the docs/METRICS.md metrics, deliberately simple.

Straight from the formulas with np.linalg.svd; used by tests/test_metrics_*.py to check the fast kernels.
Also the planted-matrix builders the tests share.
"""

from __future__ import annotations

import math

import numpy as np


def random_orthogonal(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """An (n, k) matrix with orthonormal columns, Haar-distributed."""
    q, r = np.linalg.qr(rng.standard_normal((n, k)))
    return q * np.sign(np.diag(r))


def planted(m: int, n: int, s, rng: np.random.Generator, U=None, V=None) -> np.ndarray:
    """U diag(s) V^T with random orthonormal U (m, len(s)) and V (n, len(s)) unless given."""
    s = np.asarray(s, dtype=np.float64)
    U = random_orthogonal(m, s.size, rng) if U is None else U
    V = random_orthogonal(n, s.size, rng) if V is None else V
    return (U * s) @ V.T


def ref_norms(w0: np.ndarray, wt: np.ndarray) -> dict:
    w0 = np.asarray(w0, np.float64)
    wt = np.asarray(wt, np.float64)
    d = wt - w0
    f = np.sqrt(np.sum(d * d))
    b = np.sqrt(np.sum(w0 * w0))
    changed = np.abs(d) > 1e-3 * np.maximum(np.abs(w0), np.abs(wt))
    return {"update_norm": f, "base_norm": b, "relative_update": f / b, "rms_update": f / np.sqrt(d.size),
            "changed_fraction": changed.mean(), "finite": bool(np.isfinite(w0).all() and np.isfinite(wt).all())}


def ref_spectrum(M: np.ndarray, ks=(1, 4, 16, 64)) -> dict:
    M = np.asarray(M, np.float64)
    s = np.linalg.svd(M, compute_uv=False)
    r = min(M.shape)
    F2 = np.sum(M * M)
    p = s / s.sum()
    p = p[p > 0]
    e = np.cumsum(s**2) / F2
    out = {"spectral_norm": s[0], "spectral_ratio": s[0] / np.sqrt(F2), "stable_rank": F2 / s[0] ** 2,
           "effective_rank": np.exp(-np.sum(p * np.log(p))),
           "top1pct_norm_ratio": np.sqrt(np.sum(s[: math.ceil(r / 100)] ** 2) / F2),
           "rank90": int(np.argmax(e >= 0.9)) + 1}
    for k in ks:
        out[f"energy_top{k}"] = np.sum(s[:k] ** 2) / F2
    return out


def ref_singular_values(M: np.ndarray) -> np.ndarray:
    return np.linalg.svd(np.asarray(M, np.float64), compute_uv=False)


def ref_principal_angles_deg(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Principal angles in degrees, ascending, between spans of orthonormal A and B (same width)."""
    c = np.linalg.svd(A.T @ B, compute_uv=False)
    return np.degrees(np.arccos(np.clip(c, -1.0, 1.0)))


def ref_alignment(Dt: np.ndarray, DT: np.ndarray, k: int = 16, K: int = 20) -> dict:
    Ut, _, Vth = np.linalg.svd(np.asarray(Dt, np.float64), full_matrices=False)
    UT, _, VTh = np.linalg.svd(np.asarray(DT, np.float64), full_matrices=False)
    Vt, VT = Vth.T, VTh.T
    ang = ref_principal_angles_deg(Ut[:, :k], UT[:, :k])
    cos = np.abs(np.sum(Ut[:, :K] * UT[:, :K], axis=0))
    return {"subspace_overlap_u": np.sum((Ut[:, :k].T @ UT[:, :k]) ** 2) / k,
            "subspace_overlap_v": np.sum((Vt[:, :k].T @ VT[:, :k]) ** 2) / k,
            "max_principal_angle_deg": ang.max(), "paired_cosine": cos.mean(), "rank1_cosine": cos[0],
            "direction_cosine": np.sum(Dt * DT) / (np.linalg.norm(Dt) * np.linalg.norm(DT))}


def ref_geometry(W0: np.ndarray, Wt: np.ndarray, pcts=(1, 5, 10, 20)) -> dict:
    W0 = np.asarray(W0, np.float64)
    Wt = np.asarray(Wt, np.float64)
    D = Wt - W0
    r = min(W0.shape)
    U0, s0, V0h = np.linalg.svd(W0, full_matrices=False)
    Ut, st, _ = np.linalg.svd(Wt, full_matrices=False)
    F2 = np.sum(D * D)
    out = {}
    for p in pcts:
        k = math.ceil(p * r / 100)
        out[f"principal_energy_{p}pct"] = np.sum((U0[:, :k].T @ D @ V0h[:k].T) ** 2) / F2
    k1 = math.ceil(r / 100)
    out["principal_rotation_deg"] = ref_principal_angles_deg(U0[:, :k1], Ut[:, :k1]).mean()
    out["spectral_drift"] = np.linalg.norm(st - s0) / np.linalg.norm(s0)
    return out


def ref_embedding(E0: np.ndarray, Et: np.ndarray, token_ids=None) -> dict:
    n = min(E0.shape[0], Et.shape[0])
    a = np.asarray(E0[:n], np.float64)
    b = np.asarray(Et[:n], np.float64)
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    out = {"n_rows": n, "resized": E0.shape[0] != Et.shape[0], "cosine_mean": cos.mean(),
           "cosine_p5": np.percentile(cos, 5), "cosine_min": cos.min(),
           "cosine_tokens_mean": math.nan}
    if token_ids is not None:
        ids = [i for i in token_ids if i < n]
        out["cosine_tokens_mean"] = cos[ids].mean()
    return out


def ref_trajectory(deltas: list[np.ndarray], steps: list[int]) -> tuple[dict, list[dict]]:
    """Trajectory metrics of one matrix from its whole updates D_t (float64, in memory), as docs/METRICS.md
    defines them: the straightforward computation the streamed one must equal."""
    D = np.stack([d.reshape(-1) for d in deltas])  # (n, numel)
    t = np.asarray(steps, dtype=np.float64)
    inc = np.diff(np.vstack([np.zeros((1, D.shape[1])), D]), axis=0)
    seg = [float(inc[i] @ inc[i + 1] / np.linalg.norm(inc[i]) / np.linalg.norm(inc[i + 1]))
           for i in range(len(t) - 1)] + [np.nan]
    cos = [float(D[i] @ D[-1] / np.linalg.norm(D[i]) / np.linalg.norm(D[-1])) for i in range(len(t))]
    cum = np.cumsum((inc ** 2).sum(1))  # the random walk with these segment norms: docs/METRICS.md
    null = list(np.sqrt(cum / cum[-1]))
    # per entry: least-squares line through (0, 0) and (t_i, D_i)
    ts = np.concatenate([[0.0], t])
    Y = np.vstack([np.zeros((1, D.shape[1])), D])
    X = np.stack([np.ones_like(ts), ts], axis=1)
    coef, *_ = np.linalg.lstsq(X, Y, rcond=None)
    res = ((Y - X @ coef) ** 2).sum(0)
    tot = ((Y - Y.mean(0)) ** 2).sum(0)
    moved = tot > 0
    lam = np.sort(np.linalg.svd(D, compute_uv=False) ** 2)[::-1]
    summary = {"n_steps": len(t), "linear_r2": 1 - res[moved].sum() / tot[moved].sum(),
               "linear_r2_median": float(np.median(1 - res[moved] / tot[moved]))}
    for k in range(1, 6):
        summary[f"rank{k}_share"] = lam[:k].sum() / lam.sum()
    rows = [{"step": int(s), "segment_cosine": g, "direction_cosine": c, "null_cosine": z,
             "direction_excess": c - z} for s, g, c, z in zip(steps, seg, cos, null)]
    return summary, rows
