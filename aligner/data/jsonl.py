"""Reading and writing JSON-lines files with errors that point at ``file:line``.

One JSON object per line, UTF-8. Blank lines are allowed (and skipped) because hand-edited
files often end with one or more of them.
"""
from __future__ import annotations

import difflib
import json
import os
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Tuple, Union

from aligner.data.atomic_io import open_atomic
from aligner.data.errors import DataFileNotFoundError, DataFormatError

PathLike = Union[str, "os.PathLike[str]"]


def check_file_exists(path: PathLike) -> None:
    """Raise DataFileNotFoundError for a missing file, suggesting a close sibling name.

    The suggestion catches the common typos (``train.jsonl`` vs ``training.jsonl``,
    ``.json`` vs ``.jsonl``) that otherwise cost a re-launch to discover.
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        return
    if os.path.isdir(path):
        raise DataFileNotFoundError(path, "is a directory, expected a .jsonl file")
    parent = os.path.dirname(path) or "."
    problem = "file not found"
    if os.path.isdir(parent):
        close = difflib.get_close_matches(os.path.basename(path), sorted(os.listdir(parent)), n=1, cutoff=0.75)
        if close:
            problem += f"; did you mean {os.path.join(os.path.dirname(path), close[0])}?"
    else:
        problem += f" (directory {parent} does not exist)"
    raise DataFileNotFoundError(path, problem)


def iter_jsonl(path: PathLike) -> Iterator[Tuple[int, dict]]:
    """Yield ``(line_number, record)`` for each non-blank line; line numbers are 1-based.

    Raises DataFormatError naming ``path:line`` for undecodable UTF-8, invalid JSON, or a
    line that is valid JSON but not an object.
    """
    check_file_exists(path)
    path = os.fspath(path)
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataFormatError(path, f"not valid UTF-8 ({e.reason} at byte {e.start})", line_no) from None
            if line_no == 1:
                text = text.lstrip("\ufeff")  # tolerate a byte-order mark written by some editors
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataFormatError(path, f"invalid JSON: {e.msg} (column {e.colno})", line_no) from None
            if not isinstance(record, dict):
                raise DataFormatError(
                    path, f"expected a JSON object per line, got {type(record).__name__}", line_no
                )
            yield line_no, record


def require_fields(
    record: Mapping[str, Any],
    fields: Sequence[str],
    path: PathLike,
    line: Optional[int],
    field_type: Optional[Union[type, Tuple[type, ...]]] = None,
) -> None:
    """Check that ``record`` has every key in ``fields`` (and, if given, of ``field_type``).

    Raises DataFormatError at ``path:line`` naming the missing keys and the keys present.
    """
    missing = [name for name in fields if name not in record]
    if missing:
        raise DataFormatError(
            path,
            f"missing field(s) {', '.join(repr(m) for m in missing)}; "
            f"the record has {sorted(record) or 'no fields'}",
            line,
        )
    if field_type is not None:
        for name in fields:
            value = record[name]
            # bool is an int subclass, but true/false is never a valid number in our formats.
            if not isinstance(value, field_type) or (isinstance(value, bool) and bool not in _as_tuple(field_type)):
                expected = " or ".join(t.__name__ for t in _as_tuple(field_type))
                raise DataFormatError(
                    path, f"field {name!r} must be {expected}, got {type(value).__name__}", line
                )


def _as_tuple(types: Union[type, Tuple[type, ...]]) -> Tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def write_jsonl(path: PathLike, records: Iterable[Mapping[str, Any]]) -> int:
    """Write ``records`` one JSON object per line, atomically; return the number written.

    Non-ASCII text is written as UTF-8 rather than ``\\u`` escapes so files stay readable.
    """
    count = 0
    with open_atomic(path) as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False, allow_nan=False))
            f.write("\n")
            count += 1
    return count
