"""The analysis layer: ΔW_t streamed tensor by tensor (`deltas`), per-matrix metrics (`metrics/`), their
composition per tensor (`tensor`), the executors and caches that run a pass, and the tidy `Report`.

`analyze()` is the one call (CSV tables + run.json); `describe()` its dry run.
"""

from opd_dynamics.analysis.api import SeriesLike, analyze, describe
from opd_dynamics.analysis.options import AnalysisOptions
from opd_dynamics.analysis.report import Report

__all__ = ["AnalysisOptions", "Report", "SeriesLike", "analyze", "describe"]
