"""Errors raised for bad data files.

Every message starts with ``path:line:`` (or ``path:`` when no single line is to blame) so
that editors and terminals can jump straight to the offending record.
"""
from __future__ import annotations

import errno
import os
from typing import Optional


class DataFormatError(ValueError):
    """A data file does not have the format the toolkit expects.

    ``str(err)`` is ``"{path}:{line}: {problem}"``; ``path``, ``line`` and ``problem`` are
    also kept as attributes for callers that want to report them differently.
    """

    def __init__(self, path: "str | os.PathLike[str]", problem: str, line: Optional[int] = None):
        self.path = os.fspath(path)
        self.line = line
        self.problem = problem
        where = self.path if line is None else f"{self.path}:{line}"
        self.message = f"{where}: {problem}"
        super().__init__(self.message)

    def __str__(self) -> str:
        # Defined explicitly because OSError (a base of DataFileNotFoundError) would otherwise
        # format the message as "[Errno 2] ...".
        return self.message


class DataFileNotFoundError(DataFormatError, FileNotFoundError):
    """The data file does not exist.

    Also a ``FileNotFoundError`` so generic ``except OSError`` handlers keep working.
    """

    def __init__(self, path: "str | os.PathLike[str]", problem: str = "file not found"):
        super().__init__(path, problem)
        self.errno = errno.ENOENT
        self.strerror = problem
        self.filename = self.path
