"""The `opd-dynamics` command line: the root group, assembled from each package's `cli.py`.

Library code raises `InputError` naming a parameter; here it becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import click

from opd_dynamics.analysis.cli import analyze, describe
from opd_dynamics.cli.kit import cli_message
from opd_dynamics.effopd.cli import effopd, probe
from opd_dynamics.errors import InputError
from opd_dynamics.extrapolate.cli import extrapolate
from opd_dynamics.lab.cli import demo, lab
from opd_dynamics.plotting.cli import plot, report


class _Main(click.Group):
    """Bad input becomes one line on stderr and exit status 2, never a traceback; Ctrl-C one line and 130."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except InputError as e:
            click.echo(f"error: {cli_message(e)}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: no output was half-written (outputs are renamed into place when complete); "
                       "rerunning the same analyze command resumes from its .OUT.partial/ directory", err=True)
            ctx.exit(130)


@click.group(cls=_Main)
@click.version_option(package_name="opd-dynamics")
def main() -> None:
    """Measure how on-policy distillation (and RL) change a model's parameters; extrapolate with EffOPD."""


for _command in (describe, analyze, extrapolate, effopd, probe, plot, report, lab, demo):
    main.add_command(_command)
