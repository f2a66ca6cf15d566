"""The lab: genuine OPD (TRL DistillationTrainer) and GRPO runs on a tiny model and a verifiable task.

Heavy imports (transformers, TRL) are deferred to the functions that need them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: public name → the lab module that holds it (imported on first use)
_WHERE = {"run_lab": "run", "run_lab_seeds": "run", "train_opd": "train", "train_grpo": "train",
          "evaluate_model": "evaluate", "PRESETS": "presets", "LabPreset": "presets", "lab_claims": "claims",
          "lab_extrapolation": "extrapolation", "run_pretrained_lab": "pretrained_run"}
__all__ = ["run_lab", "run_lab_seeds", "train_opd", "train_grpo", "evaluate_model", "PRESETS", "LabPreset",
           "lab_claims", "lab_extrapolation", "run_pretrained_lab"]  # = _WHERE's keys (tests/test_layers.py)

if TYPE_CHECKING:  # pragma: no cover
    from opd_dynamics.lab.claims import lab_claims
    from opd_dynamics.lab.evaluate import evaluate_model
    from opd_dynamics.lab.extrapolation import lab_extrapolation
    from opd_dynamics.lab.presets import PRESETS, LabPreset
    from opd_dynamics.lab.pretrained_run import run_pretrained_lab
    from opd_dynamics.lab.run import run_lab, run_lab_seeds
    from opd_dynamics.lab.train import train_grpo, train_opd


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(name)
    return getattr(importlib.import_module(f"opd_dynamics.lab.{_WHERE[name]}"), name)
