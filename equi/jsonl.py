"""Strict reading of small user-supplied JSONL files (labels, knowledge, eval suites).

Unlike ``equi curate``'s reader, which turns every bad line into a reject, these files configure a run:
a bad line is an error naming ``file:line``. Blank lines are skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from equi.errors import UsageError


class BadJSON(UsageError):
    """Why a line is not JSON Python can read: ``reason`` (and the ``column``, where the parser says)."""

    def __init__(self, reason: str, column: int | None = None):
        super().__init__(reason)
        self.reason, self.column = reason, column


def loads_line(text: str) -> Any:
    """``json.loads`` of one line, with every way it fails as :class:`BadJSON`: invalid JSON, nesting deeper than
    Python's stack, an integer of over 4,300 digits (Python's "Exceeds the limit …; use …", cut at the advice)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadJSON(exc.msg, exc.colno) from None
    except RecursionError:
        raise BadJSON("nested too deeply to read") from None
    except ValueError as exc:
        raise BadJSON(str(exc).split("; ")[0]) from None


def iter_json_lines(path: Path, error: type[Exception]) -> Iterator[tuple[int, Any]]:
    """``(line_number, parsed_value)`` for each non-blank line; invalid JSON raises ``error("path:line: …")``."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise error(f"{path}:{number}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
            if not line.strip():
                continue
            try:
                yield number, loads_line(line)
            except BadJSON as exc:
                raise error(f"{path}:{number}: not valid JSON ({exc.reason})") from None
