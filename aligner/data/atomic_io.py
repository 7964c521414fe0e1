"""Atomic file and directory writes.

Data preparation may be interrupted (Ctrl-C, a job time limit); writing to a temporary
sibling and renaming it into place means readers only ever see a complete old file or a
complete new one, never a truncated file that would parse as a smaller dataset.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator, TextIO, Union

PathLike = Union[str, "os.PathLike[str]"]


@contextlib.contextmanager
def open_atomic(path: PathLike) -> Iterator[TextIO]:
    """Open ``path`` for writing text (UTF-8, ``\\n`` newlines); it appears only on success."""
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        # mkstemp creates 0600 files; data files are meant to be shared like any other output.
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with open_atomic(path) as f:
        f.write(text)


@contextlib.contextmanager
def replace_dir_atomic(path: PathLike) -> Iterator[str]:
    """Yield a fresh temporary directory that replaces ``path`` when the block succeeds.

    A directory cannot be swapped in one ``rename`` when the target already exists, so the
    old one is moved aside first and deleted afterwards; the window in which ``path`` is
    missing is a single rename.
    """
    path = os.fspath(path).rstrip(os.sep) or os.sep
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o755)
        yield tmp
        old = None
        if os.path.lexists(path):
            old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".old")
            os.rmdir(old)
            os.rename(path, old)
        os.rename(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
