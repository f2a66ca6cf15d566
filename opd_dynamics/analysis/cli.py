"""`opd-dynamics describe` and `opd-dynamics analyze`: the analysis layer's commands."""

from __future__ import annotations

import click

from opd_dynamics.io.cli import (
    SERIES_OPTIONS,
    command_line,
    parse_groups,
    read_token_ids,
    series_from_cli,
    with_options,
)


@click.command()
@with_options(SERIES_OPTIONS)
def describe(run, runs, base, steps, groups, load_mode) -> None:
    """Dry run: steps found, tensors, shapes, groups, bytes to read, planned work."""
    from opd_dynamics.analysis.api import describe as _describe

    series = series_from_cli(run, runs, base, steps, load_mode)
    df = _describe(series, groups=parse_groups(groups, None))
    for s in series:
        click.echo(f"run {s.name}: base {s.base}; {len(s.steps)} steps {s.step_numbers}")
    ok = df[df.get("skipped").isna()] if "skipped" in df else df
    click.echo(f"{len(ok)} tensors to analyse, {ok['bytes_to_read'].sum() / 1e6:.1f} MB to read")
    with_group = ok.groupby(["run", "group"]).agg(tensors=("tensor", "size"), MB=("bytes_to_read", "sum"))
    with_group["MB"] = (with_group["MB"] / 1e6).round(2)
    click.echo(with_group.to_string())
    if "skipped" in df:
        sk = df[df["skipped"].notna()]
        for _, r in sk.iterrows():
            click.echo(f"skipped {r['run']} {r['tensor']}: {r['skipped']}")
    click.echo(ok[["run", "tensor", "layer", "group", "module", "shape", "dtype", "n_steps"]].head(40).to_string(index=False))
    if len(ok) > 40:
        click.echo(f"… {len(ok) - 40} more")


@click.command()
@with_options(SERIES_OPTIONS)
@click.option("--out", required=True, type=click.Path(), help="Output directory (CSV tables + run.json).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--svd", type=click.Choice(["exact", "fast", "none"]), default="exact", show_default=True,
              help="exact: full float64 spectra; fast: randomized top-k (labelled); none: norms only.")
@click.option("--geometry", is_flag=True, help="Also measure the update against the base's own singular vectors. "
              "Exact in every --svd mode (it needs W_t's whole spectrum), so it costs about as much as the "
              "exact spectra and most of a fast run.")
@click.option("--no-alignment", is_flag=True, help="Skip alignment to the reference step.")
@click.option("--ref-step", type=int, default=None, help="Alignment reference step (default: last).")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
@click.option("--device", default="cpu", show_default=True,
              help="cpu, cuda or auto. With --executor ray, resolved on the cluster: each CUDA task asks Ray for one GPU.")
@click.option("--executor", type=click.Choice(["serial", "process", "ray"]), default=None,
              help="Default: process with --workers > 1, ray with --ray-address, else serial.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Tensors analysed at once (process or Ray executor).")
@click.option("--ray-address", default=None, help="Ray cluster address (default: start a local instance).")
@click.option("--token-ids", type=click.Path(exists=True, dir_okay=False), default=None,
              help="File of token ids (whitespace separated) for the embedding cosine over a token set.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def analyze(run, runs, base, steps, groups, load_mode, out, overwrite, svd, geometry, no_alignment, ref_step,
            dtype, device, executor, workers, ray_address, token_ids, quiet) -> None:
    """Analyse one run (RUN) or several (--run opd=DIR --run rl=DIR) against BASE into OUT."""
    from opd_dynamics.analysis.api import analyze as _analyze
    from opd_dynamics.analysis.options import AnalysisOptions

    series = series_from_cli(run, runs, base, steps, load_mode)
    ids = read_token_ids(token_ids)
    opts = AnalysisOptions(svd=svd, geometry=geometry, alignment=not no_alignment, ref_step=ref_step, dtype=dtype,
                           device=device, token_ids=ids)
    rep = _analyze(series, out=out, overwrite=overwrite, options=opts,
                   groups=parse_groups(groups, None), executor=executor, workers=workers,
                   ray_address=ray_address, progress=not quiet,
                   command=command_line())
    m = rep.meta
    click.echo(f"wrote {out}: " + ", ".join(f"{k}.csv ({v} rows)" for k, v in m["tables"].items()))
    if m["skipped"] or m["failed"]:
        click.echo(f"{len(m['skipped'])} skipped, {len(m['failed'])} failed tensors: see {out}/run.json")
