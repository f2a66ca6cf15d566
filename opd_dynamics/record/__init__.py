"""Recording the update's dynamics inside training (issue 21): `DynamicsRecorder`."""

from opd_dynamics.record.recorder import DynamicsRecorder

__all__ = ["DynamicsRecorder"]
