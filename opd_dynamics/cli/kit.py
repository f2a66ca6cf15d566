"""The click kit: the options that name a series (run, base, steps, groups) and say how it is read (read, weights,
prefer format; each declared once here),
their parsing, and what every package's `cli.py` builds its commands with: click options generated
from an options dataclass (`dataclass_options`, so a new option is added once, in the dataclass), and the
mapping of a library error's parameter names to flags (`cli_message`)."""

from __future__ import annotations

import dataclasses
import re
import shlex
import typing
import warnings
from pathlib import Path
from typing import Any

import click

from opd_dynamics.errors import InputError
from opd_dynamics.io.naming import GROUPS
from opd_dynamics.io.reader import FORMATS, LOAD_MODES, READS, WEIGHTS


def flag_for(param: str) -> str:
    """The flag of a parameter: ``ref_step`` → ``--ref-step`` (the rule `dataclass_options` generates flags by)."""
    return "--" + param.replace("_", "-")


#: flags of the options `dataclass_options` made: parameter → (flag that sets True or takes the value, flag that
#: sets False or None, flag that changes the default). matrices_only → ('--matrices-only', '--all-shapes',
#: '--all-shapes'); max_steps → ('--steps', None, '--steps')
FLAGS: dict[str, tuple[str, str | None, str]] = {}


def cli_message(e: InputError) -> str:
    """An InputError as the command line says it: each parameter it names (``params``) shown as its flag, and
    ``name=True`` / ``name=False`` as the flag that sets it so."""
    text = str(e)
    for p in e.params:
        on, off, change = FLAGS.get(p, (flag_for(p), None, flag_for(p)))
        text = re.sub(rf"(?<![\w-]){re.escape(p)}=True\b", on, text)
        if off is not None:
            text = re.sub(rf"(?<![\w-]){re.escape(p)}=False\b", off, text)
        text = re.sub(rf"(?<![\w-]){re.escape(p)}(?![\w-])", change, text)
    return text


_RAW = "opd_dynamics.raw_text"  # ctx.meta key: what the user typed for options parsed by a callback


def _parse_field(kind: str, text: str | None, param: str, default: Any) -> Any:
    """Text given on the command line → the field's value (``kind`` is the field's ``cli`` metadata)."""
    if text is not None:
        click.get_current_context().meta.setdefault(_RAW, {})[param] = text
    if text is None:
        return default
    if kind == "ints":
        return parse_ints(text, flag_for(param))
    if kind == "groups":
        return parse_groups(text, default, flag_for(param))
    if kind == "names":
        return tuple(text.replace(",", " ").split())
    if kind == "token_file":
        return read_token_ids(text)
    raise ValueError(f"unknown cli kind {kind!r} for {param}")


def dataclass_options(cls: type, *, only: tuple[str, ...] | None = None, exclude: tuple[str, ...] = ()) -> list:
    """click options for the fields of an options dataclass: the flag is `flag_for(name)` (or the field's
    ``flag`` metadata, e.g. ``--progress/--quiet``), the help its ``help`` metadata, the choices its ``choices``
    metadata; bools become on/off flags, ``int | None`` an optional int, and fields with ``cli`` metadata
    ('ints', 'names', 'groups', 'token_file') are parsed from text. Fields with ``cli=False`` are left out."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        md = f.metadata
        if md.get("cli", True) is False or f.name in exclude or (only is not None and f.name not in only):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        hint = hints[f.name]
        base = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        kw: dict[str, Any] = {"help": md.get("help"), "show_default": True}
        decl = md.get("flag", flag_for(f.name))
        if "cli" in md:
            kind = md["cli"]
            kw.update(default=None, show_default=False, metavar=md.get("metavar", "TEXT"),
                      callback=lambda ctx, p, v, kind=kind, name=f.name, d=default: _parse_field(kind, v, name, d))
            if kind == "token_file":
                kw["type"] = click.Path(exists=True, dir_okay=False)
        elif bool in base:
            decl = md.get("flag", f"{flag_for(f.name)}/--no-{f.name.replace('_', '-')}")
            kw.update(default=default, is_flag=True)
            on, _, off = decl.partition("/")
            FLAGS[f.name] = (on, off or None, (off or on) if default is True else on)
        elif "choices" in md:
            kw.update(type=click.Choice(list(md["choices"])), default=default)
        elif int in base:
            kw.update(type=click.IntRange(min=md["min"]) if "min" in md else int, default=default)
        elif float in base:
            kw.update(type=float, default=default)
        else:
            kw.update(type=str, default=default)
        if kw.get("default") is None:
            kw["show_default"] = False
        if "flag" in md and bool not in base:
            FLAGS[f.name] = (decl, None, decl)
        out.append(click.option(decl, f.name, **kw))
    return out


def options_from(cls: type, params: dict[str, Any]):
    """An instance of the options dataclass ``cls`` from a command's parameters (its own fields only; the
    others are left in ``params``)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: params.pop(k) for k in list(params) if k in names})


def with_options(options):
    """Apply a list of click decorators (options/arguments) in the order listed."""
    def deco(f):
        for o in reversed(options):
            f = o(f)
        return f
    return deco


def parse_groups(text: str | None, default: tuple[str, ...] | None, flag: str = "--groups") -> tuple[str, ...] | None:
    """'attention,mlp' → ('attention', 'mlp'); 'all' → None (every group); no option → ``default``."""
    if text is None:
        return default
    if text.strip().lower() == "all":
        return None
    groups = tuple(g.strip() for g in text.split(",") if g.strip())
    bad = [g for g in groups if g not in GROUPS]
    if bad or not groups:
        raise InputError(None, f"{flag} {text!r}: each group must be one of {', '.join(GROUPS)} (or 'all')")
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


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'2GB', '500MiB', '1000000' → bytes."""
    t = text.strip().upper().replace(" ", "")
    num = t.rstrip("KMGIB")
    unit = t[len(num):]
    try:
        return int(float(num) * _SIZE_UNITS[unit])
    except (KeyError, ValueError):
        raise InputError(None, f"--max-shard-size {text!r} is not a size such as 2GB or 500MiB") from None



def parse_floats(text: str, what: str) -> tuple[float, ...]:
    """'-0.5,0,2' (or whitespace separated) → (-0.5, 0.0, 2.0); ``what`` names the option in the error."""
    try:
        return tuple(float(x) for x in text.replace(",", " ").split())
    except ValueError:
        raise InputError(None, f"{what} must hold numbers separated by commas or spaces, got {text.strip()[:60]!r}") \
            from None


def read_token_ids(path: str | None) -> tuple[int, ...] | None:
    """The token ids in a text file (whitespace or comma separated)."""
    if path is None:
        return None
    try:
        return parse_ints(Path(path).read_text(), f"token-id file {path}")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(path, f"could not be read as a text file of token ids ({e})") from None


def series_from_cli(run: str | None, runs: tuple[str, ...], base: str, steps: str | None, read: str = "pread",
                    prefer_format: str | None = None, weights: str = "model"):
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
    from opd_dynamics.io.sketches import SketchSeries, is_sketch_dir

    out = []
    for name, d in pairs:
        if is_sketch_dir(d):  # a sketch series (record.DynamicsRecorder): no base needed; one given is checked
            if keep:
                raise InputError(d, "is a sketch series, analysed whole: --steps selects checkpoints")
            s = SketchSeries(d, name=name)
            if base is not None and (gap := s.check_base(base)) > 0:
                warnings.warn(f"{base} is not the start {d} recorded (its matrices are {gap:.2g} of their norm away, "
                              "median); the sketch's updates are measured from the start it recorded", UserWarning,
                              stacklevel=2)
            out.append(s)
        else:
            if base is None:
                raise InputError(d, "needs --base (the weights every step is compared with)")
            out.append(CheckpointSeries.discover(d, base=base, name=name, steps=keep, read=read, weights=weights,
                                                 prefer_format=prefer_format))
    return out


_ALIAS = "opd_dynamics.load_mode"  # ctx.meta key: what a deprecated --load-mode maps to


def _load_mode_alias(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """The deprecated --load-mode (one release): pread/mmap → --read, masters → --weights masters, said in one
    sentence on stderr and as a DeprecationWarning. --read or --weights given as well win over it."""
    if value is None:
        return
    new = {"pread": ("read", "pread"), "mmap": ("read", "mmap"), "masters": ("weights", "masters")}[value]
    ctx.meta[_ALIAS] = dict([new])
    ctx.meta.setdefault(_RAW, {})["load_mode"] = value  # run.json's command line repeats it
    msg = f"--load-mode is deprecated and goes in the next release: use --{new[0]} {new[1]}"
    warnings.warn(msg, DeprecationWarning, stacklevel=2)
    click.echo(f"warning: {msg}", err=True)


def _aliased(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """--read or --weights as given, or (left at its default) as a deprecated --load-mode set it."""
    if ctx.get_parameter_source(param.name) is click.core.ParameterSource.DEFAULT:  # processed after those given
        return ctx.meta.get(_ALIAS, {}).get(param.name, value)
    return value


#: how bytes are read: every command that reads checkpoints takes --read (a series carries it: CheckpointSeries.read)
READ_OPTION = click.option(
    "--read", type=click.Choice(READS), default="pread", show_default=True, callback=_aliased,
    help="How tensors are read: pread, one positioned read per tensor (bounded memory, network filesystems); mmap, "
         "the files mapped.")

#: which weights of a checkpoint holding two (CheckpointSeries.weights)
WEIGHTS_OPTION = click.option(
    "--weights", type=click.Choice(WEIGHTS), default="model", show_default=True, callback=_aliased,
    help="Which weights of a DeepSpeed ZeRO checkpoint: model, its model-states weights (the training dtype; "
         "ZeRO-3 holds none, so its fp32 masters); masters, its fp32 master weights (and, where a step is saved "
         "both ways, the ZeRO folder over the HF export). Other formats hold one set of weights.")

#: deprecated (one release): --read and --weights in one
LOAD_MODE_OPTION = click.option(
    "--load-mode", type=click.Choice(LOAD_MODES), default=None, expose_value=False, callback=_load_mode_alias,
    help="Deprecated: pread and mmap are --read, masters is --weights masters.")

#: which format to read where a checkpoint directory holds weights in several (refused without it)
PREFER_FORMAT_OPTION = click.option(
    "--prefer-format", type=click.Choice(FORMATS), default=None,
    help="Where a directory holds weights in two formats (refused otherwise, since they may be different steps), "
         "the one to read.")

#: how a command reads its checkpoints (each command that reads any takes these, and its series carries them)
READING_OPTIONS = [READ_OPTION, WEIGHTS_OPTION, LOAD_MODE_OPTION, PREFER_FORMAT_OPTION]

SERIES_OPTIONS = [
    click.argument("run", required=False, type=click.Path()),
    click.option("--run", "runs", multiple=True, metavar="NAME=DIR", help="A named run (repeatable)."),
    click.option("--base", type=click.Path(), help="The weights every step is compared with (a sketch series "
                                                   "holds its own; a base given with one is checked against it)."),
    click.option("--steps", default=None, help="Comma-separated steps to keep (default: all)."),
    click.option("--groups", default=None, help="Comma-separated groups to analyse (default: all)."),
    *READING_OPTIONS,
]


def command_line() -> str:
    """The invoked command as the user could retype it, from the parameters given on the command line (for
    run.json provenance); text parsed by a callback is repeated as it was typed."""
    ctx = click.get_current_context()
    raw = ctx.meta.get(_RAW, {})
    parts = ["opd-dynamics", *ctx.command_path.split()[1:]]
    for p in ctx.command.params:
        src = ctx.get_parameter_source(p.name)
        v = raw.get(p.name, ctx.params.get(p.name))
        if src is not click.core.ParameterSource.COMMANDLINE or v is None:
            continue
        if isinstance(p, click.Argument):
            parts.append(shlex.quote(str(v)))
        elif isinstance(p, click.Option) and p.is_flag:
            parts.append(p.opts[0] if v else (p.secondary_opts or p.opts)[0])
        elif isinstance(v, tuple):
            parts.extend(x for item in v for x in (p.opts[0], shlex.quote(str(item))))
        else:
            parts.extend([p.opts[0], shlex.quote(str(v))])
    return " ".join(parts)
