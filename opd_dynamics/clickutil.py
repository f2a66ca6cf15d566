"""Small click helpers shared by the CLI modules."""

from __future__ import annotations


def with_options(options):
    """Apply a list of click decorators (options/arguments) in the order listed."""
    def deco(f):
        for o in reversed(options):
            f = o(f)
        return f
    return deco
