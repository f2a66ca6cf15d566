"""The one error type users see for bad input: a sentence naming the file (or the parameter) and what is wrong."""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """Bad user input (a path, a checkpoint, an option). The CLI prints it as one line and exits 2.

    ``params`` names the parameters the sentence mentions (as the Python API spells them: ``ref_step``,
    ``overwrite=True``); the command line shows each as its flag (``--ref-step``, ``--overwrite``).
    """

    def __init__(self, path: str | Path | None, problem: str, params: tuple[str, ...] = ()):
        self.path = None if path is None else str(path)
        self.problem = problem
        self.params = tuple(params)
        super().__init__(f"{self.path}: {problem}" if self.path else problem)
