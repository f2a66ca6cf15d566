"""Copy a small, git-sized subset of a lab run (weights + config only) for data/lab.

Usage: ``python -m opd_dynamics.lab.ship LAB_DIR OUT --steps 30,60,120 [--teacher] [--overwrite]``.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import click

from opd_dynamics.errors import InputError
from opd_dynamics.writer import atomic_dir

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


@click.command()
@click.argument("lab_dir", type=click.Path(file_okay=False, exists=True))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--steps", required=True, help="Comma-separated checkpoint steps to keep.")
@click.option("--teacher", is_flag=True, help="Also copy the teacher.")
@click.option("--overwrite", is_flag=True)
def main(lab_dir: str, out: str, steps: str, teacher: bool, overwrite: bool) -> None:
    try:
        export_subset(lab_dir, out, [int(s) for s in steps.split(",")], teacher, overwrite)
    except InputError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
