"""The command-line layer: the root `opd-dynamics` group (`cli.root.main`) and the click kit every package's `cli.py`
builds its commands with (`cli.kit`: options generated from an options dataclass, the shared series options, the
mapping of a library error's parameters to flags).

`main` (in `cli.root`) is resolved on first use, so that importing the kit (as each package's `cli.py` does)
does not import every command.
"""

from __future__ import annotations

__all__ = ["main"]


def __getattr__(name: str):
    if name == "main":
        from opd_dynamics.cli.root import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
