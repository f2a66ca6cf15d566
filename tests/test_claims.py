"""The claims table's rules on planted per-seed values: the sign test over seeds, preconditions first, claims the
lab cannot test, EffOPD's speedup rule."""

from __future__ import annotations

import pandas as pd
import pytest

from opd_dynamics.lab.claims import CLAIMS, claims_table, early_step, markdown
from opd_dynamics.schema import TABLES

_NAME = {c.key: c.name for c in CLAIMS}


def _seeds(values: dict[str, dict[str, list[float]]], n: int = 3) -> pd.DataFrame:
    """Per-seed rows; the preconditions pass unless `values` says otherwise."""
    base = {"teacher": {"teacher": [0.97] * n}, "grpo_gain": {"grpo": [0.3] * n, "opd": [0.4] * n},
            "opd_dip": {"opd": [0.0] * n, "grpo": [-0.01] * n}}
    rows = [{"seed": s, "claim": _NAME[k], "run": r, "value": v}
            for k, by_run in {**base, **values}.items() for r, vs in by_run.items() for s, v in enumerate(vs)]
    return pd.DataFrame(rows, columns=TABLES["claims_seeds"].names)


def _verdicts(seeds: pd.DataFrame) -> dict[str, tuple]:
    t = claims_table(seeds)
    assert list(t.columns) == TABLES["claims"].names
    return {r.claim: (r.verdict, r.seeds_agreeing, r.seeds_compared) for r in t.itertuples()}


def test_a_paired_claim_is_confirmed_only_when_every_seed_goes_the_papers_way():
    v = _verdicts(_seeds({
        "spectral_ratio": {"opd": [0.5, 0.6, 0.7], "grpo": [0.4, 0.5, 0.6]},  # opd>grpo on all three
        "effective_rank": {"opd": [5, 6, 7], "grpo": [4, 5, 6]},  # paper: opd<grpo; all three the other way
        "mlp_share": {"opd": [0.6, 0.4, 0.6], "grpo": [0.5, 0.5, 0.5]},  # 2 of 3
        "top1pct": {"opd": [0.5, 0.5, 0.5], "grpo": [0.5, 0.5, 0.5]},  # ties go neither way
        "opd_above_null": {"opd": [0.1, 0.2, 0.05]},
        "grpo_above_null": {"grpo": [-0.1, -0.2, -0.05]},
        "embedding_shift": {"opd": [0.1] * 3, "grpo": [0.2] * 3},
    }))
    assert v[_NAME["teacher"]] == ("confirmed", 3, 3)
    assert v[_NAME["spectral_ratio"]] == ("confirmed", 3, 3)
    assert v[_NAME["effective_rank"]] == ("refuted", 0, 3)
    assert v[_NAME["mlp_share"]] == ("inconclusive", 2, 3)
    assert v[_NAME["top1pct"]] == ("inconclusive", 0, 3)
    assert v[_NAME["opd_above_null"]] == ("confirmed", 3, 3)
    assert v[_NAME["grpo_above_null"]] == ("refuted", 0, 3)
    assert v[_NAME["embedding_shift"]][0] == "not testable"  # 16 tokens: whatever the values say
    assert v[_NAME["effopd"]][0] == "not testable"  # no EffOPD rows given


def test_two_seeds_are_never_enough_for_a_verdict():
    v = _verdicts(_seeds({"spectral_ratio": {"opd": [0.5, 0.6], "grpo": [0.4, 0.5]}}, n=2))
    assert v[_NAME["spectral_ratio"]] == ("inconclusive", 2, 2)


def test_a_failed_precondition_makes_every_comparison_not_testable():
    seeds = _seeds({"grpo_gain": {"grpo": [0.3, 0.1, 0.3], "opd": [0.4] * 3},
                    "spectral_ratio": {"opd": [0.5] * 3, "grpo": [0.4] * 3}})
    t = claims_table(seeds).set_index("claim")
    assert t.loc[_NAME["grpo_gain"], "verdict"] == "refuted"
    assert (t.loc[_NAME["grpo_gain"], "seeds_agreeing"], t.loc[_NAME["grpo_gain"], "seeds_compared"]) == (2, 3)
    assert t.loc[_NAME["spectral_ratio"], "verdict"] == "not testable"
    assert "GRPO learns holds on 2 of 3 seeds" in t.loc[_NAME["spectral_ratio"], "note"]
    assert t.loc[_NAME["grpo_gain"], "grpo_mean"] == pytest.approx(0.7 / 3)
    assert t.loc[_NAME["grpo_gain"], "grpo_sd"] == pytest.approx(pd.Series([0.3, 0.1, 0.3]).std())


def test_effopd_needs_a_median_of_two_with_every_seed_faster():
    def verdict(speedups):
        rows = _seeds({}, n=5)
        eff = pd.DataFrame([{"seed": s, "claim": _NAME["effopd"], "run": "effopd", "value": x}
                            for s, x in enumerate(speedups)])
        return _verdicts(pd.concat([rows, eff], ignore_index=True))[_NAME["effopd"]]

    assert verdict([2.0, 3.0, 2.5, 4.0, 2.0]) == ("confirmed", 5, 5)
    assert verdict([2.0, 3.0, 2.5, 4.0, 0.9]) == ("inconclusive", 4, 5)  # one seed slower
    assert verdict([1.0, 1.0, 1.2, 0.8, 1.0]) == ("refuted", 1, 5)  # median 1
    assert verdict([1.5, 1.5, 1.5, 1.5, 1.5]) == ("inconclusive", 5, 5)


def test_early_step_and_markdown():
    assert early_step([10, 20, 30, 40, 150], 0.2) == 30
    assert early_step([150, 10, 20], 0.2) == 150  # no step between: the first at or after the fraction
    md = markdown(claims_table(_seeds({"spectral_ratio": {"opd": [0.5, 0.6, 0.7], "grpo": [0.4, 0.5, 0.6]}})))
    line = next(x for x in md.splitlines() if x.startswith(f"| {_NAME['spectral_ratio']} |"))
    assert "0.600 ± 0.100" in line and "0.500 ± 0.100" in line and "3 / 3" in line and "**confirmed**" in line
