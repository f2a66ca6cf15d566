"""The lab: genuine OPD (TRL DistillationTrainer) and GRPO runs on a tiny model and a verifiable task.

Heavy imports (transformers, TRL) are deferred to the functions that need them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["run_lab", "train_opd", "train_grpo", "evaluate_model", "PRESETS", "LabPreset"]

if TYPE_CHECKING:  # pragma: no cover
    from opd_dynamics.lab.evaluate import evaluate_model
    from opd_dynamics.lab.presets import PRESETS, LabPreset
    from opd_dynamics.lab.run import run_lab
    from opd_dynamics.lab.train import train_grpo, train_opd


def __getattr__(name: str) -> Any:
    if name == "run_lab":
        from opd_dynamics.lab.run import run_lab

        return run_lab
    if name in ("train_opd", "train_grpo"):
        from opd_dynamics.lab import train

        return getattr(train, name)
    if name == "evaluate_model":
        from opd_dynamics.lab.evaluate import evaluate_model

        return evaluate_model
    if name in ("PRESETS", "LabPreset"):
        from opd_dynamics.lab import presets

        return getattr(presets, name)
    raise AttributeError(name)
