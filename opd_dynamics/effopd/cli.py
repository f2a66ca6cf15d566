"""Click commands for EffOPD on saved checkpoints: `extrapolate` and `effopd search` (registered in opd_dynamics.cli)."""

from __future__ import annotations

import click

from opd_dynamics.errors import InputError
from opd_dynamics.io.cli import parse_groups, with_options
from opd_dynamics.io.naming import MATRIX_GROUPS

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


_shared = [
    click.option("--prev", required=True, type=click.Path(), help="Earlier checkpoint A (the anchor)."),
    click.option("--cur", required=True, type=click.Path(), help="Later checkpoint B."),
    click.option("--out", required=True, type=click.Path(), help="Output model directory (not inside A or B)."),
    click.option("--groups", default=None, help="Comma-separated naming groups to extrapolate "
                                                "(default attention,mlp; 'all' for every group)."),
    click.option("--all-shapes", is_flag=True, help="Also extrapolate non-matrix tensors of those groups (biases)."),
    click.option("--overwrite", is_flag=True, help="Replace an existing output directory."),
    click.option("--max-shard-size", default="2GB", show_default=True, help="Largest output shard."),
    click.option("--load-mode", type=click.Choice(["pread", "mmap"]), default="pread", show_default=True),
]


@click.command("extrapolate")
@with_options(_shared)
@click.option("--coef", required=True, type=float, help="c in W_B + c·(W_B − W_A) (EffOPD's candidates use 2k).")
def extrapolate(prev, cur, out, groups, all_shapes, overwrite, max_shard_size, load_mode, coef) -> None:
    """Write W_B + c·(W_B − W_A) for the selected groups (the rest copied from B) to OUT."""
    from opd_dynamics.effopd.offline import extrapolate_checkpoint

    path = extrapolate_checkpoint(prev, cur, coef, out, groups=parse_groups(groups, MATRIX_GROUPS), matrices_only=not all_shapes,
                                  overwrite=overwrite, max_shard_bytes=parse_size(max_shard_size), load_mode=load_mode)
    click.echo(f"wrote {path} (coef {coef:g})")


@click.group("effopd")
def effopd() -> None:
    """EffOPD on saved checkpoints (for frameworks that only leave checkpoints on disk)."""


@effopd.command("search")
@with_options(_shared)
@click.option("--eval-cmd", required=True,
              help="Shell command scoring a model dir: '{path}' is replaced by it (else it is appended); the "
                   "score (higher is better) is the number on the last line of its stdout.")
@click.option("--k-max", type=click.IntRange(min=0), default=5, show_default=True, help="Candidates B + 2k(B − A), k = 1 … K.")
@click.option("--coef-step", type=float, default=2.0, show_default=True, help="The 2 in 2k.")
@click.option("--strict", is_flag=True, help="Accept only strictly better scores (the authors' code).")
@click.option("--timeout", type=float, default=None, help="Seconds allowed per evaluation.")
def search(prev, cur, out, groups, all_shapes, overwrite, max_shard_size, load_mode, eval_cmd, k_max, coef_step,
           strict, timeout) -> None:
    """Score B, then B + 2k(B − A) for k = 1 … K in order; keep the last that does not score worse; write it to OUT."""
    from opd_dynamics.effopd.offline import search_checkpoints

    rec = search_checkpoints(prev, cur, out, eval_cmd, timeout=timeout, echo=click.echo, k_max=k_max, coef_step=coef_step, strict=strict,
                             groups=parse_groups(groups, MATRIX_GROUPS), matrices_only=not all_shapes, overwrite=overwrite,
                             max_shard_bytes=parse_size(max_shard_size), load_mode=load_mode)
    click.echo(f"accepted k={rec.k_accepted} (coef {rec.coef:g}); scores "
               + ", ".join(f"k{k}={s:g}" for k, s in enumerate(rec.scores)) + f"; wrote {out}")
    if rec.tie:
        click.echo(f"warning: {rec.tie_note()}", err=True)
