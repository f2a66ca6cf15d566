"""Probe (issue 18, item 1): the student init stopped on *sampled* held-out accuracy >= T (checked every 25 steps)
instead of the preset's greedy >= 0.45; then the teacher by SFT from it (as the preset), its reverse KL and pass@8.

    .venv/bin/python benchmarks/lab_init_stop_probe.py SEED T OUT   → prints a RESULT line (JSON)

docs/lab-regime/init_stop_probe.csv holds seeds 0, 1, 2 at T = 0.30. It swaps train.evaluate_model for the
student's SFT only (a probe, not a lab option).
"""

import json
import sys
import time

import torch

from opd_dynamics.lab import train as T
from opd_dynamics.lab.evaluate import evaluate_model
from opd_dynamics.lab.layout import LabDir
from opd_dynamics.lab.models import load_model, make_model
from opd_dynamics.lab.presets import get_preset
from opd_dynamics.lab.run import pass_rates
from opd_dynamics.lab.task import build_tokenizer


def main(seed: int, thr: float, out: str) -> None:
    p = get_preset("default")
    torch.set_num_threads(p.threads)
    tok = build_tokenizer()
    sp = T.splits_for(p, seed)
    held = sp.heldout[: p.n_eval]
    T.seed_everything(seed)

    def sampled_eval(model, tok_, probs, *a, **k):
        return {"accuracy": evaluate_model(model, tok_, probs, greedy=False, sampled=True, seed=0)["accuracy_sampled"]}

    t0 = time.time()
    st = make_model(p.student, tok, seed + 1)  # as train_teacher_and_student
    T.evaluate_model = sampled_eval
    try:
        info = {"student": T.train_sft(st, tok, sp.train, held, steps=p.student_max_steps, lr=p.student_lr,
                                       batch=p.sft_batch, seed=seed + 1, target=thr, eval_every=p.sft_eval_every,
                                       log=print)}
    finally:
        T.evaluate_model = evaluate_model
    T.save_model_dir(st, tok, LabDir(out).student_init)
    te = load_model(LabDir(out).student_init)
    info["teacher"] = T.train_sft(te, tok, sp.train, held, steps=p.teacher_max_steps, lr=p.teacher_lr,
                                  batch=p.sft_batch, seed=seed + 2, target=p.teacher_target,
                                  eval_every=p.sft_eval_every, log=print)
    s = load_model(LabDir(out).student_init)
    info["init"] = evaluate_model(s, tok, held, teacher=te) | pass_rates(s, tok, held, p.pass_k, seed)
    info["seconds"] = time.time() - t0
    print("RESULT", json.dumps({"seed": seed, "threshold": thr, **info}), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), float(sys.argv[2]), sys.argv[3])
