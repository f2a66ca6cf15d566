"""`DynamicsCallback`: the recorder inside any transformers or TRL Trainer."""

from __future__ import annotations

from transformers import TrainerCallback

from opd_dynamics.io.trainer_log import log_metrics
from opd_dynamics.record.recorder import DynamicsRecorder


class DynamicsCallback(TrainerCallback):
    """A transformers `TrainerCallback` around a `DynamicsRecorder`: keeps the start weights before the first
    optimizer step (step 0; on a run resumed from a checkpoint, the step it resumes at, which needs
    ``DynamicsRecorder(..., resume=True)``), records every scheduled step after an optimizer step, and logs the
    recorder's scalars through the trainer (so TensorBoard, W&B or whatever `report_to` names shows them) once
    `bind(trainer)` has been called; unbound, into `state.log_history`. A step recorded in the background is logged
    when it is finished, at a later trainer step: its ``dynamics/step`` says which step it measured.

        rec = DynamicsRecorder("sketches", k=16)
        trainer = GRPOTrainer(..., callbacks=[cb := DynamicsCallback(rec)]); cb.bind(trainer)
        trainer.train()
    """

    def __init__(self, recorder: DynamicsRecorder):
        self.recorder, self.trainer = recorder, None

    def bind(self, trainer) -> DynamicsCallback:
        self.trainer = trainer
        return self

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        # not on_train_begin: a resumed Trainer restores global_step and the weights after that event
        if not self.recorder.started:
            self.recorder.record(model, state.global_step)
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # every rank calls the recorder (under FSDP the matrices are gathered collectively); rank 0 writes and logs
        self.recorder.record(model, state.global_step)
        self._log(state, control)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.recorder.close()
        self._log(state, control)
        return control

    def _log(self, state, control) -> None:
        """The scalars of every step the recorder finished (in the background: usually the previous one; each
        carries its own ``dynamics/step``)."""
        for scalars in self.recorder.pop_completed():
            if state.is_world_process_zero:
                log_metrics(self.trainer, state, control, scalars)
