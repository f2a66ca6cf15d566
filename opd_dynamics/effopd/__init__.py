"""EffOPD: jump ahead along the update direction at steps 1, 2, 4, 8, … (in a trainer or on saved checkpoints).

`EffOPD` is framework-free (any `torch.nn.Module` and a `score_fn`); `EffOPDCallback` and the scorers
need transformers and are imported lazily; `extrapolate_checkpoint` / `search_checkpoints` work offline.
"""

from __future__ import annotations

from opd_dynamics.effopd.search import EffOPD, TriggerRecord, is_power_of_two, make_trigger, select_parameters

_LAZY = {
    "EffOPDCallback": "opd_dynamics.effopd.callback",
    "reward_scorer": "opd_dynamics.effopd.callback",
    "reverse_kl_scorer": "opd_dynamics.effopd.callback",
    "sample_validation": "opd_dynamics.effopd.callback",
    "extrapolate_checkpoint": "opd_dynamics.effopd.offline",
    "search_checkpoints": "opd_dynamics.effopd.offline",
    "command_scorer": "opd_dynamics.effopd.offline",
}

__all__ = ["EffOPD", "TriggerRecord", "is_power_of_two", "make_trigger", "select_parameters", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
