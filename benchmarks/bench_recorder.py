"""The recorder on a real lab OPD run: its overhead on the training step, and its agreement with the analysis of
checkpoints saved at every step (issue 21's checks).

From a lab directory's student_init and teacher (`lab run`), OPD at the lab's preset for STEPS optimizer steps,
twice in one process with the same seed: without the recorder (training time only), and with `DynamicsCallback`
recording every step and the trainer also saving a checkpoint at every step. Then `analyze` (exact spectra) of
those checkpoints against student_init, compared with `analyze` of the sketch series: ‖ΔW_t‖F, σ1 … σk, the
segment cosines and the alignment columns a sketch determines (subspace overlaps, paired and rank-1 cosines, to
the last step). The recorder's own time is measured apart, on the saved steps, less the time to load them.

    python benchmarks/bench_recorder.py LAB [--steps 20] [--k 16]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
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
    from opd_dynamics import CheckpointSeries, SketchSeries, analyze
    from opd_dynamics.lab.layout import LabDir
    from opd_dynamics.lab.train import build_opd_trainer
    from opd_dynamics.record import DynamicsCallback, DynamicsRecorder

    ap = argparse.ArgumentParser()
    ap.add_argument("lab", type=Path)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--svd", default="fast", choices=("exact", "fast"))
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
        n_mat = rec["tensor"].nunique()
        kept_mb = 3 * sum(math.prod(v["shape"]) for v in SketchSeries(tmp / "sketch").tensors.values()) * 4 / 1e6
        step_mb = np.mean([f.stat().st_size for f in (tmp / "sketch").glob("step-*.safetensors")]) / 1e6
        print(f"recorder per recorded step: {per * 1e3:.1f} ms = {per / (times[False] / a.steps):.1%} of a training "
              f"step; memory: W_0, the previous weights and the previous segment of {n_mat} matrices in float32 "
              f"({kept_mb:.1f} MB) plus the anchors' triplets; {step_mb:.3f} MB per step on disk")
        ck = analyze(CheckpointSeries.discover(tmp / "run-True", base=lab.student_init), progress=False,
                     n_singular_values=a.k, k_subspace=a.k, k_paired=a.k)
        sk = analyze(SketchSeries(tmp / "sketch", name=ck.module_allocation["run"].iloc[0]), k_subspace=a.k,
                     k_paired=a.k)
        key = ["step", "tensor"]
        m = sk.module_allocation.merge(ck.module_allocation, on=key, suffixes=("", "_ck"))
        norm_err = float((m["update_norm"] / m["update_norm_ck"] - 1).abs().max())
        sv = sk.singular_values.merge(ck.singular_values, on=[*key, "index"], suffixes=("", "_ck"))
        sv["err"] = (sv["sigma"] / sv["sigma_ck"] - 1).abs()
        by_index = sv.groupby("index")["err"].max()
        al = sk.alignment.merge(ck.alignment, on=key, suffixes=("", "_ck"))
        errs = {c: float((al[c] - al[f"{c}_ck"]).abs().max()) for c in
                ("subspace_overlap_u", "subspace_overlap_v", "paired_cosine", "rank1_cosine")}
        seg = sk.segments.merge(ck.segments, on=key, suffixes=("", "_ck")).dropna(subset=["segment_cosine"])
        seg_err = float((seg["segment_cosine"] - seg["segment_cosine_ck"]).abs().max())
        print(f"agreement with the checkpoint analysis (exact float64) over {a.steps} steps x {n_mat} matrices: "
              f"‖ΔW‖F max relative error {norm_err:.1e}; σ1…σ{a.k} max relative error {by_index.max():.1e} "
              f"(σ1 {by_index.iloc[0]:.1e}, σ{a.k} {by_index.iloc[-1]:.1e}); segment cosine {seg_err:.1e}; "
              + "; ".join(f"{c} {v:.1e}" for c, v in errs.items())
              + f"; direction_cosine: not available from a sketch (mean over the checkpoints "
              f"{al['direction_cosine_ck'].mean():.3f})")

if __name__ == "__main__":
    sys.exit(main())
