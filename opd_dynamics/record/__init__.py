"""Recording the update's dynamics inside training (issue 21): `DynamicsRecorder`, and `DynamicsCallback` for
transformers/TRL trainers (transformers is imported only when the callback is asked for)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from opd_dynamics.record.recorder import DynamicsRecorder

__all__ = ["DynamicsCallback", "DynamicsRecorder"]

if TYPE_CHECKING:  # pragma: no cover
    from opd_dynamics.record.callback import DynamicsCallback


def __getattr__(name: str) -> Any:
    if name == "DynamicsCallback":
        from opd_dynamics.record.callback import DynamicsCallback

        return DynamicsCallback
    raise AttributeError(name)
