"""End-to-end lab run: teacher, student_init, OPD and GRPO series, their evaluations, lab.json.

Everything is written into a temporary sibling directory and renamed into place at the end, so
an interrupted run never leaves a half-written ``out``; an existing ``out`` is refused unless
``overwrite=True``.
"""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from opd_dynamics.io.writer import atomic_dir, check_output, json_text
from opd_dynamics.lab.early import EarlyEval
from opd_dynamics.lab.evaluate import evaluate_model, pass_at_k
from opd_dynamics.lab.layout import RUNS, SKETCH, SKETCH_DENSE, SKETCH_K, SKETCH_SPARSE, LabDir, seed_dir
from opd_dynamics.lab.models import load_model, n_params
from opd_dynamics.lab.presets import LabPreset, get_preset
from opd_dynamics.lab.task import Problem, build_tokenizer, has_carry
from opd_dynamics.lab.train import (
    _ensure_threads,
    device,
    evaluate_run,
    seed_everything,
    splits_for,
    train_grpo,
    train_opd,
    train_teacher_and_student,
)
from opd_dynamics.schema import TABLES

#: the kind of output a lab directory is (its marker, `io.writer.OUTPUT_MARKER`)
LAB = "lab"


def _versions() -> dict:
    import tokenizers
    import transformers
    import trl

    from opd_dynamics._version import __version__

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl.__version__, "tokenizers": tokenizers.__version__, "opd_dynamics": __version__}


def pass_rates(model, tokenizer, held: list[Problem], k: int, seed: int) -> dict[str, float]:
    """pass@k on all held-out problems and on the carry ("hard") ones, for lab.json."""
    hard = [q for q in held if has_carry(q)]
    return {f"pass_at_{k}": pass_at_k(model, tokenizer, held, k, seed=seed),
            f"pass_at_{k}_carry": pass_at_k(model, tokenizer, hard, k, seed=seed),
            "accuracy_carry": evaluate_model(model, tokenizer, hard)["accuracy"], "n_carry": len(hard)}


def group_summary(csv: Path) -> dict[str, float]:
    """GRPO's share of groups with non-zero reward variance over its steps (grpo_groups.csv), for lab.json."""
    import pandas as pd

    g = pd.read_csv(csv)
    v = g["nonzero_var_groups"]
    return {"nonzero_var_groups_mean": float(v.mean()), "nonzero_var_groups_min": float(v.min()),
            "nonzero_var_groups_first": float(v.iloc[0]), "nonzero_var_groups_last": float(v.iloc[-1]),
            "steps_below_0.3": int((v < 0.3).sum()), "steps": len(g)}


def sketch_callback(out: Path, steps: int):
    """The recorder the lab trains with: every step of the first SKETCH_DENSE of the run, then every SKETCH_SPARSE,
    k = SKETCH_K, exact spectra."""
    from opd_dynamics.record import DynamicsCallback, DynamicsRecorder

    dense = max(1, round(SKETCH_DENSE * steps))
    return DynamicsCallback(DynamicsRecorder(out, k=SKETCH_K, every=lambda s: s <= dense or s % SKETCH_SPARSE == 0))


def write_sketch_alignment(lab: LabDir) -> Path:
    """``LAB/sketch_alignment.csv``: the alignment table of both runs' sketch series (to each run's last step)."""
    from opd_dynamics.analysis.sketch import analyze_sketches
    from opd_dynamics.io.sketches import SketchSeries

    rep = analyze_sketches([SketchSeries(lab.sketch(r), name=r) for r in RUNS], k_subspace=SKETCH_K,
                           k_paired=SKETCH_K)
    out = lab.root / TABLES["sketch_alignment"].file
    rep["alignment"][TABLES["sketch_alignment"].names].to_csv(out, index=False)
    return out


def run_lab(out, preset: str | LabPreset = "smoke", seed: int = 0, overwrite: bool = False,
            log: Callable[[str], None] | None = None) -> Path:
    """Run the whole lab into ``out`` and return its path.

    Layout: `opd_dynamics.lab.layout` (teacher/, student_init/, opd/ and grpo/ with checkpoint-N/ and
    eval.csv, whose step 0 is student_init, grpo/grpo_groups.csv; lab.json with preset, seed, timings,
    accuracies, pass@k of teacher and student_init, GRPO's share of informative groups, versions).
    """
    from opd_dynamics.analysis.executors import device_name

    p = get_preset(preset)
    log = log or (lambda msg: print(msg, flush=True))
    out = Path(out).resolve()
    timings: dict[str, float] = {}
    t_all = time.time()
    with atomic_dir(out, LAB, overwrite=overwrite) as tmp:
        lab = LabDir(tmp)
        # threads and seeds before anything is drawn or summed: the run is then a function of preset and seed
        _ensure_threads(p)
        seed_everything(seed)
        log(f"[lab] preset {p.name}, seed {seed}, device {device()}, writing to {tmp}")
        t0 = time.time()
        sft = train_teacher_and_student(tmp, p, seed, log=log)
        timings["sft_s"] = time.time() - t0

        tok = build_tokenizer()
        held = splits_for(p, seed).heldout[: p.n_eval]
        teacher = load_model(lab.teacher, device())
        t0 = time.time()
        t_eval = evaluate_model(teacher, tok, held, sampled=True, seed=seed) | pass_rates(teacher, tok, held,
                                                                                          p.pass_k, seed)
        s_pass = pass_rates(load_model(lab.student_init, device()), tok, held, p.pass_k, seed)
        timings["pass_at_k_s"] = time.time() - t0
        log(f"[lab] teacher held-out accuracy {t_eval['accuracy']:.3f} (sampled {t_eval['accuracy_sampled']:.3f}); "
            f"student_init pass@{p.pass_k} on carry problems {s_pass[f'pass_at_{p.pass_k}_carry']:.3f}")

        ev = {}
        train = {"opd": lambda d, cbs: train_opd(lab.student_init, lab.teacher, d, p, seed, cbs),
                 "grpo": lambda d, cbs: train_grpo(lab.student_init, d, p, seed, cbs)}
        for run in RUNS:
            log(f"[lab] {run}: {p.rl_steps} steps, checkpoint every {p.save_steps}, sketches in {run}/{SKETCH}")
            t0 = time.time()
            train[run](lab.run(run), [sketch_callback(lab.sketch(run), p.rl_steps),
                                      EarlyEval(lab.run(run), run, tok, held)])
            timings[f"{run}_train_s"] = time.time() - t0
            t0 = time.time()
            ev[run] = evaluate_run(run, lab.run(run), lab.student_init, teacher, tok, held, seed=seed, log=log)
            ev[run].to_csv(lab.eval_csv(run), index=False)
            timings[f"{run}_eval_s"] = time.time() - t0

        t0 = time.time()
        write_sketch_alignment(lab)
        timings["sketch_analysis_s"] = time.time() - t0
        s0 = ev[RUNS[0]].iloc[0]
        timings["total_s"] = time.time() - t_all
        meta = {
            "preset": p.to_dict(),
            "seed": seed,
            "device": str(device()),
            # what a rerun must match for bit-identical weights (seed_everything): the CPU, the kernels torch picks
            # for it and the thread count
            "cpu": {"name": device_name("cpu"), "capability": torch.backends.cpu.get_cpu_capability(),
                    "threads": torch.get_num_threads()},
            "command": " ".join(sys.argv),
            "timings": {k: round(v, 2) for k, v in timings.items()},
            "teacher": {**t_eval, "n_params": n_params(teacher), **sft["teacher_sft"]},
            "student_init": {"accuracy": float(s0["accuracy"]), "accuracy_sampled": float(s0["accuracy_sampled"]),
                             "reverse_kl": float(s0["reverse_kl"]),
                             "n_params": n_params(load_model(lab.student_init)), **s_pass, **sft["student_sft"]},
            "final": {r: ev[r].iloc[-1].drop("run").to_dict() for r in ev},
            "grpo_groups": group_summary(lab.run("grpo") / TABLES["grpo_groups"].file),
            "n_heldout_eval": len(held),
            "versions": _versions(),
        }
        lab.meta_path.write_text(json_text(meta))
    log(f"[lab] done in {timings['total_s']:.0f}s → {out}")
    return out


def run_lab_seeds(out, preset: str | LabPreset = "smoke", seeds: int = 5, overwrite: bool = False,
                  log: Callable[[str], None] | None = None) -> list[Path]:
    """Seeds 0 … seeds−1, each a whole lab run into ``out/seed-K`` (`run_lab`). A seed whose directory already
    holds a finished run (its lab.json) is kept, not rerun, unless ``overwrite``: an interrupted multi-seed run
    resumes, and seeds run by separate ``lab run --seed K --out OUT/seed-K`` processes join the same root. Five by
    default: the fewest whose claims (`lab claims`) can reach a verdict (5 of 5 signs is p = 1/32; 3 of 3, 0.125)."""
    log = log or (lambda msg: print(msg, flush=True))
    if overwrite:  # every seed to be replaced is checked before the first one trains
        for seed in range(seeds):
            check_output(seed_dir(out, seed), LAB, overwrite=True)
    done = []
    for seed in range(seeds):
        d = seed_dir(out, seed)
        if LabDir(d).meta_path.exists() and not overwrite:
            log(f"[lab] seed {seed}: kept the finished run in {d}")
        else:
            run_lab(d, preset=preset, seed=seed, overwrite=overwrite, log=log)
        done.append(Path(d).resolve())
    return done
