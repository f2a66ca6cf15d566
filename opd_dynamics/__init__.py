"""opd-dynamics: measure how on-policy distillation changes a model's parameters, and extrapolate with EffOPD."""

from __future__ import annotations

__version__ = "0.1.0"

from opd_dynamics.analysis import analyze, describe
from opd_dynamics.checkpoints import ModelDir, open_model
from opd_dynamics.engine import AnalysisOptions
from opd_dynamics.errors import InputError
from opd_dynamics.lora import LoraAdapter
from opd_dynamics.naming import TensorName, parse_name
from opd_dynamics.report import Report
from opd_dynamics.series import CheckpointSeries
from opd_dynamics.writer import write_model

__all__ = ["AnalysisOptions", "CheckpointSeries", "InputError", "LoraAdapter", "ModelDir", "Report", "TensorName",
           "__version__", "analyze", "describe", "open_model", "parse_name", "write_model"]
