"""Small click helpers shared by the CLI modules."""

from __future__ import annotations

from pathlib import Path

from opd_dynamics.errors import InputError
from opd_dynamics.naming import GROUPS


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
