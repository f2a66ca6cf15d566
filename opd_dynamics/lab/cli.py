"""``lab`` click group: ``opd-dynamics lab run --preset smoke|default|gpu --out DIR``."""

from __future__ import annotations

import sys

import click

from opd_dynamics.errors import InputError


@click.group("lab")
def lab() -> None:
    """Tiny-model laboratory: real OPD and GRPO checkpoint series on a verifiable arithmetic task."""


@lab.command("run")
@click.option("--preset", type=click.Choice(["smoke", "default", "gpu"]), default="smoke", show_default=True)
@click.option("--out", "out", type=click.Path(file_okay=False), required=True, help="Output directory.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
def run_cmd(preset: str, out: str, seed: int, overwrite: bool) -> None:
    """Train teacher, student_init, OPD and GRPO runs; evaluate every checkpoint."""
    from opd_dynamics.lab.run import run_lab

    try:
        run_lab(out, preset=preset, seed=seed, overwrite=overwrite)
    except InputError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


from opd_dynamics.effopd.cli import lab_effopd as _lab_effopd  # noqa: E402
lab.add_command(_lab_effopd)
