"""Each extrapolator's prediction of one tensor, in float64, read through the one row-block reader
(`io.rows.row_blocks`) and, where it is a jump, computed by the one jump function (`effopd.search.jump`).

A predictor takes a `Context` (the base and the observed steps as readers, their step numbers, the target, the
options, the scores) and a tensor name, and returns the predicted tensor in float64 in its stored shape. The
formulas, with the authors' code they follow, are in `opd_dynamics.extrapolate.registry` and docs/EXTRAPOLATION.md.
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from opd_dynamics.effopd.search import jump
from opd_dynamics.errors import InputError
from opd_dynamics.io.rows import row_blocks
from opd_dynamics.numerics.decomposition import decompose

#: RELEX infers a ×2 target scaling for this base (scripts/svd_extrapolation.py:536-538: its checkpoints were saved
#: one per 2 optimizer steps, so a paper-facing step label is half the fit-axis index)
RELEX_SCALED_BASE = "Qwen2.5-Math-1.5B"


@dataclass
class Context:
    """What a predictor reads: ``steps`` are the observed steps' readers in step order, ``t`` their step numbers."""

    base: Any
    steps: list
    t: np.ndarray
    target: int | None
    opts: Any  # ExtrapolationOptions
    base_path: str = ""
    scores: np.ndarray | None = None  # alpharl: one score per observed step
    budget: int | None = None  # bytes per row block (None: the reader's default)

    def blocks(self, name: str, steps: list, whole: bool = False):
        return row_blocks(self.base, steps, name, budget=0 if whole else self.budget)

    def out(self, name: str) -> torch.Tensor:
        return torch.empty(tuple(self.base.shape(name)) or (1,), dtype=torch.float64)


def _finish(out: torch.Tensor, name: str, ctx: Context) -> torch.Tensor:
    return out.reshape(tuple(ctx.base.shape(name)))


# ---------------------------------------------------------------------------------------------- jumps


def _jump_from(ctx: Context, name: str, a: int | None, b: int, coef: float) -> torch.Tensor:
    """W_B + coef·(W_B − W_A), A = observed step index ``a`` (None: the base), B = index ``b``."""
    readers = [ctx.steps[b]] if a is None else [ctx.steps[a], ctx.steps[b]]
    out = ctx.out(name)
    for lo, hi, w0, d in ctx.blocks(name, readers):
        wa = w0 if a is None else w0 + d[0]
        out[lo:hi] = jump(wa, w0 + d[-1], coef, torch.float64)
    return _finish(out, name, ctx)


def effopd_anchor(t: np.ndarray) -> int | None:
    """EffOPD's anchor for B = the last observed step: the latest observed step ≤ t_B/2 (the previous trigger of its
    power-of-two schedule, whose accepted weights become the anchor), None (the base) if there is none."""
    before = [i for i in range(len(t) - 1) if t[i] <= t[-1] / 2]
    return before[-1] if before else None


def predict_expo(ctx: Context, name: str) -> torch.Tensor:
    """ExPO (code/extrapolate.py:33-35): θ_B + α(θ_B − θ_A), A the base (the SFT model), B the last observed step."""
    return _jump_from(ctx, name, None, len(ctx.steps) - 1, float(ctx.opts.alpha))


def predict_effopd(ctx: Context, name: str) -> torch.Tensor:
    """EffOPD's candidate (fsdp_workers.py:1135-1191) with a fixed k: W_B + coef_step·k·(W_B − W_A)."""
    coef = ctx.opts.value("coef_step") * ctx.opts.value("k")
    return _jump_from(ctx, name, effopd_anchor(ctx.t), len(ctx.steps) - 1, coef)


def last_segment_alpha(ctx: Context) -> float:
    """The toolkit's last-segment α: given, else (t* − t_B)/(t_B − t_A), continuing the last segment's pace."""
    if ctx.opts.alpha is not None:
        return float(ctx.opts.alpha)
    t_a = ctx.t[-2] if len(ctx.t) > 1 else 0.0
    return (ctx.target - ctx.t[-1]) / (ctx.t[-1] - t_a)


def predict_last_segment(ctx: Context, name: str) -> torch.Tensor:
    """The toolkit's jump along the last segment: W_B + α(W_B − W_A), A the observed step before B (else the base)."""
    n = len(ctx.steps)
    return _jump_from(ctx, name, n - 2 if n > 1 else None, n - 1, last_segment_alpha(ctx))


# ---------------------------------------------------------------------------------------------- lines in time


def predict_linear(ctx: Context, name: str) -> torch.Tensor:
    """RLVR-Linearity (acceleration/weight_extrapolation.py:56, 118-119): W_0 + α(W_S − W_0), α = (t* − 0)/(t_S − 0),
    S the last observed step; with fit lstsq (the toolkit's), per entry the least-squares line through the base and
    every observed step, evaluated at t*."""
    out = ctx.out(name)
    target = float(ctx.target)
    if ctx.opts.value("fit") == "two-point":
        alpha = target / ctx.t[-1]
        for lo, hi, w0, d in ctx.blocks(name, ctx.steps[-1:]):
            out[lo:hi] = w0 + alpha * d[0]
        return _finish(out, name, ctx)
    ts = np.concatenate([[0.0], ctx.t])
    X = np.vander(ts, 2)
    pinv = np.linalg.pinv(X)  # (2, n + 1): least squares of each column
    at = np.array([target, 1.0]) @ pinv
    for lo, hi, w0, d in ctx.blocks(name, ctx.steps):
        flat = d.reshape(len(ctx.steps), -1).numpy()
        out[lo:hi] = w0 + torch.from_numpy(at[1:] @ flat).reshape(w0.shape)  # the base's row of Y is 0
    return _finish(out, name, ctx)


# ---------------------------------------------------------------------------------------------- RELEX


def relex_scale(ctx: Context) -> float:
    """RELEX's target step scaling: given, else 2.0 when the base's path names Qwen2.5-Math-1.5B, else 1.0."""
    s = ctx.opts.target_scale
    if s is not None:
        return float(s)
    return 2.0 if RELEX_SCALED_BASE in ctx.base_path else 1.0


def _fit_linear(x: np.ndarray, C: np.ndarray):
    """RELEX's fit_linear (S:351-376) on the abscissae x: per column, OLS slope and intercept (closed form)."""
    xc = x - x.mean()
    slopes = (xc[:, None] * (C - C.mean(0))).sum(0) / np.sum(xc ** 2)
    return slopes, C.mean(0) - slopes * x.mean()


def _sin(t, A, f, phi, c):
    return A * np.sin(2 * np.pi * f * t + phi) + c


def _fit_sin_fft(x: np.ndarray, C: np.ndarray) -> list[tuple[float, ...]]:
    """RELEX's fit_sin_fft (S:384-418): per column, A sin(2πft + φ) + C by curve_fit from an FFT-peak start (the
    start values when curve_fit does not converge)."""
    from scipy.optimize import OptimizeWarning, curve_fit

    out = []
    for i in range(C.shape[1]):
        y = C[:, i]
        guess_c, guess_a = np.mean(y), 3 * np.std(y) / (2 ** 0.5)
        freqs = np.fft.rfftfreq(len(x), d=(x[1] - x[0]))
        guess_f = freqs[np.argmax(np.abs(np.fft.rfft(y - guess_c)[1:])) + 1]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", OptimizeWarning)
                popt, _ = curve_fit(_sin, x, y, p0=[guess_a, guess_f, 0.0, guess_c], maxfev=10000)
            out.append(tuple(float(v) for v in popt))
        except RuntimeError:
            out.append((guess_a, guess_f, 0.0, guess_c))
    return out


def _fit(kind: str, x: np.ndarray, C: np.ndarray, degree: int):
    if kind == "linear":
        return kind, _fit_linear(x, C)
    if kind == "polynomial":
        return kind, [np.poly1d(np.polyfit(x, C[:, i], degree)) for i in range(C.shape[1])]
    return kind, _fit_sin_fft(x, C)


def _at(state, q: float) -> np.ndarray:
    kind, p = state
    if kind == "linear":
        return p[0] * q + p[1]
    if kind == "polynomial":
        return np.array([float(f(q)) for f in p])
    return np.array([_sin(q, *par) for par in p])


def relex_coefficients(C: np.ndarray, ctx: Context) -> np.ndarray:
    """ĉ(t*) from the temporal coefficients C (n × r) as RELEX's extrapolate mode (S:857-933) fits them: on the last
    W rows (``window``; all by default) against positions 0 … W−1, queried at (W − 1) + (eff(t*) − t_n) with
    eff(t*) = round(t*·scale); with ``refit`` F, one step at a time from t_n + 1 to t*, each prediction at position
    W appended to the window and the fit redone every F steps. With time 'steps' (the toolkit's), the abscissae are
    the observed step numbers and the query eff(t*)."""
    o = ctx.opts
    n = len(C)
    w = n if o.window is None else min(o.window, n)
    fit, degree = o.value("fit"), o.value("degree")
    if o.refit is None:
        eff = int(round(ctx.target * relex_scale(ctx)))
        if o.value("time") == "positions":
            return _at(_fit(fit, np.arange(w, dtype=np.float64), C[-w:], degree), (w - 1) + (eff - ctx.t[-1]))
        return _at(_fit(fit, ctx.t[-w:], C[-w:], degree), float(eff))
    buf: deque = deque(C[-w:], maxlen=w)
    since, state, c = o.refit, None, None
    x = np.arange(w, dtype=np.float64)
    for _ in range(int(ctx.t[-1]) + 1, int(ctx.target) + 1):
        if since >= o.refit:
            state, since = _fit(fit, x, np.array(buf), degree), 0
        c = _at(state, float(w))  # position W − 1 + 1, whether or not the fit was redone (S:910)
        buf.append(c)
        since += 1
    return c


def predict_relex(ctx: Context, name: str) -> torch.Tensor:
    """RELEX (S:141-189, 764-773, 857-933): the stacked deltas M (n × numel, not centred) have Gram G = M Mᵀ; its top
    r eigenpairs give σ_j = √λ_j, u_j, v_j = Mᵀu_j/σ_j (0 where σ_j ≤ 1e-6 σ_1) and coefficients C = M V_r; ĉ(t*)
    is fitted (`relex_coefficients`) and the prediction is W_0 + Σ_j ĉ_j v_j."""
    n = len(ctx.steps)
    g = np.zeros((n, n))
    for _, _, _, d in ctx.blocks(name, ctx.steps):
        flat = d.reshape(n, -1).numpy()
        g += flat @ flat.T
    lam, u = np.linalg.eigh(g)
    order = np.argsort(lam)[::-1]
    lam, u = lam[order], u[:, order]
    r = ctx.opts.value("rank")
    sig = np.sqrt(np.maximum(lam[:r], 0.0))
    floor = sig[0] * 1e-6 if sig[0] > 0 else 1e-12
    keep = sig > floor
    C = np.where(keep, u[:, :r] * sig, 0.0)  # = M V_r: σ_j u_j, 0 where v_j is 0
    c_hat = relex_coefficients(C, ctx)
    out = ctx.out(name)
    for lo, hi, w0, d in ctx.blocks(name, ctx.steps):
        flat = d.reshape(n, -1).numpy()
        pred = np.zeros(flat.shape[1])
        for j in range(r):
            if keep[j]:
                pred += c_hat[j] * (flat.T @ u[:, j]) / sig[j]
        out[lo:hi] = w0 + torch.from_numpy(pred).reshape(w0.shape)
    return _finish(out, name, ctx)


# ---------------------------------------------------------------------------------------------- rank-1 methods


def _top_triplet(d: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(σ1, u1, v1) of a matrix as stored (float64); σ1 = 0 and zero vectors for a zero matrix."""
    dec = decompose(d, k_vectors=1, mode="exact")
    if dec.U is None:
        return 0.0, torch.zeros(d.shape[0], dtype=torch.float64), torch.zeros(d.shape[1], dtype=torch.float64)
    return float(dec.singular_values[0]), dec.U[:, 0].to(torch.float64), dec.V[:, 0].to(torch.float64)


def pls1_predict(X: np.ndarray, y: np.ndarray, y_target: float) -> np.ndarray:
    """AlphaRL's predictor (AlphaPredVector.py:90-126) in closed form: scikit-learn's PLSRegression(n_components=1)
    (scale=True: X and y centred and divided by their ddof-1 standard deviations, a zero one taken as 1; x_weights
    w ∝ Xsᵀys, scores t = Xs w, loadings p = Xsᵀt/tᵀt), then LinearRegression of y on the scores (slope β,
    intercept b), the score s* = (y* − b)/β of the target and `inverse_transform`: x̄ + σ_x ⊙ s*·p."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    xm = X.mean(0)
    xs = X.std(0, ddof=1)
    xs[xs == 0.0] = 1.0
    Xs = (X - xm) / xs
    yc = y - y.mean()
    eps = np.finfo(np.float64).eps
    w = Xs.T @ yc / (yc @ yc)
    w /= np.sqrt(w @ w) + eps
    w *= np.sign(w[np.argmax(np.abs(w))])  # sklearn's _svd_flip_1d (the result does not depend on it)
    t = Xs @ w
    p = Xs.T @ t / (t @ t)
    scores = Xs @ (w / (p @ w))  # transform: the x_rotations of one component
    sc = scores - scores.mean()
    beta = (sc @ (y - y.mean())) / (sc @ sc)
    b = y.mean() - beta * scores.mean()
    return ((y_target - b) / beta) * p * xs + xm


def alpharl_vectors(ctx: Context, name: str) -> tuple[np.ndarray, list[bool], list[tuple[torch.Tensor, torch.Tensor]]]:
    """AlphaRL's per-step rank-1 vectors (svd.py, extract_rank1_au.py:32, 50-62, 91-100): a_s = σ1 u1 of ΔW_s for each
    observed step, sign-aligned from the last step backwards (a_s flipped when its cosine with the aligned later
    one is < 0); returns the aligned vectors (n × rows), the flips, and (ΔW_s, v1) of each step."""
    raw, kept = [], []
    for s in ctx.steps:
        (_, _, _, d), = ctx.blocks(name, [s], whole=True)
        sigma, u1, v1 = _top_triplet(d[0])
        raw.append((sigma * u1).numpy())
        kept.append((d[0], v1))
    aligned = [None] * len(raw)
    flipped = [False] * len(raw)
    aligned[-1] = raw[-1]
    for i in range(len(raw) - 2, -1, -1):
        a, b = raw[i], aligned[i + 1]
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        cos = float(a @ b) / (na * nb) if na > 0 and nb > 0 else 0.0  # sklearn's cosine_similarity: 0 for zeros
        flipped[i] = cos < 0
        aligned[i] = -a if flipped[i] else a
    return np.stack(aligned), flipped, kept


def predict_alpharl(ctx: Context, name: str) -> torch.Tensor:
    """AlphaRL (AlphaPredVector.py, AlphaRLBuildPerdictModel.py:40-70): PLS of the aligned rank-1 vectors against the
    per-step scores, â at the target score, and W_k ± â v1ᵀ, v1 the top right singular vector of ΔW_k (k the
    container step), − where a_k was flipped."""
    X, flipped, kept = alpharl_vectors(ctx, name)
    a_hat = pls1_predict(X, ctx.scores, float(ctx.opts.target_score))
    if not np.all(np.isfinite(a_hat)):
        raise InputError(None, f"method alpharl cannot fit {name!r}: its PLS of the rank-1 vectors against the scores "
                               "is degenerate (the vectors or their projection do not vary with the scores); nothing "
                               "was written", ("scores",))
    k = ctx.opts.ckpt_index(ctx.t)
    dk, v1 = kept[k]
    upd = torch.outer(torch.from_numpy(a_hat), v1)
    w0 = ctx.base.get(name).to(torch.float64)
    return w0 + dk + (-upd if flipped[k] else upd)


def predict_rank1_growth(ctx: Context, name: str) -> torch.Tensor:
    """The toolkit's rank-1 growth (upd_rank.py:53-60's norm-matched rank-1 model with k = 1, grown in time):
    W_0 + (t*/t_n)·‖D_n‖F·u1 v1ᵀ, u1, v1 the top singular vectors of D_n."""
    (_, _, w0, d), = ctx.blocks(name, ctx.steps[-1:], whole=True)
    dn = d[0]
    sigma, u1, v1 = _top_triplet(dn)
    if sigma == 0.0:
        return w0 + dn
    norm = math.sqrt(float((dn * dn).sum()))
    return w0 + (float(ctx.target) / ctx.t[-1]) * norm * torch.outer(u1, v1)
