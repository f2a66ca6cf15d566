"""EffOPD: jump ahead along the update direction at steps 1, 2, 4, 8, … (in a trainer or on saved checkpoints).

`EffOPD` is framework-free (any `torch.nn.Module` and a `score_fn`); `EffOPDCallback` and the scorers
need transformers and are imported lazily; `extrapolate_checkpoint` / `search_checkpoints` work offline.
"""

from __future__ import annotations

_LAZY = {  # imported on first use, so `opd-dynamics --help` does not pay for torch
    "EffOPD": "opd_dynamics.effopd.search",
    "TriggerRecord": "opd_dynamics.effopd.search",
    "EffOPDOptions": "opd_dynamics.effopd.options",
    "is_power_of_two": "opd_dynamics.effopd.options",
    "make_trigger": "opd_dynamics.effopd.options",
    "select_parameters": "opd_dynamics.effopd.search",
    "published_search": "opd_dynamics.effopd.search",
    "EffOPDCallback": "opd_dynamics.effopd.callback",
    "reward_scorer": "opd_dynamics.effopd.callback",
    "reverse_kl_scorer": "opd_dynamics.effopd.callback",
    "sample_validation": "opd_dynamics.effopd.callback",
    "extrapolate_checkpoint": "opd_dynamics.effopd.offline",
    "search_checkpoints": "opd_dynamics.effopd.offline",
    "command_scorer": "opd_dynamics.effopd.offline",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
