"""`opd-dynamics extrapolate`: the weights a method predicts from a run's observed checkpoints (RUN --base B --method
… with --target T, --alpha or --scores/--target-score as the method takes), or one jump W_B + c·(W_B − W_A) between
two checkpoints (--prev A --cur B --coef c, EffOPD's and ExPO's candidate). The methods and their options come
from `opd_dynamics.extrapolate.registry`."""

from __future__ import annotations

import dataclasses

import click

from opd_dynamics.cli.kit import (
    READING_OPTIONS,
    dataclass_options,
    options_from,
    parse_ints,
    parse_size,
    with_options,
)
from opd_dynamics.errors import InputError
from opd_dynamics.extrapolate.methods import ExtrapolationOptions


@click.command("extrapolate")
@click.argument("run", required=False, type=click.Path())
@click.option("--base", type=click.Path(), help="The run's base weights (step 0).")
@click.option("--target", type=int, help="The step to predict the weights at (after the last observed step), for the "
                                        "methods that take one (not expo, effopd, alpharl).")
@click.option("--steps", default=None, help="Observed steps to fit on (comma separated; default: all).")
@click.option("--prev", type=click.Path(), help="Two-checkpoint form: the earlier checkpoint A.")
@click.option("--cur", type=click.Path(), help="Two-checkpoint form: the later checkpoint B.")
@click.option("--coef", type=float, help="Two-checkpoint form: c in W_B + c·(W_B − W_A) (EffOPD's candidates: 2k).")
@with_options(dataclass_options(ExtrapolationOptions))
@click.option("--out", required=True, type=click.Path(), help="Output model directory (not inside an input).")
@click.option("--overwrite", is_flag=True, help="Replace an earlier model output (one opd-dynamics wrote).")
@click.option("--max-shard-size", default="2GB", show_default=True, help="Largest output shard.")
@with_options(READING_OPTIONS)
def extrapolate(run, base, target, steps, prev, cur, coef, out, overwrite, max_shard_size, read, weights,
                prefer_format, **fields) -> None:
    """Predict the weights from RUN's checkpoints with --method (docs/EXTRAPOLATION.md: each of the authors' methods
    as their code runs it, and the toolkit's own), or write W_B + c·(W_B − W_A) for --prev A --cur B --coef c
    (what moves: EffOPD's name rule, or --groups)."""
    from opd_dynamics.effopd.cli import imply_select

    imply_select(fields)
    if prev or cur or coef is not None:  # one jump by --coef: a method's parameters would be ignored
        ctx = click.get_current_context()
        given = [f.name for f in dataclasses.fields(ExtrapolationOptions)
                 if f.name not in ("select", "groups", "matrices_only")
                 and ctx.get_parameter_source(f.name) is not click.core.ParameterSource.DEFAULT]
        if given:
            raise InputError(None, f"{given[0]} applies to the run form (RUN, --base, --target), not to the "
                                   "two-checkpoint form (--prev, --cur, --coef)", (given[0],))
    opts = options_from(ExtrapolationOptions, fields)
    shard = parse_size(max_shard_size)
    if prev or cur or coef is not None:
        if not (prev and cur and coef is not None) or run or target is not None:
            raise InputError(None, "the two-checkpoint form takes --prev, --cur and --coef together, without RUN "
                                   "or --target")
        from opd_dynamics.effopd.offline import extrapolate_checkpoint
        from opd_dynamics.effopd.options import EffOPDOptions

        sel = EffOPDOptions(select=opts.select, groups=opts.groups, matrices_only=opts.matrices_only)
        path = extrapolate_checkpoint(prev, cur, coef, out, sel, overwrite=overwrite, max_shard_bytes=shard,
                                      read=read, weights=weights, prefer_format=prefer_format)
        click.echo(f"wrote {path} (coef {coef:g})")
        return
    if not (run and base):
        raise InputError(None, "give RUN and --base (or --prev, --cur and --coef for one jump)")
    from opd_dynamics.extrapolate.methods import extrapolate as predict
    from opd_dynamics.extrapolate.methods import observed
    from opd_dynamics.io.series import CheckpointSeries

    series = CheckpointSeries.discover(run, base=base, read=read, weights=weights, prefer_format=prefer_format)
    keep = parse_ints(steps, "--steps")
    if keep is not None:
        series = observed(series, keep)
    path = predict(series, target, out, opts, overwrite=overwrite, max_shard_bytes=shard)
    goal = f"to {target}" if target is not None else (f"at score {opts.target_score:g}" if opts.method == "alpharl"
                                                      else "")
    click.echo(f"wrote {path} ({opts.method} from steps {', '.join(map(str, series.step_numbers))}"
               + (f" {goal})" if goal else ")"))
