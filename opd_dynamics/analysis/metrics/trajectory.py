"""The shape of a training trajectory, per matrix: how straight (segment cosines, a per-entry linear fit in
time), how low-rank (the share of the stacked updates' energy in their top 1 … 5 directions, RELEX's rank-1
trajectory), and when its direction locks in (alignment to the final update above the random-walk null).

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

from opd_dynamics.schema import RANK_SHARE_KS

#: bins of the per-entry R² histogram: its median is exact to half a bin, 2^-21 < 5e-7, in constant memory
R2_BINS = 1 << 20
#: lockin_step: the first step whose direction_cosine to the final update is at least LOCKIN_THRESHOLD and above
#: the random walk's √(t/T) by LOCKIN_MARGIN
LOCKIN_THRESHOLD = 0.5
LOCKIN_MARGIN = 0.2


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
        final = g[-1, -1]
        rows, lockin = [], None
        for i in range(n):
            cos = g[i, -1] / math.sqrt(g[i, i] * final) if g[i, i] > 0 and final > 0 else math.nan
            null = math.sqrt(self.t[i] / self.t[-1])
            seg = math.nan
            if i < n - 1 and self.seg_sq[i] > 0 and self.seg_sq[i + 1] > 0:
                seg = self.seg_dot[i] / math.sqrt(self.seg_sq[i] * self.seg_sq[i + 1])
            rows.append({"step": int(self.t[i]), "segment_cosine": seg, "direction_cosine": cos,
                         "null_cosine": null, "direction_excess": cos - null})
            if lockin is None and cos >= lockin_threshold and cos - null >= lockin_margin:
                lockin = int(self.t[i])
        summary["lockin_step"] = lockin
        return summary, rows
