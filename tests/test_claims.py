"""The claims table's rules on planted per-seed values: each verdict with its exact p-value (the sign test by
hand, the t test and interval from scipy), preconditions first, claims the lab cannot test, EffOPD's speedup,
matching at equal progress, an old claims_seeds.csv judged again."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as st

from opd_dynamics.lab.claims import (
    CLAIMS,
    claims_from_seeds,
    claims_table,
    early_step,
    markdown,
    matched_steps,
)
from opd_dynamics.schema import TABLES

_NAME = {c.key: c.name for c in CLAIMS}


def _seeds(values: dict[str, dict[str, list[float]]], n: int = 5) -> pd.DataFrame:
    """Per-seed rows; the preconditions pass unless `values` says otherwise."""
    base = {"teacher": {"teacher": [0.97] * n}, "grpo_gain": {"grpo": [0.3] * n, "opd": [0.4] * n},
            "opd_dip": {"opd": [0.0] * n, "grpo": [-0.01] * n}}
    rows = [{"seed": s, "claim": _NAME[k], "run": r, "step": 60, "value": v}
            for k, by_run in {**base, **values}.items() for r, vs in by_run.items() for s, v in enumerate(vs)]
    return pd.DataFrame(rows, columns=TABLES["claims_seeds"].names)


def _table(seeds: pd.DataFrame) -> pd.DataFrame:
    t = claims_table(seeds)
    assert list(t.columns) == TABLES["claims"].names
    return t.set_index("claim")


def test_each_verdict_with_its_exact_p_value():
    opd = [0.5, 0.6, 0.7, 0.55, 0.65]
    t = _table(_seeds({
        "spectral_ratio": {"opd": opd, "grpo": [x - d for x, d in zip(opd, [0.1, 0.05, 0.2, 0.1, 0.02])]},  # 5 of 5
        "effective_rank": {"opd": [5, 6, 7, 8, 9], "grpo": [4, 5, 6, 7, 8]},  # paper: opd<grpo; 5 of 5 the other way
        "mlp_share": {"opd": [0.6, 0.4, 0.6, 0.6, 0.6], "grpo": [0.5] * 5},  # 4 of 5
        "top1pct": {"opd": [0.5] * 5, "grpo": [0.5] * 5},  # every seed a tie
        "opd_above_null": {"opd": [0.1, 0.2, 0.05, 0.3, 0.15]},
        "grpo_above_null": {"grpo": [-0.1, -0.2, -0.05, -0.3, 0.0]},  # 4 of 4 the other way, one tie
        "embedding_shift": {"opd": [0.1] * 5, "grpo": [0.2] * 5},
    }))
    sr = t.loc[_NAME["spectral_ratio"]]
    assert sr["verdict"] == "confirmed" and sr["p_value"] == pytest.approx(1 / 32)  # 2^-5
    assert (sr["seeds_agreeing"], sr["seeds_against"], sr["seeds_compared"]) == (5, 0, 5)
    d = np.array([0.1, 0.05, 0.2, 0.1, 0.02])
    assert sr["effect"] == pytest.approx(d.mean())
    assert sr["p_t"] == pytest.approx(st.ttest_1samp(d, 0, alternative="greater").pvalue)
    h = st.t.ppf(0.975, 4) * d.std(ddof=1) / math.sqrt(5)
    assert (sr["ci_low"], sr["ci_high"]) == pytest.approx((d.mean() - h, d.mean() + h))
    er = t.loc[_NAME["effective_rank"]]
    assert er["verdict"] == "refuted" and er["p_other"] == pytest.approx(1 / 32) and er["p_value"] == 1.0
    assert er["effect"] == pytest.approx(1.0)  # OPD − GRPO, whichever way the paper expects
    ml = t.loc[_NAME["mlp_share"]]
    assert ml["verdict"] == "inconclusive" and ml["p_value"] == pytest.approx(6 / 32)  # P(X ≥ 4 | n = 5)
    tp = t.loc[_NAME["top1pct"]]
    assert tp["verdict"] == "inconclusive" and tp["p_value"] == 1.0 and tp["seeds_compared"] == 5
    assert t.loc[_NAME["opd_above_null"], "verdict"] == "confirmed"
    gn = t.loc[_NAME["grpo_above_null"]]
    # the tie is dropped: 4 of 4 the other way, p = 1/16 > 0.05, so not refuted
    assert gn["verdict"] == "inconclusive" and gn["p_other"] == pytest.approx(1 / 16)
    assert (gn["seeds_agreeing"], gn["seeds_against"], gn["seeds_compared"]) == (0, 4, 5)
    assert t.loc[_NAME["embedding_shift"], "verdict"] == "not testable"  # 16 tokens: whatever the values say
    assert t.loc[_NAME["effopd"], "verdict"] == "not testable"  # no EffOPD rows given
    assert t.loc[_NAME["spectral_ratio@norm"], "verdict"] == "not testable"  # no rows at matched progress
    assert "not measured" in t.loc[_NAME["spectral_ratio@norm"], "note"]


def test_three_seeds_all_one_way_are_inconclusive_whatever_the_t_test_says():
    """3 of 3: the sign test's p is 1/8 whatever the margin; the t test's p < 0.01 stands beside it."""
    t = _table(_seeds({"opd_above_null": {"opd": [0.317, 0.413, 0.308]}}, n=3))
    r = t.loc[_NAME["opd_above_null"]]
    assert r["verdict"] == "inconclusive" and r["p_value"] == pytest.approx(0.125) and r["p_t"] < 0.01
    line = next(x for x in markdown(claims_table(_seeds({"opd_above_null": {"opd": [0.317, 0.413, 0.308]}},
                                                        n=3))).splitlines()
                if x.startswith(f"| {_NAME['opd_above_null']} |"))
    assert "| 0.125 |" in line and "3 / 3" in line and "**inconclusive**" in line and "[+0." in line


def test_a_failed_precondition_makes_every_comparison_not_testable():
    seeds = _seeds({"grpo_gain": {"grpo": [0.3, 0.1, 0.3, 0.3, 0.3], "opd": [0.4] * 5},
                    "spectral_ratio": {"opd": [0.5] * 5, "grpo": [0.4] * 5}})
    t = _table(seeds)
    g = t.loc[_NAME["grpo_gain"]]
    assert g["verdict"] == "fails" and (g["seeds_agreeing"], g["seeds_compared"]) == (4, 5)
    assert t.loc[_NAME["teacher"], "verdict"] == "holds"
    assert t.loc[_NAME["spectral_ratio"], "verdict"] == "not testable"
    assert "GRPO learns holds on 4 of 5 seeds" in t.loc[_NAME["spectral_ratio"], "note"]
    assert g["grpo_mean"] == pytest.approx(1.3 / 5)
    assert g["grpo_sd"] == pytest.approx(pd.Series([0.3, 0.1, 0.3, 0.3, 0.3]).std())


def test_effopd_is_a_sign_test_of_the_speedup_against_one():
    def row(speedups):
        rows = _seeds({}, n=len(speedups))
        eff = pd.DataFrame([{"seed": s, "claim": _NAME["effopd"], "run": "effopd", "value": x}
                            for s, x in enumerate(speedups)])
        return _table(pd.concat([rows, eff], ignore_index=True)).loc[_NAME["effopd"]]

    r = row([2.0, 3.0, 2.5, 4.0, 2.0])
    assert r["verdict"] == "confirmed" and r["p_value"] == pytest.approx(1 / 32)
    assert r["effect"] == pytest.approx(math.exp(np.log([2.0, 3.0, 2.5, 4.0, 2.0]).mean()))  # geometric mean
    assert row([2.0, 3.0, 2.5, 4.0, 0.9])["verdict"] == "inconclusive"  # one seed slower: p = 6/32
    shipped = row([1.0, 1.0, 0.8, 1.0, 1.0])  # docs/effopd/cpu-default-5seeds: four ties, one slower
    assert shipped["verdict"] == "inconclusive" and shipped["p_other"] == pytest.approx(0.5)
    assert (shipped["seeds_agreeing"], shipped["seeds_against"], shipped["seeds_compared"]) == (0, 1, 5)
    assert row([0.5, 0.8, 0.9, 0.7, 0.6])["verdict"] == "refuted"  # slower on all five


def test_matched_progress_takes_the_run_ahead_where_it_reaches_the_other():
    steps = [10, 20, 30, 40, 150]
    levels = {"opd": pd.DataFrame({"accuracy": [0.90, 0.93, 0.92, 0.96, 0.98], "norm": [0.5, 0.9, 1.2, 1.4, 2.3]},
                                  index=steps),
              "grpo": pd.DataFrame({"accuracy": [0.70, 0.77, 0.87, 0.90, 0.96], "norm": [0.3, 0.5, 0.7, 0.8, 1.26]},
                                   index=steps)}
    assert matched_steps(levels, 30, "step") == {"opd": 30, "grpo": 30}
    assert matched_steps(levels, 30, "accuracy") == {"opd": 10, "grpo": 30}  # OPD at 0.90 ≥ GRPO's 0.87
    assert matched_steps(levels, 30, "norm") == {"opd": 20, "grpo": 30}  # OPD's 0.9 ≥ 0.7
    assert matched_steps(levels, 150, "norm") == {"opd": 40, "grpo": 150}  # OPD passes GRPO's final 1.26 at 40
    assert matched_steps(levels, 150, "accuracy") == {"opd": 40, "grpo": 150}  # OPD first at GRPO's 0.96 at 40
    levels["grpo"].loc[150, "accuracy"] = 0.99  # GRPO ahead at the end: OPD keeps 150, GRPO never reaches 0.98 …
    assert matched_steps(levels, 150, "accuracy") == {"opd": 150, "grpo": 150}  # … but 0.99 at 150 does
    levels["opd"].loc[150, "norm"] = math.nan
    assert all(math.isnan(v) for v in matched_steps(levels, 150, "norm").values())


def test_an_old_claims_seeds_csv_is_judged_again(tmp_path):
    """The shipped docs/lab-regime/claims/claims_seeds.csv (three seeds, no step column): every comparison
    inconclusive, the matched ones not measured, the preconditions hold."""
    old = _seeds({"spectral_ratio": {"opd": [0.5, 0.6, 0.7], "grpo": [0.4, 0.5, 0.6]}}, n=3).drop(columns="step")
    old.to_csv(tmp_path / "claims_seeds.csv", index=False)
    out = claims_from_seeds(tmp_path / "claims_seeds.csv", tmp_path / "out", log=lambda m: None)
    t = pd.read_csv(out / "claims.csv").set_index("claim")
    assert t.loc[_NAME["spectral_ratio"], "verdict"] == "inconclusive"
    assert t.loc[_NAME["spectral_ratio"], "p_value"] == pytest.approx(0.125)
    assert t.loc[_NAME["teacher"], "verdict"] == "holds"
    assert list(pd.read_csv(out / "claims_seeds.csv").columns) == TABLES["claims_seeds"].names
    assert "sign test" in (out / "claims.json").read_text()


def test_early_step_and_markdown():
    assert early_step([10, 20, 30, 40, 150], 0.2) == 30
    assert early_step([150, 10, 20], 0.2) == 150  # no step between: the first at or after the fraction
    md = markdown(claims_table(_seeds({"spectral_ratio": {"opd": [0.5, 0.6, 0.7, 0.8, 0.9],
                                                          "grpo": [0.4, 0.5, 0.6, 0.7, 0.8]}})))
    line = next(x for x in md.splitlines() if x.startswith(f"| {_NAME['spectral_ratio']} |"))
    assert "0.700 ± 0.158" in line and "0.600 ± 0.158" in line and "5 / 5" in line and "**confirmed**" in line
    assert "| 0.0312 |" in line and "+0.100 [+0.100, +0.100]" in line


def test_the_shipped_five_seed_claims_are_their_seeds_judged_by_the_rule(tmp_path):
    """docs/LAB.md's table: the shipped claims.csv is what the one rule makes of the shipped claims_seeds.csv (five
    independent seeds), verdict for verdict and p-value for p-value."""
    from pathlib import Path

    shipped = Path(__file__).parent.parent / "docs" / "lab-regime" / "default-5seeds" / "claims"
    out = claims_from_seeds(shipped / "claims_seeds.csv", tmp_path / "out", log=lambda m: None)
    got, want = (pd.read_csv(d / "claims.csv").set_index("claim") for d in (out, shipped))
    assert list(got.index) == list(want.index)
    assert (got["verdict"].fillna("") == want["verdict"].fillna("")).all()
    pd.testing.assert_series_equal(got["p_value"], want["p_value"])
    assert got.loc[_NAME["opd_above_null"], "verdict"] == "confirmed"  # 5 / 5 seeds: p = 1/32
    assert got.loc[_NAME["teacher"], "verdict"] == "holds"


def test_effopd_values_of_a_measurement_without_effopd_or_with_gated_seeds(tmp_path):
    """An effopd.json whose measurement left EffOPD out (--methods) gives no rows; a gated-out seed (null) none."""
    import json

    from opd_dynamics.lab.claims import effopd_values

    (tmp_path / "effopd.json").write_text(json.dumps({"speedup": {"vanilla-3x": {"per_seed": {"0": 0.5}}}}))
    assert effopd_values(tmp_path) == []
    (tmp_path / "effopd.json").write_text(json.dumps({"speedup": {"effopd": {"per_seed": {"0": None, "1": 1.5}}}}))
    assert [(r["seed"], r["value"]) for r in effopd_values(tmp_path)] == [(1, 1.5)]
