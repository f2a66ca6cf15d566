"""The shape of a training trajectory, per matrix: how straight (segment cosines, a per-entry linear fit in
time), how low-rank (the share of the stacked updates' energy in their top 1 … 5 directions, RELEX's rank-1
trajectory), and when its direction locks in (alignment to the final update above the random-walk null).

Every one of these has a null beside it, from the run itself: a random walk with the same checkpoints and the same
measured segment norms ‖δ_i‖ (each δ_i in an independent uniformly random direction of the matrix's space).
- direction_cosine: in closed form, cos(D_t, D_T) → sqrt(Σ_{i≤t}‖δ_i‖² / Σ_{i≤T}‖δ_i‖²) (`cosine_null`;
  √(t/T) only when the segments are equal);
- segment_cosine: 0 (its spread is 1/√numel);
- rank{k}_share and linear_r2: simulated (`random_walk_nulls`): NULL_DRAWS Gram matrices of such walks, drawn
  exactly for the matrix's number of entries (Bartlett's Wishart construction, so the cost does not grow with
  the matrix), seed NULL_SEED, the mean over the draws; linear_r2_median from NULL_ENTRIES simulated entries.

Steps t_0 = 0 (the base) < t_1 < … < t_n; D_i = W_{t_i} − W_0; increments δ_i = D_i − D_{i−1}. A
`TrajectoryAccumulator` takes the updates a row block at a time, as an (n, block) float64 array, so memory
holds one block of every step (and a few float64 working copies of it), the n × n Gram G_ij = ⟨D_i, D_j⟩
and a fixed histogram of per-entry R², never the whole stacked trajectory.
Definitions: docs/METRICS.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from opd_dynamics.numerics import LOCKIN_MARGIN, LOCKIN_THRESHOLD, locked_in
from opd_dynamics.schema import RANK_SHARE_KS

#: bins of the per-entry R² histogram: its median is exact to half a bin, 2^-21 < 5e-7, in constant memory
R2_BINS = 1 << 20
#: the simulated nulls: NULL_DRAWS random walks per matrix for up to NULL_FULL_STEPS steps, fewer beyond (the cost
#: grows as n³: NULL_DRAWS·(NULL_FULL_STEPS/n)³, at least NULL_MIN_DRAWS; the draws' spread is small: rank1_share's
#: sd over draws is 0.002 at 15 steps and 16384 entries), seeded by NULL_SEED (the same draws for every matrix of
#: a shape: reproducible in any order)
NULL_DRAWS = 200
NULL_FULL_STEPS = 32
NULL_MIN_DRAWS = 16
NULL_SEED = 0
#: simulated entries for the null of linear_r2_median (the median of per-entry R²)
NULL_ENTRIES = 1 << 14


def cosine_null(seg_sq) -> np.ndarray:
    """The random-walk null of direction_cosine at each step: sqrt(Σ_{i≤t}‖δ_i‖² / Σ_{i≤T}‖δ_i‖²) from the
    squared segment norms ‖δ_1‖² … ‖δ_n‖² (T the last step). A walk whose increments point in independent random
    directions has ⟨D_t, D_T⟩ ≈ ‖D_t‖² ≈ Σ_{i≤t}‖δ_i‖² (the cross terms vanish as 1/√numel); with equal segments
    this is √(t/T). NaN where the walk does not move."""
    c = np.cumsum(np.asarray(seg_sq, dtype=np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sqrt(c / c[-1]) if len(c) and c[-1] > 0 else np.full(len(c), math.nan)


def _fit_projectors(steps) -> tuple[np.ndarray, np.ndarray]:
    """(P, R) on the n points t_1 … t_n (the base's point, 0 at t = 0, contributes nothing to either form):
    Σ over entries of SS_tot = ⟨P_full, G⟩, of SS_res = ⟨R_full, G⟩, with G_ij = ⟨D_i, D_j⟩; the rows and columns
    of the base dropped."""
    ts = np.concatenate([[0.0], np.asarray(steps, dtype=np.float64)])
    m = len(ts)
    X = np.stack([np.ones(m), ts], axis=1)
    hat = X @ np.linalg.solve(X.T @ X, X.T)
    P = np.eye(m) - np.full((m, m), 1.0 / m)
    R = np.eye(m) - hat
    return P[1:, 1:], R[1:, 1:]


def _unit_grams(n: int, numel: int, draws: int, rng: np.random.Generator) -> np.ndarray:
    """(draws, n, n) Gram matrices of n independent uniformly random unit vectors in R^numel: a Wishart(numel, I)
    draw by Bartlett's construction (numel ≥ n; exact, at a cost independent of numel), or from Gaussian vectors
    directly (numel < n), normalised to a unit diagonal."""
    if numel >= n:
        A = np.zeros((draws, n, n))
        i = np.arange(n)
        A[:, i, i] = np.sqrt(rng.chisquare(numel - i, size=(draws, n)))
        lo = np.tril_indices(n, -1)
        A[:, lo[0], lo[1]] = rng.standard_normal((draws, len(lo[0])))
        W = A @ A.transpose(0, 2, 1)
    else:
        Z = rng.standard_normal((draws, n, max(numel, 1)))
        W = Z @ Z.transpose(0, 2, 1)
    d = np.sqrt(np.einsum("rii->ri", W))
    return W / d[:, :, None] / d[:, None, :]


def null_draws(n: int) -> int:
    """How many random walks the simulated nulls draw for a trajectory of n steps (see NULL_DRAWS)."""
    return max(NULL_MIN_DRAWS, min(NULL_DRAWS, int(NULL_DRAWS * (NULL_FULL_STEPS / max(n, 1)) ** 3)))


def random_walk_nulls(seg_sq, steps, numel: int, *, draws: int | None = None, seed: int = NULL_SEED,
                      entries: int = NULL_ENTRIES) -> dict[str, float]:
    """The nulls of trajectory.csv's columns for one matrix: the mean over ``draws`` random walks with the
    segment norms sqrt(``seg_sq``) at ``steps``, in independent uniformly random directions of R^``numel``, of
    rank{k}_share and the pooled linear_r2 (``draws`` default: `null_draws`); and the median per-entry R² of
    ``entries`` simulated entries (increments N(0, ‖δ_i‖²), the per-entry law of such a walk). NaN for a walk that
    does not move."""
    s2 = np.asarray(seg_sq, dtype=np.float64)
    n = len(s2)
    keys = [f"rank{k}_share_null" for k in RANK_SHARE_KS] + ["linear_r2_null", "linear_r2_median_null"]
    if n < 1 or not np.isfinite(s2).all() or s2.sum() <= 0 or numel < 1:
        return dict.fromkeys(keys, math.nan)
    rng = np.random.default_rng(seed)
    draws = null_draws(n) if draws is None else int(draws)
    s = np.sqrt(s2)
    L = np.tril(np.ones((n, n)))
    G = L @ (_unit_grams(n, int(numel), draws, rng) * np.outer(s, s)) @ L.T  # (draws, n, n): G_ij = ⟨D_i, D_j⟩
    lam = np.clip(np.linalg.eigvalsh(G)[:, ::-1], 0.0, None)
    share = np.cumsum(lam, axis=1) / lam.sum(axis=1, keepdims=True)
    out = {f"rank{k}_share_null": float(share[:, min(k, n) - 1].mean()) for k in RANK_SHARE_KS}
    P, R = _fit_projectors(steps)
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = 1.0 - np.einsum("ij,rij->r", R, G) / np.einsum("ij,rij->r", P, G)
        out["linear_r2_null"] = float(np.nanmean(r2)) if np.isfinite(r2).any() else math.nan
        w = np.cumsum(rng.standard_normal((entries, n)) * s, axis=1)  # (entries, n) paths; the base is 0
        tot = ((w @ P) * w).sum(axis=1)
        res = ((w @ R) * w).sum(axis=1)
        moved = tot > 0
        out["linear_r2_median_null"] = float(np.median(1.0 - res[moved] / tot[moved])) if moved.any() else math.nan
    return out


def _hist_median(hist: np.ndarray) -> float:
    """The median of values binned uniformly on [0, 1] (the bin's centre); NaN for no values."""
    n = int(hist.sum())
    if n == 0:
        return math.nan
    cum = np.cumsum(hist)
    lo = int(np.searchsorted(cum, (n + 1) // 2))  # the lower middle value's bin
    hi = int(np.searchsorted(cum, n // 2 + 1))  # the upper middle value's bin
    return ((lo + 0.5) + (hi + 0.5)) / 2 / len(hist)


class TrajectoryAccumulator:
    """Sums over row blocks of one matrix's updates at steps ``steps`` (all > 0, increasing)."""

    def __init__(self, steps: Sequence[int]):
        self.t = np.asarray(steps, dtype=np.float64)
        if len(self.t) < 1 or self.t[0] <= 0 or np.any(np.diff(self.t) <= 0):
            raise ValueError(f"trajectory steps must be positive and increasing, got {list(steps)}")
        n = len(self.t)
        self.gram = np.zeros((n, n))
        self.seg_dot = np.zeros(max(n - 1, 0))  # ⟨δ_i, δ_{i+1}⟩
        self.seg_sq = np.zeros(n)  # ‖δ_i‖²
        self.ss_tot = 0.0
        self.ss_res = 0.0
        self.numel = 0  # entries seen (the dimension of the nulls' random walks)
        self.r2_hist = np.zeros(R2_BINS, dtype=np.int64)  # per-entry R² in [0, 1], for the median
        # the per-entry line w(t) = a + b·t through (0, 0), (t_1, D_1), … (t_n, D_n)
        ts = np.concatenate([[0.0], self.t])
        self._c = ts - ts.mean()
        self._sxx = float(self._c @ self._c)

    def add(self, block: np.ndarray) -> None:
        """One row block: (n, m) float64, row i the entries of D_i in this block. NaN or Inf in it make the
        tensor's results NaN without numpy's warnings (the analysis reports non-finite weights itself)."""
        d = np.asarray(block, dtype=np.float64)
        if d.ndim != 2 or d.shape[0] != len(self.t):
            raise ValueError(f"expected an (n={len(self.t)}, m) block, got shape {d.shape}")
        with np.errstate(invalid="ignore", over="ignore"):
            self._add(d)

    def _add(self, d: np.ndarray) -> None:
        self.numel += d.shape[1]
        self.gram += d @ d.T
        inc = np.diff(d, axis=0, prepend=np.zeros((1, d.shape[1])))  # δ_1 … δ_n
        self.seg_sq += np.einsum("ij,ij->i", inc, inc)
        if len(inc) > 1:
            self.seg_dot += np.einsum("ij,ij->i", inc[:-1], inc[1:])
        pts = np.concatenate([np.zeros((1, d.shape[1])), d])  # the base's point is D_0 = 0
        centred = pts - pts.mean(axis=0)
        ss_tot = np.einsum("ij,ij->j", centred, centred)
        sxy = self._c @ centred
        ss_res = np.maximum(ss_tot - sxy * sxy / self._sxx, 0.0)
        self.ss_tot += float(ss_tot.sum())
        self.ss_res += float(ss_res.sum())
        moved = ss_tot > 0
        r2 = np.clip(1.0 - ss_res[moved] / ss_tot[moved], 0.0, 1.0)
        self.r2_hist += np.bincount(np.minimum((r2 * R2_BINS).astype(np.int64), R2_BINS - 1), minlength=R2_BINS)

    def result(self, lockin_threshold: float = LOCKIN_THRESHOLD,
               lockin_margin: float = LOCKIN_MARGIN) -> tuple[dict, list[dict]]:
        """(the matrix's row of trajectory.csv, its rows of segments.csv, one per step)."""
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite weights: NaN results (see add)
            return self._result(lockin_threshold, lockin_margin)

    def _result(self, lockin_threshold: float, lockin_margin: float) -> tuple[dict, list[dict]]:
        n, g = len(self.t), self.gram
        # NaN or Inf in a step's weights: NaN shares (eigvalsh does not converge on them), the run goes on
        lam = np.clip(np.linalg.eigvalsh(g)[::-1], 0.0, None) if np.isfinite(g).all() else np.full(n, math.nan)
        total = float(lam.sum())
        summary: dict = {"n_steps": n,
                         "linear_r2": 1.0 - self.ss_res / self.ss_tot if self.ss_tot > 0 else math.nan,
                         "linear_r2_median": _hist_median(self.r2_hist)}
        for k in RANK_SHARE_KS:
            summary[f"rank{k}_share"] = float(lam[:k].sum()) / total if total > 0 else math.nan
        summary.update(random_walk_nulls(self.seg_sq, self.t, self.numel))
        final = g[-1, -1]
        nulls = cosine_null(self.seg_sq)
        rows, lockin = [], None
        for i in range(n):
            cos = g[i, -1] / math.sqrt(g[i, i] * final) if g[i, i] > 0 and final > 0 else math.nan
            null = float(nulls[i])
            seg = math.nan
            if i < n - 1 and self.seg_sq[i] > 0 and self.seg_sq[i + 1] > 0:
                seg = self.seg_dot[i] / math.sqrt(self.seg_sq[i] * self.seg_sq[i + 1])
            rows.append({"step": int(self.t[i]), "segment_cosine": seg, "direction_cosine": cos,
                         "null_cosine": null, "direction_excess": cos - null})
            if lockin is None and locked_in(cos, null, lockin_threshold, lockin_margin):
                lockin = int(self.t[i])
        summary["lockin_step"] = lockin
        return summary, rows
