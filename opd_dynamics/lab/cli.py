"""``lab`` click group: ``opd-dynamics lab run --preset smoke|default|gpu --out DIR``.

Bad input (InputError) is turned into one line and exit status 2 by the main command group."""

from __future__ import annotations

import click


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

    run_lab(out, preset=preset, seed=seed, overwrite=overwrite)


from opd_dynamics.effopd.cli import lab_effopd as _lab_effopd  # noqa: E402
lab.add_command(_lab_effopd)


@lab.command("interventions")
@click.option("--lab", "lab_dir", type=click.Path(file_okay=False), required=True, help="Lab directory (lab run --out).")
@click.option("--out", "out", type=click.Path(file_okay=False), required=True, help="Output directory for the CSVs.")
@click.option("--step", type=int, default=None, help="Checkpoint step to intervene on (default: each run's last).")
@click.option("--half-width", type=int, default=1, show_default=True, help="Layer window half width.")
@click.option("--n-eval", type=int, default=None, help="Held-out problems to score (default: the lab's n_eval).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
def interventions_cmd(lab_dir: str, out: str, step: int | None, half_width: int, n_eval: int | None,
                      overwrite: bool) -> None:
    """Scaling, layer-window, rank, rescale and embedding-swap interventions scored by held-out accuracy."""
    from opd_dynamics.interventions import lab_interventions

    lab_interventions(lab_dir, out, step=step, half_width=half_width, n_eval=n_eval, overwrite=overwrite)
