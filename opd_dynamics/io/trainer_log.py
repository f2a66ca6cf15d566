"""Logging scalars through a transformers Trainer from a callback (EffOPD's triggers, the recorder's dynamics)."""

from __future__ import annotations


def log_metrics(trainer, state, control, logs: dict[str, float]) -> None:
    """Log ``logs`` through ``trainer`` (its base `Trainer.log`, which leaves TRL's pending training metrics alone,
    and reaches every `report_to` backend); without a trainer, append them to ``state.log_history``."""
    if trainer is not None:
        from transformers import Trainer

        pending = control.should_log  # the handler's on_log clears it, which would drop the trainer's own log
        Trainer.log(trainer, logs)
        control.should_log = trainer.control.should_log = pending
    else:
        state.log_history.append({**logs, "step": state.global_step})
