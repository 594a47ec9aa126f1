"""User-facing errors: one line that names the file and the problem."""
from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """Bad user input (file, option or value). The CLI prints `str(err)` on one line and exits 2."""

    def __init__(self, problem: str, path: str | Path | None = None):
        self.path = None if path is None else str(path)
        self.problem = " ".join(str(problem).split())  # one line, whatever the cause said
        super().__init__(f"{self.path}: {self.problem}" if self.path else self.problem)


class ModelFileError(InputError):
    """A model or kernel file that is missing, corrupt, from an incompatible version, or of the wrong kind."""
