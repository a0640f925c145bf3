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
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(f"{path}:{number}: not valid JSON ({exc.msg})") from None
