"""The recorder on a real lab OPD run: its overhead on the training step, and its agreement with the analysis of
checkpoints saved at every step (issue 21's checks).

From a lab directory's student_init and teacher (`lab run`), OPD at the lab's preset for STEPS optimizer steps,
twice in one process with the same seed: without the recorder (training time only), and with `DynamicsCallback`
recording every step and the trainer also saving a checkpoint at every step. Then `analyze` (exact spectra) of
those checkpoints against student_init, compared with the sketches: ‖ΔW_t‖F, σ1 … σk, and the direction cosine
of ΔW_t to the last step's ΔW_T, which the sketch gives from its stored triplets (exact when the kept k holds the
whole update; here the top-k part only, so the difference is what truncation costs).

    python benchmarks/bench_recorder.py LAB [--steps 20] [--k 16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback


class _Timer(TrainerCallback):
    """Wall-clock of the optimizer steps (on_step_begin … on_step_end), everything else excluded."""

    def __init__(self):
        self.total, self.t = 0.0, None

    def on_step_begin(self, args, state, control, **kw):
        self.t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.total += time.perf_counter() - self.t


def main() -> None:
    from opd_dynamics import CheckpointSeries, analyze
    from opd_dynamics.lab.layout import LabDir
    from opd_dynamics.lab.train import build_opd_trainer
    from opd_dynamics.record import DynamicsCallback, DynamicsRecorder

    ap = argparse.ArgumentParser()
    ap.add_argument("lab", type=Path)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--svd", default="exact", choices=("exact", "fast"))
    a = ap.parse_args()
    lab = LabDir(a.lab).require(meta=True, teacher=True)
    preset = lab.meta()["preset"]["name"]
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        times = {}
        for with_rec in (False, True):
            timer = _Timer()
            cbs: list = [timer]
            if with_rec:  # the step timer stops before the recorder runs (callbacks in order): timed apart below
                cb = DynamicsCallback(DynamicsRecorder(tmp / "sketch", k=a.k, svd=a.svd))
                cbs = [timer, cb]
            trainer = build_opd_trainer(lab.student_init, lab.teacher, tmp / f"run-{with_rec}", preset, 0, cbs,
                                        max_steps=a.steps, save_steps=1 if with_rec else a.steps + 1,
                                        data_seed=lab.split_seed(0))
            if with_rec:
                cb.bind(trainer)
            trainer.train()
            times[with_rec] = timer.total
        print(f"lab {a.lab} (preset {preset}), {a.steps} OPD steps, k = {a.k}, svd {a.svd}, 1 torch thread")
        print(f"training steps without the recorder: {times[False]:.1f} s ({times[False] / a.steps * 1e3:.0f} ms/step)")
        rec = pd.read_csv(tmp / "sketch" / "sketch.csv")
        # the recorder's time, measured directly: a fresh recorder over the saved steps, less loading them
        rec2 = DynamicsRecorder(tmp / "sketch-timing", k=a.k, svd=a.svd)
        from opd_dynamics.lab.models import load_model

        rec2.record(load_model(lab.student_init), 0)
        t0 = time.perf_counter()
        for s in range(1, a.steps + 1):
            rec2.record(load_model(tmp / "run-True" / f"checkpoint-{s}"), s)
        per = (time.perf_counter() - t0) / a.steps
        load = []
        for s in range(1, min(a.steps, 5) + 1):
            t = time.perf_counter()
            load_model(tmp / "run-True" / f"checkpoint-{s}")
            load.append(time.perf_counter() - t)
        per -= float(np.mean(load))
        print(f"recorder per recorded step: {per * 1e3:.0f} ms = {per / (times[False] / a.steps):.1%} of a training "
              f"step; memory: W_0 and the previous weights of {rec['tensor'].nunique()} matrices in float32")
        series = CheckpointSeries.discover(tmp / "run-True", base=lab.student_init)
        rep = analyze(series, progress=False, n_singular_values=a.k)
        ma = rep.module_allocation.set_index(["step", "tensor"])["update_norm"]
        sv = rep.singular_values.set_index(["step", "tensor", "index"])["sigma"]
        r = rec.set_index(["step", "tensor"])
        norm_err = float((r["update_norm"] / ma.reindex(r.index) - 1).abs().max())
        sig_err = 0.0
        cos_err = 0.0
        last = a.steps
        sk_last = load_file(tmp / "sketch" / f"step-{last:08d}.safetensors")
        al = rep.alignment.set_index(["step", "tensor"])["direction_cosine"]
        for step in range(1, a.steps + 1):
            sk = load_file(tmp / "sketch" / f"step-{step:08d}.safetensors")
            for name in rec["tensor"].unique():
                S = sk[f"{name}::S"].double()
                ref = torch.tensor([sv[(step, name, i + 1)] for i in range(len(S))], dtype=torch.float64)
                sig_err = max(sig_err, float(((S - ref).abs() / ref).max()))
                if step < last:
                    a_t = sk[f"{name}::U"].double() @ torch.diag(S) @ sk[f"{name}::V"].double().T
                    b = sk_last[f"{name}::U"].double() @ torch.diag(sk_last[f"{name}::S"].double()) @ \
                        sk_last[f"{name}::V"].double().T
                    cos = float((a_t * b).sum() / (a_t.norm() * b.norm()))
                    cos_err = max(cos_err, abs(cos - al[(step, name)]))
        print(f"agreement with the checkpoint analysis over {a.steps} steps × {rec['tensor'].nunique()} matrices: "
              f"‖ΔW‖F max relative error {norm_err:.1e}; σ1…σ{a.k} max relative error {sig_err:.1e}; direction "
              f"cosine to the last step from the rank-{a.k} sketches, max absolute difference {cos_err:.3f}")


if __name__ == "__main__":
    sys.exit(main())
