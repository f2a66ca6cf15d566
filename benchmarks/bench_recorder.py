"""The recorder on a real lab OPD run: its overhead on the training step, and its agreement with the analysis of
checkpoints saved at every step (issue 21's checks).

From a lab directory's student_init and teacher (`lab run`), OPD at the lab's preset for STEPS optimizer steps,
three times in one process with the same seed: without the recorder, with `DynamicsCallback` recording every step
(the overhead: median whole-step wall time against the first), and with the recorder while the trainer also saves
a checkpoint at every step. Then `analyze` (exact spectra) of those checkpoints against student_init, compared
with `analyze` of that run's sketch series: ‖ΔW_t‖F, σ1 … σk, the segment cosines and the alignment columns a
sketch determines (subspace overlaps, paired and rank-1 cosines, to the last step).

    python benchmarks/bench_recorder.py LAB [--steps 20] [--k 16] [--svd exact|fast] [--foreground]
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
    """Wall-clock of each whole training step, end to end (from one step's end to the next: the forward and
    backward passes, generation, the optimizer and every callback, the recorder's included)."""

    def __init__(self):
        self.steps, self.t = [], None

    def on_step_end(self, args, state, control, **kw):
        now = time.perf_counter()
        if self.t is not None:
            self.steps.append(now - self.t)
        self.t = now


def main() -> None:
    from opd_dynamics import CheckpointSeries, SketchSeries, analyze
    from opd_dynamics.lab.layout import LabDir
    from opd_dynamics.lab.train import build_opd_trainer
    from opd_dynamics.record import DynamicsCallback, DynamicsRecorder

    ap = argparse.ArgumentParser()
    ap.add_argument("lab", type=Path)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--svd", default="exact", choices=("exact", "fast"))
    ap.add_argument("--foreground", action="store_true", help="record in the training thread (no worker)")
    ap.add_argument("--repeats", type=int, default=3, help="plain and recorded runs, alternated (the step time "
                                                           "varies run to run by several percent)")
    a = ap.parse_args()
    lab = LabDir(a.lab).require(meta=True, teacher=True)
    preset = lab.meta()["preset"]["name"]
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        per_step, recs = {"plain": [], "recorder": []}, {}
        # the same seeded OPD run, plain and with the recorder, alternated `repeats` times; then once with the
        # recorder and a checkpoint at every step (the reference the sketches are checked against; not timed)
        modes = [m for _ in range(a.repeats) for m in ("plain", "recorder")] + ["checkpoints"]
        for i, mode in enumerate(modes):
            timer = _Timer()
            cbs: list = [timer]
            if mode != "plain":
                recs[mode] = DynamicsRecorder(tmp / f"sketch-{mode}-{i}", k=a.k, svd=a.svd,
                                              background=not a.foreground)
                cb = DynamicsCallback(recs[mode])
                cbs = [cb, timer]
            trainer = build_opd_trainer(lab.student_init, lab.teacher, tmp / f"run-{mode}-{i}", preset, 0, cbs,
                                        max_steps=a.steps, save_steps=1 if mode == "checkpoints" else a.steps + 1,
                                        data_seed=lab.split_seed(0))
            if mode != "plain":
                cb.bind(trainer)
            trainer.train()
            per_step.setdefault(mode, []).extend(timer.steps)
        sketch = tmp / f"sketch-checkpoints-{len(modes) - 1}"
        rec = pd.read_csv(sketch / "sketch.csv")
        r = recs["recorder"]  # the last recorded run
        print(f"lab {a.lab} (preset {preset}), {a.steps} OPD steps, k = {a.k}, svd {a.svd}, "
              f"{'foreground' if a.foreground else 'background'}, 1 torch thread")
        plain, with_rec = (float(np.median(per_step[m])) for m in ("plain", "recorder"))
        print(f"median training step over {a.repeats} alternated runs each: {plain * 1e3:.0f} ms without the "
              f"recorder, {with_rec * 1e3:.0f} ms with it: overhead {with_rec / plain - 1:+.1%} (quartiles of a "
              f"plain step {np.percentile(per_step['plain'], 25) * 1e3:.0f}-"
              f"{np.percentile(per_step['plain'], 75) * 1e3:.0f} ms); the recorder's own time per step (last run): "
              f"{r.seconds['record'] / a.steps * 1e3:.1f} ms in the training thread (copy, and any wait), "
              f"{r.seconds['work'] / a.steps * 1e3:.1f} ms of work")
        n_mat = rec["tensor"].nunique()
        copy_mb = sum(math.prod(v["shape"]) for v in SketchSeries(sketch).tensors.values()) * 4 / 1e6
        step_mb = np.mean([f.stat().st_size for f in sketch.glob("step-*.safetensors")]) / 1e6
        print(f"memory: W_0, the previous weights, the previous segment and the step in flight of {n_mat} matrices "
              f"in float32 (4 x {copy_mb:.1f} MB) plus the anchors' triplets; {step_mb:.3f} MB per step on disk")
        run_dir = tmp / f"run-checkpoints-{len(modes) - 1}"
        ck = analyze(CheckpointSeries.discover(run_dir, base=lab.student_init), progress=False,
                     n_singular_values=a.k, k_subspace=a.k, k_paired=a.k)
        sk = analyze(SketchSeries(sketch, name=ck.module_allocation["run"].iloc[0]), k_subspace=a.k, k_paired=a.k)
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
