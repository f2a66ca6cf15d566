"""Learning-rate sweep of the lab's OPD and GRPO runs (issue 18, item 1): short runs from one student_init,
held-out accuracy every few steps, → a curves CSV and a summary CSV (docs/lab-regime/).

    .venv/bin/python benchmarks/lab_sweep.py --lab LAB --out docs/lab-regime \\
        --opd-lrs 3e-5 1e-4 3e-4 --grpo-lrs 3e-5 1e-4 3e-4 --steps 150 --eval-every 10

``--lab`` is a lab directory with teacher/ and student_init/ (e.g. from `opd-dynamics lab run`); without it the
preset's teacher and student_init are trained first (seed 0) into ``--work``. Every run starts from the same
student_init with the preset's batch (OPD: rollouts_per_step prompts × 1 sample; GRPO: rollouts_per_step /
grpo_generations prompts × grpo_generations samples) and differs only in its constant learning rate.

Summary columns: acc_0, acc_early (at --early), acc_end (mean of the last three evaluations), min_early (lowest
accuracy up to --early), dip (min_early < acc_0 − --dip-tol), plateau_step (first evaluation at which accuracy
reaches acc_0 + 0.9·(acc_end − acc_0); empty when acc_end ≤ acc_0), wall_s (training only, evaluation excluded),
eval_s, rel_update (‖W_T − W_0‖F / ‖W_0‖F over all parameters) and, for GRPO, the share of groups with
non-zero reward variance (mean and min over steps). The rule the lab's presets follow: the largest rate whose
run improves without a dip and plateaus within ~60–150 steps.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from opd_dynamics.lab.evaluate import evaluate_model
from opd_dynamics.lab.layout import LabDir
from opd_dynamics.lab.models import load_model
from opd_dynamics.lab.presets import get_preset
from opd_dynamics.lab.task import build_tokenizer
from opd_dynamics.lab.train import (
    build_grpo_trainer,
    build_opd_trainer,
    group_stats_callback,
    splits_for,
    train_teacher_and_student,
)


class Curve(TrainerCallback):
    """Held-out greedy/sampled accuracy and reverse KL of the model being trained, at step 0 and every
    ``every`` steps, and its relative displacement from the start; its own time is kept apart."""

    def __init__(self, tok, held, teacher, every: int, steps: int, log):
        self.tok, self.held, self.teacher, self.every, self.steps, self.log = tok, held, teacher, every, steps, log
        self.rows: list[dict] = []
        self.eval_s = 0.0
        self.w0: dict[str, torch.Tensor] = {}

    def _eval(self, model, step: int) -> None:
        t0 = time.perf_counter()
        if not self.w0:
            self.w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
        num = sum(float((p.detach() - self.w0[n]).double().pow(2).sum()) for n, p in model.named_parameters())
        den = sum(float(w.double().pow(2).sum()) for w in self.w0.values())
        r = evaluate_model(model, self.tok, self.held, teacher=self.teacher, greedy=True, sampled=True, seed=0)
        self.rows.append({"step": step, **r, "rel_update": math.sqrt(num / den)})
        self.eval_s += time.perf_counter() - t0
        self.log(f"    step {step}: accuracy {r['accuracy']:.3f} sampled {r['accuracy_sampled']:.3f} "
                 f"reverse KL {r['reverse_kl']:.3f} rel. update {math.sqrt(num / den):.4f}")

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._eval(model, 0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == self.steps:
            self._eval(model, state.global_step)


def summarize(curve: pd.DataFrame, early: int, dip_tol: float) -> dict:
    c = curve.sort_values("step")
    acc0 = float(c["accuracy"].iloc[0])
    end = float(c["accuracy"].tail(3).mean())
    e = c[(c["step"] > 0) & (c["step"] <= early)]
    min_early = float(e["accuracy"].min()) if len(e) else float("nan")
    acc_early = float(e["accuracy"].iloc[-1]) if len(e) else float("nan")
    plateau = None
    if end > acc0:
        hit = c[c["accuracy"] >= acc0 + 0.9 * (end - acc0)]
        plateau = int(hit["step"].iloc[0]) if len(hit) else None
    return {"acc_0": acc0, "acc_early": acc_early, "acc_end": end, "acc_max": float(c["accuracy"].max()),
            "min_early": min_early, "dip": bool(min_early < acc0 - dip_tol), "plateau_step": plateau,
            "kl_0": float(c["reverse_kl"].iloc[0]), "kl_end": float(c["reverse_kl"].tail(3).mean()),
            "rel_update": float(c["rel_update"].iloc[-1])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="default")
    ap.add_argument("--lab", type=Path, help="a lab directory with teacher/ and student_init/")
    ap.add_argument("--work", type=Path, default=Path("lab-sweep-work"), help="where models are trained without --lab")
    ap.add_argument("--out", type=Path, default=Path("docs/lab-regime"))
    ap.add_argument("--tag", default="sweep", help="file name stem: TAG_curves.csv, TAG_summary.csv")
    ap.add_argument("--opd-lrs", type=float, nargs="*", default=[3e-5, 1e-4, 3e-4])
    ap.add_argument("--grpo-lrs", type=float, nargs="*", default=[3e-5, 1e-4, 3e-4])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--early", type=int, default=30, help="the 'early' window for the dip (steps)")
    ap.add_argument("--dip-tol", type=float, default=0.03, help="a dip: accuracy this far below step 0's")
    ap.add_argument("--n-eval", type=int, default=None, help="held-out prompts (default: the preset's n_eval)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    p = get_preset(a.preset)

    def log(m: str) -> None:
        print(m, flush=True)

    if a.lab is None:
        train_teacher_and_student(a.work, p, a.seed, log=log)
        a.lab = a.work
    lab = LabDir(a.lab).require(teacher=True)
    data_seed = lab.split_seed(a.seed)
    tok = build_tokenizer()
    held = splits_for(p, data_seed).heldout[: a.n_eval or p.n_eval]
    teacher = load_model(lab.teacher)
    a.out.mkdir(parents=True, exist_ok=True)
    curves, summary = [], []
    runs = [("opd", lr) for lr in a.opd_lrs] + [("grpo", lr) for lr in a.grpo_lrs]
    for method, lr in runs:
        log(f"[sweep] {method} lr {lr:g}: {a.steps} steps, {p.rollouts_per_step} completions per step, "
            f"eval every {a.eval_every} on {len(held)} held-out prompts")
        curve = Curve(tok, held, teacher, a.eval_every, a.steps, log)
        stats = group_stats_callback()
        out_dir = a.out / f".run-{method}-{lr:g}"
        kw = dict(callbacks=[curve, stats], max_steps=a.steps, save_steps=a.steps + 1, data_seed=data_seed, lr=lr)
        if method == "opd":
            tr = build_opd_trainer(lab.student_init, lab.teacher, out_dir, p, a.seed, **kw)
        else:
            tr = build_grpo_trainer(lab.student_init, out_dir, p, a.seed, **kw)
        tr.remove_callback(ProgressCallback)
        t0 = time.perf_counter()
        tr.train()
        total = time.perf_counter() - t0
        c = pd.DataFrame(curve.rows).assign(method=method, lr=lr)
        if stats.rows:
            g = pd.DataFrame(stats.rows)
            c = c.merge(g[["step", "nonzero_var_groups"]], on="step", how="left")
        curves.append(c)
        row = {"method": method, "lr": lr, "steps": a.steps, "completions_per_step": p.rollouts_per_step,
               **summarize(c, a.early, a.dip_tol), "wall_s": round(total - curve.eval_s, 1),
               "eval_s": round(curve.eval_s, 1)}
        if stats.rows:
            row |= {"nonzero_var_mean": float(g["nonzero_var_groups"].mean()),
                    "nonzero_var_min": float(g["nonzero_var_groups"].min())}
            pd.DataFrame(stats.rows).assign(lr=lr).to_csv(a.out / f"{a.tag}_grpo_groups_{lr:g}.csv", index=False)
        summary.append(row)
        log(f"[sweep] {method} lr {lr:g}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                         for k, v in row.items() if k not in ("method", "lr")))
        shutil.rmtree(out_dir, ignore_errors=True)
        # written after every run, so an interrupted sweep keeps what it measured
        pd.concat(curves, ignore_index=True).to_csv(a.out / f"{a.tag}_curves.csv", index=False)
        pd.DataFrame(summary).to_csv(a.out / f"{a.tag}_summary.csv", index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
