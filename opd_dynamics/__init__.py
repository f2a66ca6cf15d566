"""opd-dynamics: measure how on-policy distillation changes a model's parameters, and extrapolate with EffOPD."""

from __future__ import annotations

__version__ = "0.1.0"

from opd_dynamics.errors import InputError
from opd_dynamics.naming import TensorName, parse_name

__all__ = ["InputError", "TensorName", "parse_name", "__version__"]

# --- public names added by feature modules (keep one import per line) ---
