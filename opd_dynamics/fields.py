"""Options dataclass fields that carry their command-line description, so that an option is added once.

`option(default, help, …)` is a dataclass field whose metadata the CLI reads (`opd_dynamics.cli.kit.
dataclass_options`): ``help``; ``choices``; ``flag`` (a declaration such as ``--progress/--quiet``); ``min``
(an int range); ``cli`` ('ints', 'names' (words), 'groups', 'token_file': text parsed into the value, or False:
no flag); ``metavar``.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any


def option(default: Any, help: str, **cli: Any) -> Any:
    """A dataclass field with ``default`` and its command-line ``help`` (and the ``cli`` metadata above)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("option(): a mutable default would be shared; use a tuple or a frozen dataclass")
    return field(default=default, metadata={"help": help, **cli})


def nested(factory: Any, help: str) -> Any:
    """A field holding another options dataclass (made by ``factory``); its flags are generated from it."""
    return field(default_factory=factory, metadata={"help": help, "cli": False})
