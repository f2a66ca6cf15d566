"""Copy a small, git-sized subset of a lab run (weights + config only) for data/lab.

Command: ``opd-dynamics lab ship LAB_DIR OUT --steps 30,60,120 [--teacher] [--overwrite]``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from opd_dynamics.errors import InputError
from opd_dynamics.io.writer import atomic_dir
from opd_dynamics.lab.layout import RUNS, LabDir
from opd_dynamics.schema import TABLES

KEEP = ("model.safetensors", "config.json")


def export_subset(lab_dir, out, steps: list[int], include_teacher: bool = False, overwrite: bool = False) -> Path:
    """Copy student_init, the given checkpoint steps of each run, their eval.csv, lab.json and (when the lab
    recorded sketches) sketch_alignment.csv into ``out``; the sketch series themselves stay behind (about 1 MB per
    recorded step at the default preset)."""
    src = LabDir(lab_dir)
    models = [src.student_init] + ([src.teacher] if include_teacher else [])
    models += [src.run(r) / f"checkpoint-{s}" for r in RUNS for s in steps]
    with atomic_dir(out, "lab-subset", overwrite=overwrite, inputs=[src.root]) as tmp:
        dst = LabDir(tmp)
        for d in models:
            if not (d / KEEP[0]).exists():
                raise InputError(d, f"has no {KEEP[0]}")
            rel = d.relative_to(src.root)
            (tmp / rel).mkdir(parents=True)
            for name in KEEP:
                shutil.copy2(d / name, tmp / rel / name)
        for r in RUNS:
            shutil.copy2(src.eval_csv(r), dst.eval_csv(r))
        shutil.copy2(src.meta_path, dst.meta_path)
        aligned = src.root / TABLES["sketch_alignment"].file
        if aligned.exists():
            shutil.copy2(aligned, tmp / aligned.name)
    return Path(out)
