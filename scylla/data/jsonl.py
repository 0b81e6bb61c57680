"""Reading JSONL files users point us to, with errors that name the file and the line."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from scylla.errors import DataError


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for every non-blank line (line numbers start at 1).

    Raises DataError for a missing file, a line that is not a JSON object, and a file with
    no records at all.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    seen = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text ({e.reason})") from e
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON line ({e.msg} at column "
                                f"{e.colno})") from e
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got "
                                f"{type(obj).__name__}")
            seen += 1
            yield lineno, obj
    if seen == 0:
        raise DataError(f"{path}: the file is empty (no JSON records)")
