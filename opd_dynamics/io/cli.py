"""The command-line side of the I/O layer: the options that name a series (run, base, steps, groups, load
mode), their parsing, and the small click helpers every package's `cli.py` builds its commands with."""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from opd_dynamics.errors import InputError
from opd_dynamics.io.naming import GROUPS
from opd_dynamics.io.reader import LOAD_MODES


def with_options(options):
    """Apply a list of click decorators (options/arguments) in the order listed."""
    def deco(f):
        for o in reversed(options):
            f = o(f)
        return f
    return deco


def parse_groups(text: str | None, default: tuple[str, ...] | None) -> tuple[str, ...] | None:
    """'attention,mlp' → ('attention', 'mlp'); 'all' → None (every group); no option → ``default``."""
    if text is None:
        return default
    if text.strip().lower() == "all":
        return None
    groups = tuple(g.strip() for g in text.split(",") if g.strip())
    bad = [g for g in groups if g not in GROUPS]
    if bad or not groups:
        raise InputError(None, f"--groups {text!r}: each group must be one of {', '.join(GROUPS)} (or 'all')")
    return groups


def parse_ints(text: str | None, what: str) -> tuple[int, ...] | None:
    """'10,20,30' (or whitespace separated) → (10, 20, 30); ``what`` names the option or file in the error."""
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.replace(",", " ").split())
    except ValueError:
        raise InputError(None, f"{what} must hold integers separated by commas or spaces, got {text.strip()[:60]!r}") \
            from None


def read_token_ids(path: str | None) -> tuple[int, ...] | None:
    """The token ids in a text file (whitespace or comma separated)."""
    if path is None:
        return None
    try:
        return parse_ints(Path(path).read_text(), f"token-id file {path}")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(path, f"could not be read as a text file of token ids ({e})") from None


def series_from_cli(run: str | None, runs: tuple[str, ...], base: str, steps: str | None, load_mode: str):
    from opd_dynamics.io.series import CheckpointSeries

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


SERIES_OPTIONS = [
    click.argument("run", required=False, type=click.Path()),
    click.option("--run", "runs", multiple=True, metavar="NAME=DIR", help="A named run (repeatable)."),
    click.option("--base", required=True, type=click.Path(), help="The weights every step is compared with."),
    click.option("--steps", default=None, help="Comma-separated steps to keep (default: all)."),
    click.option("--groups", default=None, help="Comma-separated groups to analyse (default: all)."),
    click.option("--load-mode", type=click.Choice(LOAD_MODES), default="pread", show_default=True,
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
