"""The one exception type for bad user input: the CLI prints it on one line and exits 2."""

from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """Bad input, located as precisely as we can: file, line, column or config key."""

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        line: int | None = None,
        column: str | None = None,
    ) -> None:
        self.message, self.path, self.line, self.column = message, path, line, column
        where = str(path) if path is not None else ""
        if line is not None:
            where += f":{line}"
        if column is not None:
            where += f" (column {column!r})"
        super().__init__(f"{where}: {message}" if where else message)
