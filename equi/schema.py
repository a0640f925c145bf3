"""The mix contract as code (``shared/design/mix-contract.md``).

This module is the only thing ``train/`` needs to know about ``curation/``: column names, the
Arrow schema of pool and mixture rows, the group and severity vocabularies, and the directory
layout of a mix.

Schema version 3 stores ``prompt``, ``chosen``, ``rejected`` and ``response`` in TRL's conversational format
(lists of ``{role, content}``: every turn of the prompt kept, one assistant message per answer), names the
held-out split ``test`` (TRL's default), and has the multimodal columns ``image`` (a path, URL or base64 string,
kept as given; categorisation uses the text) and ``image_severity`` (minor/moderate/severe) only in a mix that
holds images: an ``image`` column, even an all-null one, makes TRL treat a dataset as vision data. ``equi train``
trains text-only models: it refuses a mix with image rows unless ``--skip-images`` drops them (counted in
``summary.json``). Schema 2 (strings, an ``eval`` split, nullable image columns always present) is refused with
the command that re-curates it.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

import pyarrow as pa

SCHEMA_VERSION = 3  # 3: conversational columns, `test` split, image columns only in multimodal mixes


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
#: The safety interlock: a prompt the categoriser labels BENIGN but whose harm estimate lies in this band is too
#: uncertain to train helpfulness on: never mixed as BENIGN (`uncertain_harm`) and never paid for compliance online.
#: The shipped head labels BENIGN by the most probable of the five groups, so a BENIGN prompt's harm can exceed 0.5;
#: the band is therefore [0.3, 1]. Its effect on held-out prompts: data_cards/categoriser.md.
UNCERTAIN_HARM_BAND: tuple[float, float] = (0.3, 1.0)
SPLITS: tuple[str, ...] = ("train", "test")
#: The held-out split of the mixture (TRL's ``dataset_test_split`` default).
TEST_SPLIT = "test"

SPAN_TYPE = pa.list_(pa.struct([("start", pa.int32()), ("end", pa.int32()), ("sign", pa.int8())]))
#: TRL's conversational format: a list of ``{role, content}`` messages.
MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
IMAGE_COLUMNS: tuple[str, ...] = ("image", "image_severity")

#: Columns shared by pool and mixture rows, in contract order.
ROW_FIELDS: list[pa.Field] = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("source", pa.string()),
    pa.field("source_line", pa.int64()),
    pa.field("prompt", MESSAGES_TYPE),
    pa.field("chosen", MESSAGES_TYPE),
    pa.field("rejected", MESSAGES_TYPE),
    pa.field("response", MESSAGES_TYPE),
    pa.field("group", pa.string()),
    pa.field("group_confidence", pa.float32()),
    pa.field("explicit_score", pa.float32()),
    pa.field("intent_score", pa.float32()),
    pa.field("severity", pa.string()),
    pa.field("harm_category", pa.string()),
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

#: Multimodal mixes only (BeaverTails-V style rows), after ``harm_category``.
IMAGE_FIELDS: list[pa.Field] = [pa.field("image", pa.string()), pa.field("image_severity", pa.string())]
_METADATA = {"equi_schema_version": str(SCHEMA_VERSION)}


def _with_images(fields: list[pa.Field]) -> list[pa.Field]:
    at = [f.name for f in fields].index("harm_category") + 1
    return fields[:at] + IMAGE_FIELDS + fields[at:]


def pool_schema(multimodal: bool = False) -> pa.Schema:
    """The pool's Arrow schema; ``multimodal`` adds the image columns."""
    return pa.schema(_with_images(ROW_FIELDS) if multimodal else ROW_FIELDS, metadata=_METADATA)


def mix_schema(multimodal: bool = False) -> pa.Schema:
    """The mixture's Arrow schema (the pool's plus ``rank``); ``multimodal`` adds the image columns."""
    fields = ROW_FIELDS + [pa.field("rank", pa.int64())]
    return pa.schema(_with_images(fields) if multimodal else fields, metadata=_METADATA)


POOL_SCHEMA = pool_schema()
MIX_SCHEMA = mix_schema()
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


def is_multimodal(schema: pa.Schema) -> bool:
    """Whether a shard's schema carries the image columns."""
    return "image" in schema.names


def check_row_schema(actual: pa.Schema, mixture: bool) -> str | None:
    """:func:`check_schema` against the pool's or the mixture's schema, text-only or multimodal as the shard is."""
    multimodal = is_multimodal(actual)
    return check_schema(actual, mix_schema(multimodal) if mixture else pool_schema(multimodal))


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
