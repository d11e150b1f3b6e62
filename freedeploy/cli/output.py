"""Tables and JSON for command output (stdout); messages go to stderr."""

from __future__ import annotations

import json
from typing import Any, Sequence

import click

__all__ = ["emit_json", "table", "note", "exit_name"]


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False, default=str))


def note(message: str) -> None:
    """A progress or status line for people, on stderr."""
    click.echo(message, err=True)


def exit_name(key: str) -> str:
    """How a key of an ``exit_histogram`` or ``exit_share`` object reads: 'block 2' or 'final head'."""
    return "final head" if key == "final" else f"block {key}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table; numbers right-aligned."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(_is_num(row[i]) for row in rows) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if numeric[i] else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)
