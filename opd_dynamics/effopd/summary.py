"""EffOPD's step speedup over vanilla OPD, from an effopd_summary table: one rule for the lab's effopd.json and
the HTML report.

The speedup of a method is, per seed, vanilla's steps to target divided by the method's; the reported figure
is the median of those per-seed ratios over the seeds where both runs reached the target (not the ratio of the
medians, which pairs different seeds).
"""

from __future__ import annotations

import pandas as pd

BASELINE = "vanilla"


def _steps(summary: pd.DataFrame, method: str) -> pd.Series:
    """steps_to_target of one method's rows, indexed by seed (as numbers: a missed target is NaN)."""
    rows = summary[summary["method"] == method]
    return pd.Series(pd.to_numeric(rows["steps_to_target"], errors="coerce").astype(float).to_numpy(),
                     index=pd.Index(rows["seed"], name="seed"), name="steps_to_target")


def per_seed_speedups(summary: pd.DataFrame, method: str, baseline: str = BASELINE) -> pd.Series:
    """baseline's steps to target / `method`'s, per seed (index: seed). NaN where either run missed the
    target or a seed lacks one of the two rows."""
    return _steps(summary, baseline) / _steps(summary, method)


def median_speedup(summary: pd.DataFrame, method: str, baseline: str = BASELINE) -> float:
    """Median over seeds of the per-seed step speedups that exist; NaN when no seed has one."""
    return float(per_seed_speedups(summary, method, baseline).median())
