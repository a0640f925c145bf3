"""The mix contract as code (``shared/design/mix-contract.md``).

This module is the only thing ``train/`` needs to know about ``curation/``: column names, the
Arrow schema of pool and mixture rows, the group and severity vocabularies, and the directory
layout of a mix.

Schema version 2 adds two nullable columns for multimodal rows (BeaverTails-V style): ``image`` (a path,
URL or base64 string, kept as given; categorisation uses the text) and ``image_severity``
(minor/moderate/severe). ``equi train`` trains text-only models: it refuses a mix with image rows unless
``--skip-images`` drops them (counted in ``summary.json``).
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

import pyarrow as pa

SCHEMA_VERSION = 2  # 2: nullable `image` and `image_severity` columns (multimodal rows)


class Group(str, Enum):
    """Safety-data groups of Equilibrate RLHF plus the two non-core ones."""

    EHD = "EHD"  # explicit harmful data: harmful content/terms present, safety hinges on knowledge
    IHD = "IHD"  # implicit harmful data: no explicit risk terms, malicious intent
    MHD = "MHD"  # mixed: both
    OTHER = "OTHER"  # safety-related, none of the three
    BENIGN = "BENIGN"  # no safety risk (helpfulness data)

    def __str__(self) -> str:  # so f-strings and polars show "EHD", not "Group.EHD"
        return self.value


GROUPS: tuple[str, ...] = tuple(g.value for g in Group)
SAFETY_GROUPS: tuple[str, ...] = ("EHD", "IHD", "MHD")
SEVERITIES: tuple[str, ...] = ("minor", "moderate", "severe")
SPLITS: tuple[str, ...] = ("train", "eval")

SPAN_TYPE = pa.list_(pa.struct([("start", pa.int32()), ("end", pa.int32()), ("sign", pa.int8())]))

#: Columns shared by pool and mixture rows, in contract order.
ROW_FIELDS: list[pa.Field] = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("source", pa.string()),
    pa.field("source_line", pa.int64()),
    pa.field("prompt", pa.string()),
    pa.field("chosen", pa.string()),
    pa.field("rejected", pa.string()),
    pa.field("response", pa.string()),
    pa.field("group", pa.string()),
    pa.field("group_confidence", pa.float32()),
    pa.field("explicit_score", pa.float32()),
    pa.field("intent_score", pa.float32()),
    pa.field("severity", pa.string()),
    pa.field("harm_category", pa.string()),
    pa.field("image", pa.string()),
    pa.field("image_severity", pa.string()),
    pa.field("cluster", pa.int32()),
    pa.field("chosen_refusal", pa.float32()),
    pa.field("rejected_refusal", pa.float32()),
    pa.field("response_refusal", pa.float32()),
    pa.field("chosen_cost", pa.float32()),
    pa.field("rejected_cost", pa.float32()),
    pa.field("response_cost", pa.float32()),
    pa.field("chosen_spans", SPAN_TYPE),
    pa.field("rejected_spans", SPAN_TYPE),
    pa.field("split", pa.string()),
]

POOL_SCHEMA = pa.schema(ROW_FIELDS, metadata={"equi_schema_version": str(SCHEMA_VERSION)})
MIX_SCHEMA = pa.schema(
    ROW_FIELDS + [pa.field("rank", pa.int64())],
    metadata={"equi_schema_version": str(SCHEMA_VERSION)},
)
POOL_COLUMNS: list[str] = POOL_SCHEMA.names
MIX_COLUMNS: list[str] = MIX_SCHEMA.names

# Directory layout of a mix.
MANIFEST = "manifest.json"
CARD = "README.md"
REJECTS = "rejects.jsonl"
DATA_DIR = "data"
POOL_DIR = "pool"

# An ``equi train`` run directory: RUN_CONFIG records, under TRAIN_CONFIG_KEY, the settings it was started with;
# RUN_SUMMARY, written when training ends, what it trained (steps, loss, the pairs trained on); METRICS_FILE one
# JSON object per logging step; FINAL_DIR the trained model; EVAL_DIR its evaluation (``equi eval``, ``equi scale``).
RUN_CONFIG = "config.json"
TRAIN_CONFIG_KEY = "train_config"
RUN_SUMMARY = "summary.json"
METRICS_FILE = "metrics.jsonl"
FINAL_DIR = "final"
EVAL_DIR = "eval"

# An eval directory (a run's EVAL_DIR, or ``equi eval --out``): every answer, and the metrics computed from them.
EVAL_ANSWERS = "answers.parquet"
EVAL_METRICS = "metrics.json"


def run_record(run_dir: str | Path) -> dict | None:
    """The whole ``RUN_CONFIG`` record of an ``equi train`` run directory (settings, their hash, the mix's manifest
    hash, library versions); None when ``run_dir`` is not one."""
    try:
        record = json.loads((Path(run_dir) / RUN_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get(TRAIN_CONFIG_KEY), dict) else None


def saved_train_config(run_dir: str | Path) -> dict | None:
    """The settings an ``equi train`` run directory was started with; None when ``run_dir`` is not one."""
    record = run_record(run_dir)
    return record[TRAIN_CONFIG_KEY] if record is not None else None


def shard_name(prefix: str, index: int, total: int) -> str:
    """``train-00000-of-00002.parquet`` — the naming `datasets` recognises as splits."""
    return f"{prefix}-{index:05d}-of-{total:05d}.parquet"


def check_schema(actual: pa.Schema, expected: pa.Schema) -> str | None:
    """Return the first difference between two schemas in words, or ``None`` if they agree.

    Field order and metadata are ignored; names and types must match.
    """
    have = {f.name: f.type for f in actual}
    for field in expected:
        if field.name not in have:
            return f"missing column {field.name!r}"
        if have[field.name] != field.type:
            return f"column {field.name!r} has type {have[field.name]}, expected {field.type}"
    extra = sorted(set(have) - set(expected.names))
    if extra:
        return f"unexpected column(s) {', '.join(map(repr, extra))}"
    return None
