"""The one statistics module (opd_dynamics.analysis.stats): planted per-seed differences against exact p-values
(by hand and from scipy), the verdict rule at its edges, the t interval, the paired standard error of a gate."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as st

from opd_dynamics.analysis.stats import (
    ALPHA,
    CONFIRMED,
    INCONCLUSIVE,
    REFUTED,
    gain_passes,
    min_paired_se,
    paired_se,
    paired_test,
    ratio_test,
    sign_test,
    summary,
    t_interval,
    verdict,
)


def test_the_sign_test_by_hand():
    assert sign_test(5, 0) == pytest.approx(1 / 32)  # 5 of 5: 2^-5
    assert sign_test(3, 0) == pytest.approx(1 / 8)  # 3 of 3
    assert sign_test(4, 1) == pytest.approx(6 / 32)  # P(X ≥ 4), X ~ Bin(5, 1/2) = (5 + 1) / 32
    assert sign_test(0, 5) == pytest.approx(1.0)
    assert sign_test(0, 0) == 1.0  # nothing breaks the tie
    assert sign_test(9, 1) == pytest.approx(11 / 1024)


@pytest.mark.parametrize("d, direction, expect, p", [
    ([0.1, 0.2, 0.05, 0.3, 0.15], "greater", CONFIRMED, 1 / 32),  # 5 of 5 the claimed way
    ([0.1, 0.2, 0.05], "greater", INCONCLUSIVE, 1 / 8),  # 3 of 3: p = 0.125 can never decide
    ([-0.1, -0.2, -0.05, -0.3, -0.15], "greater", REFUTED, 1 / 32),  # 5 of 5 the other way
    ([-0.1, -0.2, -0.05, -0.3, -0.15], "less", CONFIRMED, 1 / 32),  # the same values, the claim d < 0
    ([0.1, 0.2, 0.05, 0.3, -0.15], "greater", INCONCLUSIVE, 6 / 32),  # 4 of 5
    ([0.0, 0.0, 0.0, -0.2, 0.0], "greater", INCONCLUSIVE, 1.0),  # four ties dropped: one seed, the other way
    ([0.1, 0.0, 0.2, 0.3, 0.4, 0.5], "greater", CONFIRMED, 1 / 32),  # a tie dropped: 5 of 5
])
def test_planted_differences_get_their_verdict_and_exact_p(d, direction, expect, p):
    t = paired_test(d, direction)
    assert t.verdict == expect and verdict(t.p_sign, t.p_sign_other) == expect
    assert t.p == pytest.approx(p)
    s = np.asarray(d) * (1 if direction == "greater" else -1)
    nz = s[s != 0]
    assert t.p_sign == pytest.approx(st.binomtest(int((nz > 0).sum()), len(nz), 0.5, alternative="greater").pvalue)
    assert (t.n, t.n_agree, t.n_against) == (len(d), int((s > 0).sum()), int((s < 0).sum()))
    assert t.effect == pytest.approx(np.mean(d))
    if np.std(s) > 0:
        assert t.p_t == pytest.approx(st.ttest_1samp(s, 0.0, alternative="greater").pvalue)
        assert t.p_wilcoxon == pytest.approx(st.wilcoxon(s, alternative="greater").pvalue)


def test_the_rule_decides_on_the_sign_test_alone():
    """Three seeds far from zero: the paired t test says p < 0.01, the verdict stays inconclusive (the sign test
    cannot go below 1/8 with three seeds); the t p-value stands beside it."""
    t = paired_test([0.317, 0.413, 0.308])
    assert t.p_t < 0.01 and t.p_sign == pytest.approx(0.125) and t.verdict == INCONCLUSIVE
    assert verdict(ALPHA, 1.0) == INCONCLUSIVE and verdict(ALPHA * 0.99, 1.0) == CONFIRMED
    assert verdict(1.0, 0.01) == REFUTED


def test_the_t_interval_by_hand():
    d = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    lo, hi = t_interval(d)
    h = st.t.ppf(0.975, 4) * d.std(ddof=1) / math.sqrt(5)  # 2.776 · 1.581 / 2.236
    assert (lo, hi) == pytest.approx((3 - h, 3 + h)) and h == pytest.approx(1.9632, abs=1e-4)
    t = paired_test(d)
    assert (t.ci_low, t.ci_high) == pytest.approx((lo, hi))
    assert all(math.isnan(x) for x in t_interval([1.0]))
    assert t_interval([2.0, 2.0, 2.0]) == (2.0, 2.0)
    assert paired_test([0.1, np.nan, 0.2]).n == 2  # NaN dropped


def test_a_ratio_is_tested_on_its_log_and_reported_as_a_ratio():
    r = [2.0, 3.0, 2.5, 4.0, 2.0]
    t = ratio_test(r)
    logs = np.log(r)
    assert t.verdict == CONFIRMED and t.p == pytest.approx(1 / 32)
    assert t.effect == pytest.approx(math.exp(logs.mean()))
    lo, hi = t_interval(logs)
    assert (t.ci_low, t.ci_high) == pytest.approx((math.exp(lo), math.exp(hi)))
    ties = ratio_test([1.0, 1.0, 0.8, 1.0, 1.0])  # the shipped EffOPD speedups: four ties, one slower
    assert ties.verdict == INCONCLUSIVE and (ties.n_agree, ties.n_against) == (0, 1)
    assert ties.p_sign == 1.0 and ties.p_sign_other == pytest.approx(0.5)
    assert "geometric mean 0.956×" in summary(ties, ratio=True)


def test_the_paired_standard_error_of_a_gate():
    a = np.array([1, 1, 0, 0, 1, 0, 1, 1, 0, 1], dtype=float)
    b = np.array([1, 1, 1, 0, 1, 1, 1, 1, 0, 1], dtype=float)  # two prompts gained, none lost
    se = paired_se(a, b)
    assert se == pytest.approx(np.std(b - a, ddof=1) / math.sqrt(10))
    assert not gain_passes(b.mean() - a.mean(), se)  # +0.2 against 2 · 0.133
    assert gain_passes(0.2, 0.09) and not gain_passes(0.2, math.nan) and not gain_passes(math.nan, 0.01)
    # one prompt in 500 (+0.002) can never pass: even the smallest paired SE possible for it is 0.002
    assert min_paired_se(0.002, 500) == pytest.approx(math.sqrt(0.002 * 0.998 / 500))
    assert not gain_passes(0.002, min_paired_se(0.002, 500))
    assert gain_passes(0.01, min_paired_se(0.01, 500))  # 5 prompts, all one way, could
    with pytest.raises(ValueError, match="one length"):
        paired_se([1.0, 0.0], [1.0])
