"""Copy a small, git-sized subset of a lab run (weights + config only) for data/lab.

Command: ``opd-dynamics lab ship LAB_DIR OUT --steps 30,60,120 [--teacher] [--overwrite]``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from opd_dynamics.errors import InputError
from opd_dynamics.io.writer import atomic_dir

KEEP = ("model.safetensors", "config.json")


def export_subset(lab_dir, out, steps: list[int], include_teacher: bool = False, overwrite: bool = False) -> Path:
    """Copy student_init, the given checkpoint steps of opd and grpo, eval.csv and lab.json into ``out``."""
    lab_dir = Path(lab_dir)
    dirs = ["student_init"] + (["teacher"] if include_teacher else [])
    dirs += [f"{r}/checkpoint-{s}" for r in ("opd", "grpo") for s in steps]
    with atomic_dir(out, ("lab.json",), overwrite=overwrite) as tmp:
        for d in dirs:
            if not (lab_dir / d / "model.safetensors").exists():
                raise InputError(lab_dir / d, "has no model.safetensors")
            (tmp / d).mkdir(parents=True)
            for name in KEEP:
                shutil.copy2(lab_dir / d / name, tmp / d / name)
        for r in ("opd", "grpo"):
            shutil.copy2(lab_dir / r / "eval.csv", tmp / r / "eval.csv")
        shutil.copy2(lab_dir / "lab.json", tmp / "lab.json")
    return Path(out)
