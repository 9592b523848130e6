"""The one exception of the data layer."""

from __future__ import annotations

import os


class DataError(ValueError):
    """A data file is missing, corrupt, truncated or inconsistent; the message names the file."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):
        return type(self), (self.path, self.problem)
