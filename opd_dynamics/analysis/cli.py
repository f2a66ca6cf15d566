"""`opd-dynamics describe` and `opd-dynamics analyze`: the analysis layer's commands."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from opd_dynamics.analysis.options import AnalysisOptions, ExecutionOptions
from opd_dynamics.cli.kit import (
    SERIES_OPTIONS,
    command_line,
    dataclass_options,
    options_from,
    parse_groups,
    series_from_cli,
    with_options,
)


@click.command()
@with_options(SERIES_OPTIONS)
def describe(run, runs, base, steps, groups, read, weights, prefer_format) -> None:
    """Dry run: steps found, tensors, shapes, groups, bytes to read, planned work."""
    from opd_dynamics.analysis.api import describe as _describe

    series = series_from_cli(run, runs, base, steps, read=read, weights=weights, prefer_format=prefer_format)
    from opd_dynamics.io.sketches import SketchSeries

    if any(isinstance(s, SketchSeries) for s in series):
        for s in series:
            size = sum(f.stat().st_size for f in s.files.values()) / max(1, len(s.files))
            click.echo(f"run {s.name}: sketch series {s.path} (k = {s.k}), {len(s.files)} steps "
                       f"{s.steps[0]}…{s.steps[-1]}, {len(s.decomposed)} matrices decomposed, "
                       f"{len(s.tensors) - len(s.decomposed)} other tensors by their norms, "
                       f"{size / 1e6:.2f} MB per step")
        return
    df = _describe(series, groups=parse_groups(groups, None))
    from opd_dynamics.io.formats import reader_format

    for s in series:
        click.echo(f"run {s.name}: base {s.base} ({reader_format(s.base, prefer_format)}); {len(s.steps)} steps "
                   f"{s.step_numbers}")
        for step, path in s.steps:
            click.echo(f"  step {step}: {path} ({reader_format(path, prefer_format)})")
    tied = df[df["tied_to"].notna()] if "tied_to" in df else df.iloc[:0]
    for r in tied.itertuples():
        click.echo(f"run {r.run}: {r.tensor} is tied to {r.tied_to} (stored once, or as an equal copy; analysed "
                   f"once, as {r.tied_to})")
    ok = df[df["skipped"].isna() if "skipped" in df else df["tensor"].notna()]
    ok = ok[ok["tied_to"].isna()] if "tied_to" in ok else ok
    click.echo(f"{len(ok)} tensors to analyse, {ok['bytes_to_read'].sum() / 1e6:.1f} MB to read")
    with_group = ok.groupby(["run", "group"]).agg(tensors=("tensor", "size"), MB=("bytes_to_read", "sum"))
    with_group["MB"] = (with_group["MB"] / 1e6).round(2)
    click.echo(with_group.to_string())
    if "skipped" in df:
        sk = df[df["skipped"].notna()]
        for _, r in sk.iterrows():
            click.echo(f"skipped {r['run']} {r['tensor']}: {r['skipped']}")
    cols = ["run", "tensor", "layer", "group", "module", "shape", "dtype", "n_steps"]
    click.echo(ok[cols].head(40).to_string(index=False))
    if len(ok) > 40:
        click.echo(f"… {len(ok) - 40} more")


@contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """The analysis' own warnings (a wrong base, non-finite weights; also in run.json) as one 'warning: …' line each
    on stderr, printed even when the analysis then fails; other warnings are shown as Python shows them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default", UserWarning)  # others as filtered before
        try:
            yield
        finally:
            for w in caught:
                if w.category is UserWarning:
                    click.echo(f"warning: {w.message}", err=True)
                else:
                    warnings.showwarning(w.message, w.category, w.filename, w.lineno)


@click.command()
@with_options(SERIES_OPTIONS)
@click.option("--out", required=True, type=click.Path(), help="Output directory (CSV tables + run.json).")
@click.option("--overwrite", is_flag=True, help="Replace an earlier output of this command (one opd-dynamics wrote).")
@with_options(dataclass_options(AnalysisOptions))
@with_options(dataclass_options(ExecutionOptions))
def analyze(run, runs, base, steps, groups, read, weights, prefer_format, out, overwrite, **fields) -> None:
    """Analyse one run (RUN) or several (--run opd=DIR --run rl=DIR) against BASE into OUT."""
    from opd_dynamics.analysis.api import analyze as _analyze

    series = series_from_cli(run, runs, base, steps, read=read, weights=weights, prefer_format=prefer_format)
    opts = options_from(AnalysisOptions, fields)
    run_opts = options_from(ExecutionOptions, fields)
    with _warnings_as_lines():
        rep = _analyze(series, out=out, overwrite=overwrite, options=opts, execution=run_opts,
                       groups=parse_groups(groups, None), command=command_line())
    m = rep.meta
    click.echo(f"wrote {out}: " + ", ".join(f"{k}.csv ({v} rows)" for k, v in m["tables"].items()))
    if m["skipped"] or m["failed"]:  # failed: one entry per tensor and step (--keep-going)
        n = len(m["failed"])
        click.echo(f"{len(m['skipped'])} skipped tensors, {n} failure{'s' if n != 1 else ''}: see "
                   f"{Path(out) / 'run.json'}")
