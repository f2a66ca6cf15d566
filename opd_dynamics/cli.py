"""The `opd-dynamics` command line: a thin layer over the Python API."""

from __future__ import annotations

import shlex

import click

from opd_dynamics.clickutil import parse_groups, parse_ints, read_token_ids, with_options
from opd_dynamics.errors import InputError


class _Main(click.Group):
    """Bad input becomes one line on stderr and exit status 2, never a traceback; Ctrl-C one line and 130."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except InputError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: no output was half-written (outputs are renamed into place when complete); "
                       "rerunning the same analyze command resumes from its .OUT.partial/ directory", err=True)
            ctx.exit(130)


@click.group(cls=_Main)
@click.version_option(package_name="opd-dynamics")
def main() -> None:
    """Measure how on-policy distillation (and RL) change a model's parameters; extrapolate with EffOPD."""


def _series_from_cli(run: str | None, runs: tuple[str, ...], base: str, steps: str | None, load_mode: str):
    from opd_dynamics.series import CheckpointSeries

    pairs = []
    if run:
        pairs.append((None, run))
    for spec in runs:
        if "=" not in spec:
            raise InputError(None, f"--run expects NAME=DIR, got {spec!r}")
        name, d = spec.split("=", 1)
        pairs.append((name, d))
    if not pairs:
        raise InputError(None, "give a run directory (RUN) or one or more --run NAME=DIR")
    keep = parse_ints(steps, "--steps")
    return [CheckpointSeries.discover(d, base=base, name=name, steps=keep, load_mode=load_mode) for name, d in pairs]


_common = [
    click.argument("run", required=False, type=click.Path()),
    click.option("--run", "runs", multiple=True, metavar="NAME=DIR", help="A named run (repeatable)."),
    click.option("--base", required=True, type=click.Path(), help="The weights every step is compared with."),
    click.option("--steps", default=None, help="Comma-separated steps to keep (default: all)."),
    click.option("--groups", default=None, help="Comma-separated groups to analyse (default: all)."),
    click.option("--load-mode", type=click.Choice(["pread", "mmap"]), default="pread", show_default=True,
                 help="pread reads each tensor with one positioned read (bounded memory, network filesystems)."),
]


def command_line() -> str:
    """The invoked command, rebuilt from the parsed parameters (for run.json provenance)."""
    ctx = click.get_current_context()
    parts = ["opd-dynamics", *ctx.command_path.split()[1:]]
    for k, v in ctx.params.items():
        flag = "--" + k.replace("_", "-")
        if v is None or v is False or v == ():
            continue
        if k == "run":
            parts.append(shlex.quote(str(v)))
        elif v is True:
            parts.append(flag)
        elif isinstance(v, tuple):
            parts.extend(x for item in v for x in ("--run" if k == "runs" else flag, shlex.quote(str(item))))
        else:
            parts.extend([flag, shlex.quote(str(v))])
    return " ".join(parts)


@main.command()
@with_options(_common)
def describe(run, runs, base, steps, groups, load_mode) -> None:
    """Dry run: steps found, tensors, shapes, groups, bytes to read, planned work."""
    from opd_dynamics.analysis import describe as _describe

    series = _series_from_cli(run, runs, base, steps, load_mode)
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


@main.command()
@with_options(_common)
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
    from opd_dynamics.analysis import analyze as _analyze
    from opd_dynamics.engine import AnalysisOptions

    series = _series_from_cli(run, runs, base, steps, load_mode)
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


# --- commands registered by feature modules (keep one line each) ---
from opd_dynamics.effopd import cli as _effopd_cli  # noqa: E402
main.add_command(_effopd_cli.extrapolate)
main.add_command(_effopd_cli.effopd)
from opd_dynamics.plotting_cli import plot_cmd as _plot_cmd, report_cmd as _report_cmd  # noqa: E402
main.add_command(_plot_cmd)
main.add_command(_report_cmd)
from opd_dynamics.lab.cli import lab as _lab_cli  # noqa: E402
main.add_command(_lab_cli)
from opd_dynamics.demo import demo_cmd as _demo_cmd  # noqa: E402
main.add_command(_demo_cmd)
