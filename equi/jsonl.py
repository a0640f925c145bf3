"""Strict reading of small user-supplied JSONL files (labels, knowledge, eval suites).

Unlike ``equi curate``'s reader, which turns every bad line into a reject, these files configure a run:
a bad line is an error naming ``file:line``. Blank lines are skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator


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
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            except RecursionError:
                raise error(f"{path}:{number}: not valid JSON (nested too deeply to read)") from None
            except ValueError as exc:  # an integer of over 4,300 digits
                raise error(f"{path}:{number}: not valid JSON ({str(exc).split('; ')[0]})") from None
