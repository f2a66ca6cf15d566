"""opd-dynamics: measure how on-policy distillation changes a model's parameters, and extrapolate with EffOPD.

The packages are layers (docs/ARCHITECTURE.md): `numerics` and `io` at the bottom, `analysis` on them,
`interventions` and `effopd` beside it, `plotting` and `lab` on top, `cli` assembling the commands.
"""

from __future__ import annotations

from opd_dynamics._version import __version__
from opd_dynamics.analysis import AnalysisOptions, Report, analyze, describe
from opd_dynamics.errors import InputError
from opd_dynamics.io import (
    CheckpointSeries,
    LoraAdapter,
    ModelDir,
    SketchSeries,
    TensorName,
    open_model,
    parse_name,
    write_model,
)

__all__ = ["AnalysisOptions", "CheckpointSeries", "InputError", "LoraAdapter", "ModelDir", "Report", "SketchSeries",
           "TensorName", "__version__", "analyze", "describe", "open_model", "parse_name", "write_model"]
