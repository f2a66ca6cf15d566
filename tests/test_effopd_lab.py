"""The lab measurement's bookkeeping: steps to target, the summary table and the speedups (known answers)."""

from __future__ import annotations

import math

import pandas as pd

from opd_dynamics.lab.effopd import SUMMARY_COLUMNS, speedups, steps_to_target, summarize


def curves() -> pd.DataFrame:
    rows = []
    # vanilla ends at 0.8 → target 0.76, first reached at step 8; effopd reaches it at 4; fixed never
    for m, accs in {"vanilla": [0.2, 0.3, 0.5, 0.77, 0.8], "effopd": [0.2, 0.4, 0.76, 0.7, 0.82],
                    "fixed": [0.2, 0.0, 0.0, 0.1, 0.1]}.items():
        for step, a in zip([0, 2, 4, 8, 16], accs):
            rows.append({"seed": 0, "method": m, "step": step, "accuracy": a, "wall_s": step * 0.5})
    return pd.DataFrame(rows)


def test_steps_to_target():
    c = curves()
    v = c[c["method"] == "vanilla"]
    assert steps_to_target(v, 0.76) == 8
    assert steps_to_target(v, 0.2) == 0
    assert math.isnan(steps_to_target(v, 0.9))


def test_summary_and_speedup():
    c = curves()
    runs = pd.DataFrame([{"seed": 0, "method": m, "final_accuracy": f, "wall_s": w, "validation_s": v}
                         for m, f, w, v in (("vanilla", 0.8, 10.0, 0.0), ("effopd", 0.82, 12.0, 2.0),
                                            ("fixed", 0.1, 10.5, 0.0))])
    s = summarize(c, runs)
    assert list(s.columns) == SUMMARY_COLUMNS
    got = s.set_index("method")
    assert got.loc["vanilla", "steps_to_target"] == 8 and got.loc["effopd", "steps_to_target"] == 4
    assert math.isnan(got.loc["fixed", "steps_to_target"])
    assert got.loc["effopd", "validation_s"] == 2.0
    sp = speedups(s)
    assert sp["effopd"]["median"] == 2.0 and sp["fixed"]["median"] is None
