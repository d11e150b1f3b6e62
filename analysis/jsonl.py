"""JSONL data files: one object per line, every problem one ``DataError`` naming the file and line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from runtimes.errors import DataError

__all__ = ["jsonl_objects"]


def jsonl_objects(path: Path, expected: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of ``path``; ``expected`` says what an object
    holds, for the error when a line is something else. A byte-order mark on line 1 is accepted."""
    with path.open("rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path} line {n} is not valid utf-8 ({exc.reason})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {n} is not valid JSON: {exc.msg}") from None
            except RecursionError:
                raise DataError(f"{path} line {n} is nested too deeply") from None
            if not isinstance(row, dict):
                raise DataError(f"{path} line {n}: expected an object with {expected}")
            yield n, row
