"""Held-out accuracy at every one of a lab run's first optimizer steps: the dip check at step resolution.

The lab keeps checkpoints every ``save_steps`` (10 on the default preset), and a run's first step can drop held-out
accuracy and recover before the first of them (issue 27: step 1 fell to 0.60–0.62 on every run). `EarlyEval`
evaluates the model in training at step 0 and after each of the first ``DIP_STEPS`` optimizer steps (greedy,
the same held-out problems as ``eval.csv``: its step 0 equals eval.csv's) and writes ``RUN/early_eval.csv``.
Greedy generation draws no random numbers and the model's training mode is restored, so the training itself is
unchanged.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from transformers import TrainerCallback

from opd_dynamics.lab.evaluate import evaluate_model
from opd_dynamics.schema import TABLES

#: the optimizer steps the dip check evaluates one by one
DIP_STEPS = 10


class EarlyEval(TrainerCallback):
    """Writes ``out/early_eval.csv``: the run's held-out greedy accuracy at step 0 and steps 1 … ``steps``."""

    def __init__(self, out: Path, run: str, tokenizer, heldout, steps: int = DIP_STEPS):
        self.out, self.run, self.tok, self.heldout, self.steps = Path(out), run, tokenizer, heldout, steps
        self.rows: list[dict] = []

    def _measure(self, model, step: int) -> None:
        self.rows.append({"run": self.run, "step": step,
                          "accuracy": evaluate_model(model, self.tok, self.heldout)["accuracy"]})  # mode kept

    def on_train_begin(self, args, state, control, model=None, **kw):
        if state.global_step == 0:
            self._measure(model, 0)

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step <= self.steps:
            self._measure(model, state.global_step)

    def on_train_end(self, args, state, control, **kw):
        table = TABLES["early_eval"]
        self.out.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(self.rows, columns=table.names).to_csv(self.out / table.file, index=False)


def backfill(lab_dir: str | Path, log=print) -> list[Path]:
    """``early_eval.csv`` for the runs of a lab made before `EarlyEval` existed: each run's first `DIP_STEPS` steps
    trained again from its student_init with the lab's preset and seed (a constant rate, seeded data order and
    sampling: the same steps, the lab being bit-identical on one machine), evaluated at each step. The weights after
    the last of them must equal the run's own checkpoint at that step, where it kept one (else one sentence, and
    nothing is written). Returns the files written."""
    import shutil
    import tempfile

    from safetensors.torch import load_file

    from opd_dynamics.errors import InputError
    from opd_dynamics.io.model_dir import SINGLE_FILE
    from opd_dynamics.lab.layout import RUNS, LabDir
    from opd_dynamics.lab.presets import get_preset
    from opd_dynamics.lab.task import build_tokenizer
    from opd_dynamics.lab.train import splits_for, train_grpo, train_opd

    lab = LabDir(Path(lab_dir))
    meta = lab.meta()
    p, seed = get_preset(meta["preset"]["name"]), int(meta["seed"])
    tok = build_tokenizer()
    held = splits_for(p, seed).heldout[: p.n_eval]
    written = []
    for run in RUNS:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            cb = EarlyEval(tmp, run, tok, held)
            if run == "opd":
                train_opd(lab.student_init, lab.teacher, tmp / "ckpt", p, seed, [cb], max_steps=DIP_STEPS,
                          save_steps=DIP_STEPS)
            else:
                train_grpo(lab.student_init, tmp / "ckpt", p, seed, [cb], max_steps=DIP_STEPS, save_steps=DIP_STEPS)
            kept = lab.run(run) / f"checkpoint-{DIP_STEPS}" / SINGLE_FILE
            if kept.is_file():
                a, b = load_file(kept), load_file(tmp / "ckpt" / f"checkpoint-{DIP_STEPS}" / SINGLE_FILE)
                if a.keys() != b.keys() or any(not a[k].equal(b[k]) for k in a):
                    raise InputError(kept, f"the first {DIP_STEPS} steps trained again here do not reproduce this "
                                           "checkpoint (another machine, torch or thread count?); early_eval.csv not "
                                           "written")
                log(f"[early] {run}: step {DIP_STEPS} trained again equals {kept} bit for bit")
            target = lab.run(run) / TABLES["early_eval"].file
            shutil.move(tmp / TABLES["early_eval"].file, target)
            written.append(target)
    return written
