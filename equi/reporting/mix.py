"""What a mix directory holds, as plain numbers for charts and tables. Reads files, draws nothing."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from equi.errors import UsageError
from equi.schema import DATA_DIR, GROUPS, MANIFEST, POOL_DIR, REJECTS, SEVERITIES


class MixReadError(UsageError):
    """The directory is not a readable mix; the message says what is missing."""


@dataclass
class MixSummary:
    path: Path
    #: mixture rows by group → split → count (from the Parquet shards)
    composition: dict[str, dict[str, int]]
    #: mixture rows by group → severity (``unknown`` for none) → count
    severity: dict[str, dict[str, int]]
    #: pool rows per embedding cluster, largest first
    cluster_sizes: list[int]
    pool_groups: dict[str, int]
    accounting: dict[str, Any]
    accounting_problems: list[str]
    rejects: int
    reject_reasons: dict[str, int]
    warnings: list[str] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def mixture_rows(self) -> int:
        return sum(sum(splits.values()) for splits in self.composition.values())


def _read_columns(folder: Path, columns: list[str]):
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(folder.glob("*.parquet"))
    tables = [pq.read_table(f, columns=columns) for f in files]
    return pa.concat_tables(tables) if tables else None


def _ordered(counts: dict[str, Any], order: tuple[str, ...]) -> dict[str, Any]:
    return {k: counts[k] for k in list(order) + sorted(set(counts) - set(order)) if k in counts}


def summarise_mix(mix_dir: str | Path) -> MixSummary:
    from equi.manifest import accounting_problems

    mix = Path(mix_dir)
    manifest_path = mix / MANIFEST
    if not manifest_path.is_file():
        raise MixReadError(f"{mix} is not a mix directory (no {MANIFEST}); make one with `equi curate ... --out {mix}`")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))

    composition: dict[str, dict[str, int]] = {}
    severity: dict[str, dict[str, int]] = {}
    data = _read_columns(mix / DATA_DIR, ["group", "split", "severity"])
    if data is not None:
        for group, split, sev in zip(*(data.column(c).to_pylist() for c in ("group", "split", "severity"))):
            composition.setdefault(group, Counter())[split] += 1
            severity.setdefault(group, Counter())[sev or "unknown"] += 1
    pool = _read_columns(mix / POOL_DIR, ["group", "cluster"])
    cluster_sizes: list[int] = []
    pool_groups: dict[str, int] = {}
    if pool is not None:
        cluster_sizes = sorted(Counter(c for c in pool.column("cluster").to_pylist() if c is not None).values(),
                               reverse=True)
        pool_groups = dict(Counter(pool.column("group").to_pylist()))
    reasons: Counter[str] = Counter()
    rejects_path = mix / REJECTS
    if rejects_path.is_file():
        with rejects_path.open(encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    try:
                        reasons[str(json.loads(line).get("reason", "unknown"))] += 1
                    except json.JSONDecodeError:
                        reasons["unreadable reject line"] += 1
    accounting = manifest.get("accounting", {})
    return MixSummary(
        path=mix,
        composition=_ordered({g: dict(c) for g, c in composition.items()}, GROUPS),
        severity=_ordered({g: _ordered(dict(c), SEVERITIES + ("unknown",)) for g, c in severity.items()}, GROUPS),
        cluster_sizes=cluster_sizes,
        pool_groups=_ordered(pool_groups, GROUPS),
        accounting=accounting,
        accounting_problems=accounting_problems(accounting) if accounting else ["manifest has no accounting section"],
        rejects=sum(reasons.values()),
        reject_reasons=dict(reasons.most_common()),
        warnings=list(manifest.get("warnings", [])),
        manifest=manifest,
    )
