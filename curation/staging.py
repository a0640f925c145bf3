"""What the curation stage writes to disk: staged batches, pool and mixture shards.

Both engines stage the first pass here (:data:`STAGE_SCHEMA`, one ``.npy`` file of prompt embeddings beside
each staged Parquet file, each written whole by :func:`write_atomic`) and hand back a :class:`ScoredInput`;
the pool and the mixture are then written from the staged rows (:func:`write_pool`, :func:`build_mixture_rows`,
:func:`write_mixture`), whichever engine staged them.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from equi.config import CurateConfig
from equi.messages import ANSWER_COLUMNS, to_conversational
from equi.schema import MESSAGES_TYPE, REJECTS, SPLITS, mix_schema, pool_schema, shard_name

from curation.mixer import eval_split, ladder_ranks
from curation.readers import InputError, ReadStats, content_id
from curation.segments import pair_span_columns

# Staged rows: the pool's columns before clustering, as the text curation scores (equi.messages: the prompt as one
# string, each answer its content, and the prompt's turns in `prompt_messages`), plus (not contract columns) the
# prompt's harm probability that the mixer needs to score the spans of single responses it pairs, and the row kind
# (pair, single, prompt) that a resumed run reads back.
_TEXT_COLUMNS = ("prompt", *ANSWER_COLUMNS)
STAGE_SCHEMA = pa.schema([pa.field(f.name, pa.string()) if f.name in _TEXT_COLUMNS else f
                          for f in pool_schema(multimodal=True) if f.name != "cluster"]
                         + [pa.field("prompt_messages", MESSAGES_TYPE), pa.field("harm_score", pa.float32()),
                            pa.field("kind", pa.string()), pa.field("group_labeller", pa.string())])

#: The columns of a staged batch that a resumed run reads back (what :func:`curation.steps.batch_meta` needs).
META_COLUMNS = ("prompt", "image", "kind", "group", "response_cost", "harm_score", "group_labeller")


# --------------------------------------------------------------------------------------------------
# Writing files
# --------------------------------------------------------------------------------------------------

class ShardWriter:
    """Writes Arrow batches into numbered Parquet shards of at most ``rows_per_shard`` rows.

    Rows are buffered into row groups of exactly ``row_group_rows`` (the last of a shard may be shorter), so
    a shard's bytes depend only on its rows, not on how they were handed in: a resumed run, the Ray engine
    and a plain run write the same files. Shards get their final ``{prefix}-{i:05d}-of-{n:05d}`` names in
    :meth:`close`, once n is known.
    """

    def __init__(self, folder: Path, prefix: str, schema: pa.Schema, rows_per_shard: int,
                 row_group_rows: int = 8192):
        self.folder, self.prefix, self.schema, self.rows_per_shard = folder, prefix, schema, rows_per_shard
        self.row_group_rows = row_group_rows
        folder.mkdir(parents=True, exist_ok=True)
        self.paths: list[Path] = []
        self.rows: list[int] = []
        self.groups: list[str | None] = []
        self._writer: pq.ParquetWriter | None = None
        self._pending: list[pa.Table] = []

    def _open(self, group: str | None) -> None:
        path = self.folder / f".{self.prefix}-{len(self.paths):05d}.partial"
        self._writer = pq.ParquetWriter(path, self.schema, compression="zstd")
        self.paths.append(path)
        self.rows.append(0)
        self.groups.append(group)

    def _flush(self, everything: bool) -> None:
        pending = pa.concat_tables(self._pending) if self._pending else None
        self._pending = []
        while pending is not None and pending.num_rows and (everything or pending.num_rows >= self.row_group_rows):
            take = min(self.row_group_rows, pending.num_rows)
            self._writer.write_table(pending.slice(0, take), row_group_size=take)
            pending = pending.slice(take)
        if pending is not None and pending.num_rows:
            self._pending = [pending]

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._flush(everything=True)
            self._writer.close()
            self._writer = None

    def write(self, table: pa.Table, group: str | None = None, new_shard: bool = False) -> None:
        offset = 0
        if new_shard:
            self._close_shard()
        while offset < table.num_rows:
            if self._writer is None or self.rows[-1] >= self.rows_per_shard:
                self._close_shard()
                self._open(group)
            take = min(self.rows_per_shard - self.rows[-1], table.num_rows - offset)
            self._pending.append(table.slice(offset, take))
            self.rows[-1] += take
            offset += take
            if sum(t.num_rows for t in self._pending) >= self.row_group_rows:
                self._flush(everything=False)

    def close(self) -> list[tuple[Path, int, str | None]]:
        self._close_shard()
        final = []
        for i, (path, rows, group) in enumerate(zip(self.paths, self.rows, self.groups)):
            target = self.folder / shard_name(self.prefix, i, len(self.paths))
            path.rename(target)
            final.append((target, rows, group))
        return final


def to_table(frame: pl.DataFrame, schema: pa.Schema) -> pa.Table:
    return frame.select(schema.names).to_arrow().cast(schema)


def contract_table(frame: pl.DataFrame, schema: pa.Schema) -> pa.Table:
    """Staged (text) rows as the contract's columns: conversational messages, ``schema``'s columns only."""
    return to_table(to_conversational(frame), schema)


def batched(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:  # a handle: np.save would append ".npy" to a path's name
        np.save(handle, array, allow_pickle=False)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write beside ``path``, flush it to the disk, then rename it into place (and flush the rename): a staged
    batch that exists survives a power loss whole."""
    # The pid keeps two writers apart (a worker orphaned by a killed run may still finish its batch).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync(path.parent)


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------
# Staged batches (the first pass)
# --------------------------------------------------------------------------------------------------

def write_staged_batch(path: Path, frame: pl.DataFrame, vectors: np.ndarray) -> pl.DataFrame:
    """Stage one scored batch at ``path`` (embeddings first, the Parquet file last, each renamed into place);
    returns the metadata columns a resumed run reads back."""
    write_atomic(path.with_suffix(".npy"), lambda tmp: save_npy(tmp, vectors))
    write_atomic(path, lambda tmp: pq.write_table(to_table(frame, STAGE_SCHEMA), tmp, compression="zstd"))
    return frame.select(META_COLUMNS)


def read_staged_batch(path: Path, expected_rows: int) -> pl.DataFrame | None:
    """A batch an earlier run finished: its metadata (its embeddings stay on disk), or ``None`` to score it again.

    A staged file that cannot be read whole (cut short by a power loss or a full disk) is removed and its batch
    scored again; it never costs the other batches' work.
    """
    vectors_path = path.with_suffix(".npy")
    if not (path.is_file() and vectors_path.is_file()):
        return None
    try:
        # Read whole, once: every column must decode (the footer alone can survive a cut); the metadata is kept.
        frame = pl.from_arrow(pq.read_table(path).select(list(META_COLUMNS)))
        vectors = np.load(vectors_path, mmap_mode="r", allow_pickle=False)  # the header only: its shape
        if vectors.nbytes > vectors_path.stat().st_size:
            raise ValueError("truncated .npy")
    except (OSError, ValueError, pl.exceptions.PolarsError, pa.ArrowException):
        path.unlink(missing_ok=True)
        vectors_path.unlink(missing_ok=True)
        return None
    if frame.height != expected_rows or vectors.shape[0] != expected_rows:
        raise InputError(f"{path.parent.parent} holds an interrupted run that does not match this input "
                         f"(batch {path.stem}: {frame.height} staged rows, {expected_rows} read); "
                         "run again with --no-resume")
    return frame


@dataclass
class ScoredInput:
    """What the first pass leaves: staged rows on disk, and in memory only embeddings and slim metadata."""

    stage_dir: Path
    stage_files: list
    embeddings: np.ndarray | None  # float16, one row per pooled row (dropped once the mixture is chosen)
    meta: pl.DataFrame  # idx, prompt_key, kind, group, response_cost, harm_score, has_image
    n_rows: int
    n_rejected: int
    stats: ReadStats
    resumed_batches: int = 0

    @classmethod
    def assemble(cls, stage_dir: Path, stage_files: list, embeddings: Iterable[np.ndarray],
                 meta_parts: list[pl.DataFrame], n_rejected: int, stats: ReadStats, dim: int) -> "ScoredInput":
        """The first pass's result from its per-batch parts, in input order; refuses an empty input, and one
        whose every line was rejected.

        ``embeddings`` yields each batch's vectors in order; they are copied into one preallocated float16
        matrix, so the batches and the matrix are never all in memory at once (a concatenation would hold both:
        twice the largest thing curation keeps).
        """
        if sum(stats.lines_by_file.values()) == 0:
            raise InputError("the input is empty: no lines to curate (nothing was written)")
        if n_rejected and not sum(part.height for part in meta_parts):
            raise InputError(_all_rejected(stage_dir.parent / REJECTS, n_rejected))
        meta = (pl.concat(meta_parts) if meta_parts else
                pl.DataFrame(schema={"idx": pl.Int64, "prompt_key": pl.UInt64, "kind": pl.String, "group": pl.String,
                                     "response_cost": pl.Float32, "harm_score": pl.Float32,
                                     "has_image": pl.Boolean, "group_labeller": pl.String}))
        matrix = np.empty((meta.height, dim), dtype=np.float16)
        filled = 0
        for part in embeddings:
            matrix[filled:filled + len(part)] = part
            filled += len(part)
        if filled != meta.height:
            raise RuntimeError(f"pass 1 staged {meta.height} rows but {filled} embeddings")
        return cls(stage_dir, stage_files, matrix, meta, meta.height, n_rejected, stats)

    @property
    def multimodal(self) -> bool:
        """Whether any pooled row has an image: only then do the pool and the mixture have the image columns."""
        return bool(self.meta["has_image"].any()) if self.meta.height else False

    def remove_stage(self) -> None:
        shutil.rmtree(self.stage_dir)


def _all_rejected(rejects: Path, n_rejected: int, shown: int = 3) -> str:
    """The error for an input of which no line is usable: a mix of nothing would only fail later (``datasets``
    cannot load an empty pool), so nothing is written and the first few reasons are named instead."""
    first: dict[str, str] = {}  # a reason's kind (before any detail) -> its first file:line and full reason
    with open(rejects, encoding="utf-8") as lines:
        for line in lines:
            reject = json.loads(line)
            first.setdefault(reject["reason"].split(":")[0].split(" (")[0],
                             f"{reject['file']}:{reject['line']}: {reject['reason']}")
            if len(first) > shown:
                break
    examples = "; ".join(list(first.values())[:shown]) + ("; …" if len(first) > shown else "")
    return (f"no usable line: all {n_rejected} input lines were rejected, so nothing was written ({examples}); "
            "see the contract's input shapes, or --strict to stop at the first bad line")


# --------------------------------------------------------------------------------------------------
# The pool and the mixture (the second pass, from the staged rows)
# --------------------------------------------------------------------------------------------------

def write_pool(stage_files: list, clusters: np.ndarray, folder: Path, config: CurateConfig,
               multimodal: bool = False) -> list:
    """Pass 2: stream the staged rows into the pool shards, adding the ``cluster`` column."""
    schema = pool_schema(multimodal)
    pool = ShardWriter(folder, "pool", schema, config.shard_rows)
    offset = 0
    for path, _, _ in stage_files:
        for record_batch in pq.ParquetFile(path).iter_batches(batch_size=config.batch_size):
            frame = pl.from_arrow(record_batch)
            frame = frame.with_columns(pl.Series("cluster", clusters[offset:offset + frame.height], pl.Int32))
            offset += frame.height
            pool.write(contract_table(frame, schema))
    return pool.close()


def build_mixture_rows(stage_files: list, selected: pl.DataFrame, eval_fraction: float,
                       interleave: bool = True) -> pl.DataFrame:
    """Full mixture rows for the selection (as text, like the staged rows): native pairs copied, single responses
    joined into pairs. ``interleave=False`` (``--order input``) keeps the selection's order within each split."""
    if selected.height == 0:
        return pl.from_arrow(STAGE_SCHEMA.empty_table()).with_columns(
            pl.lit(None, pl.Int32).alias("cluster"), pl.lit(None, pl.Int64).alias("rank"))
    wanted = pl.concat([selected["chosen_idx"], selected["rejected_idx"].drop_nulls()])
    rows = _take_staged(stage_files, np.unique(wanted.to_numpy()))
    by_idx = rows.join(selected.select("chosen_idx", "rejected_idx", "rank", "cluster"), left_on="idx",
                       right_on="chosen_idx", how="inner")
    native = by_idx.filter(pl.col("rejected_idx").is_null())
    single = by_idx.filter(pl.col("rejected_idx").is_not_null())
    if single.height:
        other = rows.select(pl.col("idx").alias("rejected_idx"), pl.col("response").alias("_rej_text"),
                            pl.col("response_refusal").alias("_rej_refusal"),
                            pl.col("response_cost").alias("_rej_cost"))
        single = single.join(other, on="rejected_idx", how="left")
        single = single.with_columns(
            chosen=pl.col("response"), rejected=pl.col("_rej_text"),
            chosen_refusal=pl.col("response_refusal"), rejected_refusal=pl.col("_rej_refusal"),
            chosen_cost=pl.col("response_cost"), rejected_cost=pl.col("_rej_cost"),
        )
        prompt_harm = single["harm_score"].to_list()
        single = single.with_columns(
            *pair_span_columns(prompt_harm, single["chosen"].to_list(), single["rejected"].to_list()),
            pl.Series("id", [content_id(p, c, r, None) for p, c, r in
                             zip(single["prompt"], single["chosen"], single["rejected"])]),
            response=pl.lit(None, pl.String), response_refusal=pl.lit(None, pl.Float32),
            response_cost=pl.lit(None, pl.Float32),
        )
    columns = [c for c in mix_schema(multimodal=True).names if c != "split"] + ["prompt_messages"]
    mixture = pl.concat([native.select(columns), single.select(columns)] if single.height else
                        [native.select(columns)]).sort("rank")
    mixture = mixture.with_columns(pl.Series("split", eval_split(mixture["id"].to_list(), eval_fraction)))
    return rank_within_splits(mixture, interleave)


def rank_within_splits(mixture: pl.DataFrame, interleave: bool = True) -> pl.DataFrame:
    """``rank`` counted within each split: the selection's pick order (``rank`` in, each group's rows in their
    round-robin order) interleaved by :func:`curation.mixer.ladder_ranks`, so every prefix of a split
    (``rank < k``, ``split="train[:10%]"``) keeps the group ratios to within one row. It is done here, once the
    held-out rows are drawn (by id hash), not mixture-wide: a mixture-wide ladder's train rows would keep the ratios
    only roughly. ``interleave=False`` (``--order input``): counted in the pick order (no ratios to keep)."""
    parts = []
    for split in SPLITS:
        part = mixture.filter(pl.col("split") == split).sort("rank")
        if part.height:
            ranks = ladder_ranks(part["group"].to_list()) if interleave else np.arange(part.height)
            parts.append(part.with_columns(pl.Series("rank", ranks, pl.Int64)))
    return pl.concat(parts).sort("split", "rank") if parts else mixture


def _take_staged(stage_files: list, wanted: np.ndarray) -> pl.DataFrame:
    """The staged rows at the sorted pool indices ``wanted``, with their index as ``idx``: one staged batch in
    memory at a time (a filtered scan of every batch held them all at once: 0.4 GiB more at 1M rows)."""
    parts, start = [], 0
    for path, n_rows, _ in stage_files:
        lo, hi = np.searchsorted(wanted, [start, start + n_rows])
        if hi > lo:
            batch = pl.read_parquet(path)[(wanted[lo:hi] - start).tolist()]
            parts.append(batch.with_columns(pl.Series("idx", wanted[lo:hi], pl.Int64)))
        start += n_rows
    return pl.concat(parts)


def write_mixture(folder: Path, mixture: pl.DataFrame, rows_per_shard: int, multimodal: bool = False) -> list:
    """Each split's rows in ``rank`` order across its shards, so any prefix of a split (``train[:10%]``) is itself a
    balanced subset; ``mixture`` holds text columns (:func:`build_mixture_rows`), written as the contract's
    messages. Returns ``(path, rows, (split, rows by group))`` per shard."""
    schema = mix_schema(multimodal)
    written = []
    for split in SPLITS:
        part = mixture.filter(pl.col("split") == split).sort("rank")
        if part.height == 0:
            continue
        writer = ShardWriter(folder, split, schema, rows_per_shard)
        writer.write(contract_table(part, schema))
        start = 0
        for path, rows, _ in writer.close():
            groups = part["group"][start:start + rows].value_counts()
            written.append((path, rows, (split, dict(zip(groups["group"].to_list(), groups["count"].to_list())))))
            start += rows
    return written
