"""The one error type users see for bad input: a sentence naming the file and what is wrong."""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """Bad user input (a path, a checkpoint, an option). The CLI prints it as one line and exits 2."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)
