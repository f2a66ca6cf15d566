"""`opd-dynamics effopd search` and `opd-dynamics probe`: EffOPD's search and the line probe on saved
checkpoints (flags generated from `EffOPDOptions`)."""

from __future__ import annotations

import click

from opd_dynamics.cli.kit import (
    READING_OPTIONS,
    dataclass_options,
    options_from,
    parse_floats,
    parse_size,
    with_options,
)
from opd_dynamics.effopd.options import EffOPDOptions
from opd_dynamics.effopd.probe import DEFAULT_COEFS, GATE_TEXT
from opd_dynamics.errors import InputError


def imply_select(fields: dict) -> None:
    """--groups or --matrices-only/--all-shapes given on the command line ask for the toolkit's group rule: they set
    select to 'groups' unless --select was given (then `resolve_select` refuses them with --select published)."""
    ctx = click.get_current_context()
    given = [n for n in ("groups", "matrices_only") if n in fields and
             ctx.get_parameter_source(n) is not click.core.ParameterSource.DEFAULT]
    if given and fields.get("select") is None:
        fields["select"] = "groups"
    elif given and fields.get("select") == "published":
        raise InputError(None, f"{given[0]} applies with select groups (the toolkit's naming groups), not with select "
                               "published (the authors' own rule)", (given[0], "select"))


_shared = [
    click.option("--prev", required=True, type=click.Path(), help="Earlier checkpoint A (the anchor)."),
    click.option("--cur", required=True, type=click.Path(), help="Later checkpoint B."),
    click.option("--out", required=True, type=click.Path(), help="Output model directory (not inside A or B)."),
    *dataclass_options(EffOPDOptions, only=("select", "groups", "matrices_only")),
    click.option("--overwrite", is_flag=True, help="Replace an earlier model output (one opd-dynamics wrote)."),
    click.option("--max-shard-size", default="2GB", show_default=True, help="Largest output shard."),
    *READING_OPTIONS,
]


@click.group("effopd")
def effopd() -> None:
    """EffOPD on saved checkpoints (for frameworks that only leave checkpoints on disk)."""


@effopd.command("search")
@with_options(_shared)
@click.option("--eval-cmd", required=True,
              help="Shell command scoring a model dir: '{path}' is replaced by it (else it is appended); the "
                   "score (higher is better) is the number on the last line of its stdout.")
@with_options(dataclass_options(EffOPDOptions, only=("k_max", "coef_step", "strict")))
@click.option("--timeout", type=float, default=None, help="Seconds allowed per evaluation.")
def search(prev, cur, out, overwrite, max_shard_size, read, weights, prefer_format, eval_cmd, timeout,
           **fields) -> None:
    """Score B, then B + 2k(B − A) for k = 1 … K in order; keep the last that scores better (--accept-ties: not
    worse); write it to OUT."""
    from opd_dynamics.effopd.offline import search_checkpoints

    imply_select(fields)
    rec = search_checkpoints(prev, cur, out, eval_cmd, options_from(EffOPDOptions, fields), timeout=timeout,
                             echo=click.echo, overwrite=overwrite, max_shard_bytes=parse_size(max_shard_size),
                             read=read, weights=weights, prefer_format=prefer_format)
    click.echo(f"accepted k={rec.k_accepted} (coef {rec.coef:g}); scores "
               + ", ".join(f"k{k}={s:g}" for k, s in enumerate(rec.scores)) + f"; wrote {out}")
    if rec.tie:
        click.echo(f"warning: {rec.tie_note()}", err=True)


def _pairs(text: str) -> list[tuple[int, int]]:
    """'8:16,16:32' → [(8, 16), (16, 32)]."""
    try:
        return [(int(a), int(b)) for a, b in (p.split(":") for p in text.replace(" ", "").split(",") if p)]
    except ValueError:
        raise InputError(None, f"--pairs {text!r} must be pairs of steps s:t separated by commas (e.g. 8:16,16:32)"
                         ) from None


@click.command("probe")
@click.argument("run", type=click.Path())
@click.option("--base", required=True, type=click.Path(), help="The weights every step is compared with (step 0).")
@click.option("--pairs", required=True, help="Pairs of steps s:t (comma separated, s may be 0 for the base).")
@click.option("--coefs", default=",".join(f"{c:g}" for c in DEFAULT_COEFS), show_default=True,
              help="The grid of c in W_t + c·(W_t − W_s).")
@click.option("--eval-cmd", required=True,
              help="Shell command scoring a model dir: '{path}' is replaced by it (else it is appended); the "
                   "score (higher is better) is the number on the last line of its stdout.")
@click.option("--out", required=True, type=click.Path(), help="Output directory (probe.csv + probe.json).")
@click.option("--overwrite", is_flag=True, help="Replace an earlier probe output (one opd-dynamics wrote).")
@click.option("--timeout", type=float, default=None, help="Seconds allowed per evaluation.")
@with_options(READING_OPTIONS)
@with_options(dataclass_options(EffOPDOptions, only=("select", "groups", "matrices_only")))
def probe(run, base, pairs, coefs, eval_cmd, out, overwrite, timeout, read, weights, prefer_format, **fields) -> None:
    """Score W_t + c·(W_t − W_s) over a grid of c for pairs (s, t) of RUN's steps: can extrapolation help here?"""
    from opd_dynamics.effopd.probe import gate_text, line_probe, verdict
    from opd_dynamics.io.series import CheckpointSeries

    imply_select(fields)
    series = CheckpointSeries.discover(run, base=base, read=read, weights=weights, prefer_format=prefer_format)
    grid = parse_floats(coefs, "--coefs")
    df = line_probe(series, _pairs(pairs), eval_cmd, coefs=grid, out=out, overwrite=overwrite,
                    options=options_from(EffOPDOptions, fields), timeout=timeout, echo=click.echo)
    click.echo(df.to_string(index=False))
    for pair, ok in verdict(df).items():
        click.echo(f"{pair}: " + (f"some {GATE_TEXT} scores above W_t" if ok else
                                  f"no {GATE_TEXT} scores above W_t: no foresight to use along this segment"))
    click.echo(f"gate: {gate_text(df)}")
    click.echo(f"wrote {out}")
