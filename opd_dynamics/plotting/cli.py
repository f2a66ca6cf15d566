"""`opd-dynamics plot` and `opd-dynamics report`: figures and the HTML page from result directories."""

from __future__ import annotations

import click

from opd_dynamics.plotting.render import FORMATS


@click.command("plot")
@click.argument("out", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--figures", "figures_dir", required=True, type=click.Path(file_okay=False),
              help="Directory to write the figures into.")
@click.option("--format", "formats", multiple=True, type=click.Choice(FORMATS),
              help="Output format (repeatable; default: png and svg).")
@click.option("--only", multiple=True, metavar="NAME", help="Draw only these figures (repeatable).")
@click.option("--overwrite", is_flag=True, help="Replace figure files that already exist.")
def plot(out: tuple[str, ...], figures_dir: str, formats: tuple[str, ...], only: tuple[str, ...],
             overwrite: bool) -> None:
    """Render every figure the tables in OUT... allow (analysis, lab and EffOPD directories; tables merged)."""
    from opd_dynamics.plotting import plot_all

    res = plot_all(list(out), figures_dir, formats=formats or ("png", "svg"), overwrite=overwrite,
                   figures=list(only) or None)
    for p in res:
        click.echo(str(p))
    for name, reason in res.skipped.items():
        click.echo(f"skipped {name}: {reason}")
    click.echo(f"{len(res)} files written to {figures_dir}, {len(res.skipped)} figures skipped")


@click.command("report")
@click.argument("out", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--html", "html_path", required=True, type=click.Path(dir_okay=False),
              help="The HTML file to write (self-contained; opens offline).")
@click.option("--title", default="opd-dynamics report", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace the HTML file if it exists.")
def report(out: tuple[str, ...], html_path: str, title: str, overwrite: bool) -> None:
    """One self-contained HTML page with the figures, key tables and provenance of OUT..."""
    from opd_dynamics.plotting.html import render_html

    path = render_html(list(out), html_path, overwrite=overwrite, title=title)
    click.echo(f"report written to {path}")
