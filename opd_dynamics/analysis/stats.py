"""The statistics every verdict uses: paired tests across seeds, the effect with an interval, and one rule.

**The rule** (`verdict`, stated once here and quoted by every table that carries a verdict): a claim about a
paired difference d_s (one value per seed s, e.g. OPD's measure minus GRPO's on the same seed) is

- *confirmed* when the exact one-sided sign test in the claimed direction gives p < `ALPHA` (0.05),
- *refuted* when the exact one-sided sign test in the other direction gives p < `ALPHA`,
- *inconclusive* otherwise.

Seeds with d_s = 0 (ties) are dropped from the sign test, as is usual; NaN values are dropped everywhere. The
sign test assumes nothing about the distribution of d_s, which a handful of seeds cannot show: with n seeds all
going one way p = 2^−n, so 3 seeds can never decide (p = 0.125), 5 can (p = 1/32). The paired t test and the
Wilcoxon signed-rank test (one-sided, claimed direction) stand beside it, with the mean of d_s and its 95 %
t interval; they inform, they do not decide.

A gate on two scores of the same items (the line probe: accuracy of W_t and of W_t + cΔ on the same prompts)
uses the paired standard error of the gain, sd(b_i − a_i) / √n: a gain counts only above `GATE_SES` of them.

Pure numpy and scipy; no torch. Tests: tests/test_stats.py.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as _st

#: the verdict's significance level (one-sided, in each direction)
ALPHA = 0.05
#: the two-sided coverage of the interval printed beside each verdict
CONFIDENCE = 0.95
#: a gate opens on a gain above this many paired standard errors
GATE_SES = 2.0

CONFIRMED, REFUTED, INCONCLUSIVE, NOT_TESTABLE = "confirmed", "refuted", "inconclusive", "not testable"
GREATER, LESS = "greater", "less"

#: the rule, in one sentence, for tables and JSON provenance
RULE = (f"confirmed (refuted) when the exact one-sided sign test over seeds in the claimed (the other) direction "
        f"gives p < {ALPHA:g}, ties dropped; otherwise inconclusive. Beside it: the mean paired difference with its "
        f"{CONFIDENCE:.0%} t interval, and one-sided paired t and Wilcoxon p-values (they do not decide)")


@dataclass(frozen=True)
class PairedTest:
    """The tests of paired differences d (one per seed) against 0 in a claimed direction (`paired_test`)."""

    direction: str  # "greater": the claim is d > 0; "less": d < 0
    n: int  # seeds with a (finite) value
    n_agree: int  # seeds with d in the claimed direction
    n_against: int  # seeds with d the other way (n − n_agree − n_against are ties)
    effect: float  # mean of d (NaN for no seed)
    ci_low: float  # the CONFIDENCE t interval of the mean (NaN for n < 2, the mean itself when every d is equal)
    ci_high: float
    p_sign: float  # exact one-sided sign test, claimed direction (1 when no seed breaks the tie)
    p_sign_other: float  # the same, the other direction
    p_t: float  # one-sided paired t test, claimed direction (NaN for n < 2 or no spread)
    p_wilcoxon: float  # one-sided Wilcoxon signed-rank test, claimed direction (NaN when every d is 0)

    @property
    def verdict(self) -> str:
        return verdict(self.p_sign, self.p_sign_other)

    @property
    def p(self) -> float:
        """The p-value the verdict stands on: the sign test in the direction it went (the claimed one unless
        refuted)."""
        return self.p_sign_other if self.verdict == REFUTED else self.p_sign

    def as_dict(self) -> dict:
        return {**asdict(self), "verdict": self.verdict, "p": self.p}


def verdict(p_claimed: float, p_other: float, alpha: float = ALPHA) -> str:
    """The one rule: confirmed at p < alpha in the claimed direction, refuted at p < alpha in the other one,
    otherwise inconclusive (module docstring)."""
    if p_claimed < alpha:
        return CONFIRMED
    if p_other < alpha:
        return REFUTED
    return INCONCLUSIVE


def sign_test(n_agree: int, n_against: int) -> float:
    """Exact one-sided sign test: P(X ≥ n_agree), X ~ Binomial(n_agree + n_against, 1/2); ties are not counted.
    1.0 when no value breaks the tie."""
    n = int(n_agree) + int(n_against)
    if n == 0:
        return 1.0
    return float(_st.binomtest(int(n_agree), n, 0.5, alternative="greater").pvalue)


def t_interval(d: Sequence[float] | np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The two-sided ``confidence`` Student-t interval of the mean of ``d`` (NaN, NaN for fewer than two values)."""
    d = _finite(d)
    if len(d) < 2:
        return math.nan, math.nan
    m, se = float(d.mean()), float(d.std(ddof=1)) / math.sqrt(len(d))
    h = float(_st.t.ppf(0.5 + confidence / 2, len(d) - 1)) * se
    return m - h, m + h


def paired_test(d: Sequence[float] | np.ndarray, direction: str = GREATER) -> PairedTest:
    """Test paired differences ``d`` (one per seed; NaN dropped) against 0 in ``direction`` ("greater": the
    claim is d > 0, "less": d < 0)."""
    if direction not in (GREATER, LESS):
        raise ValueError(f"direction must be {GREATER!r} or {LESS!r}, not {direction!r}")
    d = _finite(d)
    s = d if direction == GREATER else -d  # in the claimed direction
    agree, against = int((s > 0).sum()), int((s < 0).sum())
    lo, hi = t_interval(d)
    p_t = p_w = math.nan
    with warnings.catch_warnings():  # scipy's notes on ties and normal approximations: the p-values stand
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)
        if len(s) >= 2 and s.std(ddof=1) > 1e-12 * max(1.0, float(np.abs(s).max())):  # not equal up to rounding
            p_t = float(_st.ttest_1samp(s, 0.0, alternative="greater").pvalue)
        if (s != 0).any():
            p_w = float(_st.wilcoxon(s, alternative="greater", zero_method="wilcox").pvalue)
    return PairedTest(direction, len(d), agree, against, float(d.mean()) if len(d) else math.nan, lo, hi,
                      sign_test(agree, against), sign_test(against, agree), p_t, p_w)


def ratio_test(ratios: Sequence[float] | np.ndarray, direction: str = GREATER) -> PairedTest:
    """`paired_test` of log ratios against 0 (a ratio > 1 against 1), with the effect and its interval given back
    as ratios: the geometric mean and its interval. Non-positive ratios are dropped with NaN."""
    r = np.asarray(ratios, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.where(r > 0, np.log(np.where(r > 0, r, 1.0)), np.nan)
    t = paired_test(logs, direction)
    return PairedTest(t.direction, t.n, t.n_agree, t.n_against, math.exp(t.effect) if t.n else math.nan,
                      math.exp(t.ci_low) if t.ci_low == t.ci_low else math.nan,
                      math.exp(t.ci_high) if t.ci_high == t.ci_high else math.nan,
                      t.p_sign, t.p_sign_other, t.p_t, t.p_wilcoxon)


def paired_se(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """The standard error of mean(b) − mean(a) for scores of the same n items: sd(b_i − a_i, ddof=1) / √n."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired scores must be two vectors of one length, got shapes {a.shape} and {b.shape}")
    if len(a) < 2:
        return math.nan
    return float(np.std(b - a, ddof=1)) / math.sqrt(len(a))


def min_paired_se(gain: float, n: int) -> float:
    """The smallest paired standard error two 0/1 scores of n items can have when their means differ by
    ``gain``: every item that differs differs the same way (n|gain| discordant items, none the other way), so
    Var(b_i − a_i) = |gain| − gain² (population form). What a gate can say without per-item scores: a gain not
    above GATE_SES times this could not pass however the items pair."""
    g = abs(float(gain))
    if n < 1 or not g <= 1:
        return math.nan
    return math.sqrt(max(g - g * g, 0.0) / n)


def gain_passes(gain: float, se: float, ses: float = GATE_SES) -> bool:
    """A gain counts when it exceeds ``ses`` paired standard errors (a NaN SE or gain never passes)."""
    return bool(gain == gain and se == se and gain > ses * se)


def fmt_p(p: float) -> str:
    """A p-value as printed beside a verdict: three significant digits, '<1e-4' below, '–' for NaN."""
    if p != p:
        return "–"
    return "<1e-4" if p < 1e-4 else f"{p:.3g}"


def summary(t: PairedTest, *, digits: int = 3, ratio: bool = False) -> str:
    """One line for a log or a table cell: 'confirmed: sign p = 0.031 (5/5), mean +0.120 [0.050, 0.190], t p =
    0.002, Wilcoxon p = 0.031'."""
    fmt = (lambda x: f"{x:.{digits}g}×") if ratio else (lambda x: f"{x:+.{digits}f}")
    iv = "" if t.ci_low != t.ci_low else f" [{fmt(t.ci_low)}, {fmt(t.ci_high)}]"
    eff = "–" if t.effect != t.effect else fmt(t.effect)
    return (f"{t.verdict}: sign p = {fmt_p(t.p)} ({t.n_agree}/{t.n_agree + t.n_against} the claimed way, "
            f"{t.n - t.n_agree - t.n_against} ties), {'geometric mean' if ratio else 'mean'} {eff}{iv}, "
            f"t p = {fmt_p(t.p_t)}, Wilcoxon p = {fmt_p(t.p_wilcoxon)}")


def _finite(d) -> np.ndarray:
    a = np.asarray(d, dtype=np.float64).ravel()
    return a[np.isfinite(a)]
