"""The audit trail of an evaluation: every prompt, answer and label in Parquet, metrics in JSON.

Layout of an eval directory (``runs/NAME/eval/`` for a run, ``--out DIR`` otherwise)::

    answers.parquet   one row per prompt: suite, prompt_id, prompt, expected, subtype,
                      answer, label, refusal_score, new_tokens, truncated
    metrics.json      {"summary", "suites", "xstest_types", "model", "config", "suite_notes", "created_at"}
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from equi.schema import EVAL_ANSWERS, EVAL_DIR, EVAL_METRICS  # noqa: F401 (EVAL_DIR: re-exported)

# This package's names for the eval directory's files (spelled in equi.schema).
ANSWERS_FILE = EVAL_ANSWERS
METRICS_FILE = EVAL_METRICS

AUDIT_SCHEMA = pa.schema([
    pa.field("suite", pa.string(), nullable=False),
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("expected", pa.string(), nullable=False),
    pa.field("subtype", pa.string()),
    pa.field("answer", pa.string(), nullable=False),
    pa.field("label", pa.string(), nullable=False),
    pa.field("refusal_score", pa.float32()),
    pa.field("new_tokens", pa.int32()),
    pa.field("truncated", pa.bool_()),
])


def _atomic_write_bytes(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".partial")
    write(tmp)
    os.replace(tmp, path)


def write_answers(out_dir: Path, rows: Sequence[dict[str, Any]]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(list(rows), schema=AUDIT_SCHEMA)
    path = out_dir / ANSWERS_FILE
    _atomic_write_bytes(path, lambda tmp: pq.write_table(table, tmp))
    return path


def read_answers(eval_dir: Path) -> list[dict[str, Any]]:
    return pq.read_table(Path(eval_dir) / ANSWERS_FILE).to_pylist()


def write_metrics(out_dir: Path, metrics: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / METRICS_FILE
    text = json.dumps(metrics, indent=2, sort_keys=False, default=str) + "\n"
    _atomic_write_bytes(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def read_metrics(eval_dir: Path) -> dict[str, Any] | None:
    """The metrics of an eval directory, or ``None`` when there is none (not evaluated yet)."""
    path = Path(eval_dir) / METRICS_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))
