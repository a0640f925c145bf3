"""``equi curate``: raw JSONL → categorised pool → FDC mixture, written atomically as a mix directory.

The flow, with bounded memory (only the embeddings matrix and slim metadata grow with the input):

1. read lines in batches (rejects stream to ``rejects.jsonl``) and score each batch with small
   step functions (:func:`score_batch`: embed, categorise, refusal, cost, AMA spans) into staged
   Parquet;
2. cluster the prompt embeddings, then stream the staged rows into the pool shards with a
   ``cluster`` column;
3. choose the mixture from pool metadata (:mod:`curation.mixer`) and write it, one group per shard;
4. write the manifest (with balanced accounting) and the data card; rename the directory into place.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections import deque
from contextlib import closing
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from equi.config import CurateConfig, config_hash
from equi.manifest import (check_writable, equi_version, resumable_directory, sha256_file, shard_entry, utc_now,
                           write_json_atomic)
from equi.schema import (CARD, DATA_DIR, GROUPS, MANIFEST, MIX_SCHEMA, POOL_DIR, POOL_SCHEMA, REJECTS,
                         SCHEMA_VERSION, shard_name)

from curation.readers import (InputError, RawRow, ReadStats, Reject, content_id, parse_lines, read_lines,
                              read_rows)


@dataclass
class CurateResult:
    out: Path
    manifest: dict
    warnings: list[str] = field(default_factory=list)
    resumed_batches: int = 0  # batches read back from an interrupted run instead of scored again


# --------------------------------------------------------------------------------------------------
# Step functions over a batch (pure apart from the models passed in)
# --------------------------------------------------------------------------------------------------

def rows_to_frame(rows: list[RawRow]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "id": [r.id for r in rows],
            "source": [r.source for r in rows],
            "source_line": [r.source_line for r in rows],
            "kind": [_kind(r.shape) for r in rows],
            "prompt": [r.prompt for r in rows],
            "chosen": [r.chosen for r in rows],
            "rejected": [r.rejected for r in rows],
            "response": [r.response for r in rows],
            "category": [r.category for r in rows],
            "severity": [r.severity for r in rows],
            "is_safe": [r.is_safe for r in rows],
            "image": [r.image for r in rows],
            "image_severity": [r.image_severity for r in rows],
        },
        schema={"id": pl.String, "source": pl.String, "source_line": pl.Int64, "kind": pl.String,
                "prompt": pl.String, "chosen": pl.String, "rejected": pl.String, "response": pl.String,
                "category": pl.String, "severity": pl.String, "is_safe": pl.Boolean,
                "image": pl.String, "image_severity": pl.String},
    )


def _kind(shape: str) -> str:
    return {"pair": "pair", "conversation": "pair", "hh": "pair", "single": "single"}.get(shape, "prompt")


def score_refusals(frame: pl.DataFrame) -> pl.DataFrame:
    """``*_refusal``: probability that each response refuses (null where there is no response).

    One call over the three response columns, so a text repeated across them is scored once.
    """
    from curation.refusal import refusal_scores

    columns = ("chosen", "rejected", "response")
    present = {c: frame[c].is_not_null().to_numpy() for c in columns}
    texts = [t for c in columns for t in frame[c].drop_nulls().to_list()]
    scores = refusal_scores(texts) if texts else np.zeros(0, dtype=np.float32)
    out, offset = {}, 0
    for column in columns:
        column_scores = np.full(frame.height, np.nan, dtype=np.float32)
        n = int(present[column].sum())
        column_scores[present[column]] = scores[offset:offset + n]
        offset += n
        out[f"{column}_refusal"] = pl.Series(column_scores).fill_nan(None).cast(pl.Float32)
    return frame.with_columns(**out)


def score_costs(frame: pl.DataFrame) -> pl.DataFrame:
    """``*_cost`` (> 0 unsafe): from ``is_safe`` labels where present, else prompt harm × compliance.

    ``2·harm·(1 − refusal) − 1`` is +1 for full compliance with a surely harmful prompt, −1 for a
    refusal or for any answer to a benign prompt, and crosses 0 where harm × compliance = 0.5.
    """
    harm = pl.col("harm_score")

    def estimate(column: str) -> pl.Expr:
        return (2 * harm * (1 - pl.col(f"{column}_refusal")) - 1).cast(pl.Float32)

    labelled = pl.when(pl.col("is_safe")).then(pl.lit(-1.0)).otherwise(pl.lit(1.0)).cast(pl.Float32)
    return frame.with_columns(
        chosen_cost=estimate("chosen"),
        rejected_cost=estimate("rejected"),
        response_cost=pl.when(pl.col("is_safe").is_not_null()).then(labelled).otherwise(estimate("response")),
    )


def score_spans(frame: pl.DataFrame) -> pl.DataFrame:
    """AMA key segments for chosen and rejected answers (one call over both)."""
    from curation.segments import pair_span_columns

    return frame.with_columns(*pair_span_columns(frame["harm_score"].to_list(), frame["chosen"].to_list(),
                                                 frame["rejected"].to_list()))


def text_for_embedding(prompt: str) -> str:
    """What the encoder sees of a prompt: the user's turns of a multi-turn transcript.

    The assistant's earlier turns say little about the request's risk and would push the user's
    words past the encoder's token limit.
    """
    if not prompt.startswith("Human:"):
        return prompt
    turns = [t for t in prompt.split("\n\n") if t.startswith("Human:")]
    return " ".join(t[len("Human:"):].strip() for t in turns) or prompt


def score_batch(rows: list[RawRow], embed: Callable[[list[str]], np.ndarray],
                categoriser) -> tuple[pl.DataFrame, np.ndarray]:
    """All per-row columns of the contract except ``cluster`` and ``split``, plus the prompt embeddings."""
    embeddings = embed(prompt_texts(rows))
    return score_rows(rows, embeddings, categoriser), embeddings


def prompt_texts(rows: list[RawRow]) -> list[str]:
    """What the encoder embeds, one text per row."""
    return [text_for_embedding(r.prompt) for r in rows]


def score_rows(rows: list[RawRow], embeddings: np.ndarray, categoriser) -> pl.DataFrame:
    """:func:`score_batch` once the prompt embeddings are known (the pipeline computes them ahead)."""
    from curation.categorise import categorise

    frame = rows_to_frame(rows)
    frame = categorise(frame, embeddings, categoriser)
    frame = score_refusals(frame)
    frame = score_costs(frame)
    return score_spans(frame)


def stage_batch(rows: list[RawRow], embed: Callable[[list[str]], np.ndarray], categoriser,
                eval_fraction: float) -> tuple[pl.DataFrame, np.ndarray]:
    """One batch's staged rows (:func:`score_batch` plus ``split``) and its float16 prompt embeddings."""
    return stage_rows(rows, embed(prompt_texts(rows)), categoriser, eval_fraction)


def stage_rows(rows: list[RawRow], embeddings: np.ndarray, categoriser,
               eval_fraction: float) -> tuple[pl.DataFrame, np.ndarray]:
    """:func:`stage_batch` once the prompt embeddings are known.

    Everything downstream sees the embeddings as stored, in float16: the categoriser included, so a run that
    takes them from the embedding cache (float16) writes the same mix as one that encodes them afresh.
    """
    from curation.mixer import eval_split

    stored = np.asarray(embeddings).astype(np.float16)
    frame = score_rows(rows, stored.astype(np.float32), categoriser)
    frame = frame.with_columns(pl.Series("split", eval_split(frame["id"].to_list(), eval_fraction)))
    return frame, stored


def batch_meta(frame: pl.DataFrame, start: int) -> pl.DataFrame:
    """The slim metadata the mixer needs for one staged batch whose first row is pool row ``start``."""
    from curation.mixer import prompt_key

    return frame.select(pl.int_range(start, start + frame.height, dtype=pl.Int64).alias("idx"),
                        prompt_key(pl.col("prompt"), pl.col("image")).alias("prompt_key"), "kind", "group",
                        "response_cost")


def take_rows(batch: list[RawRow | Reject], rejects) -> list[RawRow]:
    """The usable rows of a reader batch; its rejects are written, one JSON line each, to ``rejects``."""
    for item in batch:
        if isinstance(item, Reject):
            rejects.write(item.to_json() + "\n")
    return [item for item in batch if isinstance(item, RawRow)]


# --------------------------------------------------------------------------------------------------
# I/O objects
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


def _batched(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------

def curate(config: CurateConfig, embedder=None, categoriser=None) -> CurateResult:
    """Run the whole curation stage for ``config``; returns the written mix's manifest."""
    from curation.cluster import choose_k, fit_assign_clusters
    from curation.mixer import select_mixture

    clock = _Laps()
    check_writable(config.out, config.overwrite, _read_paths(config))  # before the models' load, not after it
    files = input_files(config)
    given_embedder = embedder
    embedder, categoriser = load_models(config, embedder, categoriser)
    clock.lap("load_models")
    # A Ray run is not resumed: its actors score the whole input again.
    fingerprint = run_fingerprint(config, embedder, files) if config.resume and config.engine == "local" else None
    with resumable_directory(config.out, fingerprint, overwrite=config.overwrite, inputs=_read_paths(config)) as run:
        work = run.path
        if config.engine == "ray":
            from curation.engine_ray import read_and_score_ray

            scored = read_and_score_ray(config, work, embedder, categoriser)
        else:
            scored = read_and_score(config, work, embedder, categoriser, resume=run.resumed,
                                    given_embedder=given_embedder)
        clock.lap("read_and_score")
        k = min(config.clusters or choose_k(scored.n_rows), max(scored.n_rows, 1))
        clusters = fit_assign_clusters(scored.embeddings, k, config.seed)
        clock.lap("cluster")
        for leftover in (POOL_DIR, DATA_DIR):  # from an interrupted run that got past pass 1
            shutil.rmtree(work / leftover, ignore_errors=True)
        pool_files = write_pool(scored.stage_files, clusters, work / POOL_DIR, config)
        clock.lap("write_pool")
        meta = scored.meta.with_columns(pl.Series("cluster", clusters, pl.Int32))
        selection = select_mixture(meta, scored.embeddings, ratios=config.ratios, size=config.size,
                                   benign_share=config.benign_share, dup_threshold=config.dup_threshold,
                                   seed=config.seed)
        scored.embeddings = None  # the largest thing held, and no longer needed
        mixture = build_mixture_rows(scored.stage_files, selection.mixture, config.eval_fraction)
        data_files = write_mixture(work / DATA_DIR, mixture, config.shard_rows)
        scored.remove_stage()
        unchanged_since_start(files)
        clock.lap("mix")
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "equi_version": equi_version(),
            "created_at": utc_now(),
            "config": config.to_dict(),
            "config_hash": _config_hash(config),
            "embedder": embedder.name,
            "categoriser": config.categoriser or "bundled",
            "clusters": int(k),
            "inputs": [{"path": name, "sha256": files[name]["sha256"] if name in files else None, "lines": lines}
                       for name, lines in scored.stats.lines_by_file.items()],
            "shards": [shard_entry(work, p, rows, "pool") for p, rows, _ in pool_files]
            + [shard_entry(work, p, rows, split, group) for p, rows, (split, group) in data_files],
            "counts": {"pool": _count(meta["group"].to_list()), "mixture": _count_by_split(mixture)},
            "ratios": {"requested": config.ratios, "effective": selection.effective_ratios},
            "accounting": {
                "input_lines": sum(scored.stats.lines_by_file.values()),
                "pooled": scored.n_rows,
                "rejected": scored.n_rejected,
                # A pair of single responses uses two pool rows.
                "mixed": selection.mixture.height + int(selection.mixture["rejected_idx"].is_not_null().sum()),
                "mixture_rows": mixture.height,
                "not_selected": selection.reason_counts(),
            },
            "warnings": selection.warnings + ([] if mixture.height else
                                              ["the mixture is empty: no usable preference pairs in the input"]),
            # Wall-clock seconds per phase (manifest and card writing excluded); read_and_score includes encoding.
            "timings_s": clock.laps,
        }
        # Card first, then the manifest with the card's and rejects' sha256 (the card never needs the manifest's).
        from equi.manifest import file_checksums

        (work / CARD).write_text(_render_card(manifest), encoding="utf-8")
        manifest["files"] = file_checksums(work, [CARD, REJECTS])
        write_json_atomic(work / MANIFEST, manifest)
    return CurateResult(out=Path(config.out), manifest=manifest, warnings=manifest["warnings"],
                        resumed_batches=scored.resumed_batches)


def load_models(config: CurateConfig, embedder=None, categoriser=None):
    """The embedder (behind the embedding cache) and a categoriser fit for its embedding size."""
    from curation.categorise import Categoriser
    from curation.embed import STATIC_EMBEDDER, EmbedderError, get_embedder
    from equi.progress import quiet_transformers

    if embedder is None:  # the static embedder does not import transformers: nothing to silence
        with quiet_transformers(config.quiet and config.embedder != STATIC_EMBEDDER):
            embedder = get_embedder(config.embedder)
    if config.embedding_cache:
        from curation.embed_cache import CachedEmbedder, EmbeddingCache

        embedder = CachedEmbedder(embedder, EmbeddingCache(getattr(embedder, "identity", embedder.name), embedder.dim))
    if categoriser is None:
        try:
            categoriser = Categoriser.load(config.categoriser) if config.categoriser else Categoriser.load_default()
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot load categoriser {config.categoriser}: {exc}") from None
    if categoriser.embedding_dim != embedder.dim:
        raise EmbedderError(
            f"the categoriser was fit on {categoriser.embedding_dim}-dimensional embeddings "
            f"({categoriser.embedder or 'unknown embedder'}) but --embedder {embedder.name} gives {embedder.dim}: "
            f"fit one with `equi fit-categoriser LABELLED.jsonl --embedder {embedder.name} --out cat.json` and pass "
            "--categoriser cat.json")
    return embedder, categoriser


#: Config fields that do not change what a run writes.
_NOT_OUTPUT_DEFINING = ("out", "overwrite", "quiet", "resume", "engine", "ray_address", "workers")


def _config_hash(config: CurateConfig) -> str:
    return config_hash({k: v for k, v in config.to_dict().items() if k not in _NOT_OUTPUT_DEFINING})


def _read_paths(config: CurateConfig) -> list[str]:
    """Every file the run reads: the inputs (``-`` for stdin) and a given categoriser."""
    return list(config.inputs) + ([config.categoriser] if config.categoriser else [])


def input_files(config: CurateConfig) -> dict[str, dict]:
    """Every file the run reads (not stdin), as given → its sha256, size and modification time, taken once at
    the start: the resume fingerprint and the manifest record these, and :func:`unchanged_since_start` checks
    at the end that no file changed while it was read (its checksum would then describe another file)."""
    files = {}
    for name in _read_paths(config):
        if name != "-":
            stat = Path(name).stat()
            files[name] = {"sha256": sha256_file(name), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return files


def unchanged_since_start(files: dict[str, dict]) -> None:
    for name, seen in files.items():
        stat = Path(name).stat()
        if (stat.st_size, stat.st_mtime_ns) != (seen["size"], seen["mtime_ns"]):
            raise InputError(f"{name} changed while it was being curated; run again once it is complete "
                             "(nothing was written)")


def run_fingerprint(config: CurateConfig, embedder, files: dict[str, dict]) -> dict | None:
    """What an interrupted run must share with this one to be resumed; ``None`` (never resume) for stdin.

    Inputs are identified by content (sha256): an input edited in place with its size and time kept must not
    reuse the batches staged from its old content.
    """
    if "-" in config.inputs:
        return None
    return {
        "equi_version": equi_version(),
        "config_hash": _config_hash(config),
        "embedder": getattr(embedder, "identity", embedder.name),
        "files": [{"path": str(Path(name).resolve()), "sha256": files[name]["sha256"]} for name in files],
    }


@dataclass
class ScoredInput:
    """What the first pass leaves: staged rows on disk, and in memory only embeddings and slim metadata."""

    stage_dir: Path
    stage_files: list
    embeddings: np.ndarray | None  # float16, one row per pooled row (dropped once the mixture is chosen)
    meta: pl.DataFrame  # idx, prompt_key, kind, group, response_cost
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
                                     "response_cost": pl.Float32}))
        matrix = np.empty((meta.height, dim), dtype=np.float16)
        filled = 0
        for part in embeddings:
            matrix[filled:filled + len(part)] = part
            filled += len(part)
        if filled != meta.height:
            raise RuntimeError(f"pass 1 staged {meta.height} rows but {filled} embeddings")
        return cls(stage_dir, stage_files, matrix, meta, meta.height, n_rejected, stats)

    def remove_stage(self) -> None:
        shutil.rmtree(self.stage_dir)


def read_and_score(config: CurateConfig, work: Path, embedder, categoriser, resume: bool = False,
                   given_embedder=None) -> ScoredInput:
    """Pass 1: stream the inputs in batches; rejects go to ``rejects.jsonl``, scored rows to staged Parquet.

    Each batch of ``batch_size`` input lines is staged as its own pair of files (rows as Parquet, prompt
    embeddings as ``.npy``), each renamed into place when whole; the Parquet file is written last and marks
    the batch done. With ``resume``, done batches are read back instead of scored again: reading the input
    is cheap next to scoring it, so every line is read again (rejects and counts come out the same) and
    the batch boundaries, hence every later step, are exactly those of an uninterrupted run.

    With ``config.workers`` > 1 whole batches (parse, embed, score, stage) run in worker processes; this
    process only reads lines and collects the results in input order, so the output is the same. Each worker
    loads ``config.embedder`` itself, or is sent ``given_embedder`` (one the caller passed to :func:`curate`).
    """
    from tqdm.auto import tqdm

    stats = ReadStats()
    stage_dir = work / ".stage"
    stage_dir.mkdir(exist_ok=True)
    stage_files: list[tuple[Path, int, None]] = []
    meta_parts: list[pl.DataFrame] = []
    n_rows = n_rejected = resumed = 0
    if config.workers > 1:
        batches = _score_in_workers(config, stage_dir, stats, given_embedder, categoriser, resume)
    else:
        batches = _score_here(config, stage_dir, stats, embedder, categoriser, resume)
    # closing: an error or Ctrl-C here stops the workers before the run's directory is cleaned up.
    with closing(batches), open(work / REJECTS, "w", encoding="utf-8") as rejects, \
            tqdm(desc="curate: read+score", unit=" lines", disable=config.quiet, file=sys.stderr) as bar:
        for batch in batches:
            for reject in batch.rejects:
                rejects.write(reject.to_json() + "\n")
            n_rejected += len(batch.rejects)
            if batch.meta is not None:
                stage_files.append((batch.path, batch.meta.height, None))
                meta_parts.append(batch_meta(batch.meta, n_rows))
                n_rows += batch.meta.height
                resumed += batch.resumed
            bar.update(batch.lines)
    # The embeddings come back from the staged files once pass 1 is over, into heap the encoder no longer uses.
    release_free_memory()
    embeddings = (np.load(path.with_suffix(".npy"), allow_pickle=False) for path, _, _ in stage_files)
    scored = ScoredInput.assemble(stage_dir, stage_files, embeddings, meta_parts, n_rejected, stats, embedder.dim)
    scored.resumed_batches = resumed
    return scored


def _all_rejected(rejects: Path, n_rejected: int, shown: int = 3) -> str:
    """The error for an input of which no line is usable: a mix of nothing would only fail later (``datasets``
    cannot load an empty pool), so nothing is written and the first few reasons are named instead."""
    import json

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


class _Laps:
    """Wall-clock seconds of consecutive phases, rounded to 0.1 s."""

    def __init__(self):
        import time

        self._now = time.perf_counter
        self._last = self._now()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = self._now()
        self.laps[name] = round(now - self._last, 1)
        self._last = now


def release_free_memory() -> None:
    """Hand memory that is free but still held by the C heap back to the system (glibc only; else nothing).

    After encoding, the transformer's freed activations stay in the heap (hundreds of MiB for MiniLM) and
    count as this process's resident memory while the next, largest step runs.
    """
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl without malloc_trim, Windows)
        pass


_META_COLUMNS = ("prompt", "image", "kind", "group", "response_cost")


@dataclass
class _Staged:
    """One batch of input lines after pass 1."""

    lines: int  # input lines it holds
    rejects: list[Reject]
    path: Path  # its staged Parquet file (its embeddings are beside it, in the .npy file of the same name)
    meta: pl.DataFrame | None = None  # the staged rows' metadata (_META_COLUMNS); None when it has no usable row
    resumed: bool = False  # read back from an interrupted run

    def read_back(self, n_rows: int) -> bool:
        """Take the batch from an interrupted run's staged files, if that run finished it."""
        self.meta = _staged_batch(self.path, n_rows)
        self.resumed = self.meta is not None
        return self.resumed

    def stage(self, rows: list[RawRow], vecs: np.ndarray, categoriser, eval_fraction: float) -> None:
        """Score the batch and stage it on disk (:func:`stage_to_disk`)."""
        self.meta = stage_to_disk(rows, vecs, self.path, categoriser, eval_fraction)


def _score_here(config: CurateConfig, stage_dir: Path, stats: ReadStats, embedder, categoriser,
                resume: bool) -> Iterator[_Staged]:
    """Pass 1 in this process: each batch is embedded, then scored by the heuristics.

    An encoder that leaves cores idle (the static one, a GPU) embeds batch n+1 in a thread while the heuristics
    score batch n. One that spreads over every core itself (torch on the CPU) is not given a neighbour: with
    the heuristics beside it on two cores it ran ~10% slower, more than the heuristics' own time (about 5% of
    the encoder's), because each of its parallel steps waits for the thread that shares a core with them.
    """
    from curation.embed import fills_every_core

    rows = read_rows(config.inputs, config.input_format, config.strict, stats, config.max_line_bytes)
    batches = enumerate(_batched(rows, config.batch_size))
    with (_InlineExecutor() if fills_every_core(embedder) else ThreadPoolExecutor(1)) as encoder:

        def start(item: tuple[int, list]) -> tuple[_Staged, list[RawRow], Future | None]:
            number, batch = item
            rows = [x for x in batch if isinstance(x, RawRow)]
            staged = _Staged(len(batch), [x for x in batch if isinstance(x, Reject)],
                             stage_dir / f"batch-{number:06d}.parquet")
            done = bool(rows) and resume and staged.read_back(len(rows))
            embedding = encoder.submit(embedder.encode, prompt_texts(rows)) if rows and not done else None
            return staged, rows, embedding

        for staged, rows, embedding in _one_ahead(batches, start):
            if embedding is not None:
                staged.stage(rows, embedding.result(), categoriser, config.eval_fraction)
            yield staged


class _InlineExecutor(Executor):
    """An executor that runs each call at once, in the caller's thread."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


def _one_ahead(items: Iterable, start: Callable) -> Iterator:
    """``start(item)`` for each item, one item ahead of the consumer (so a threaded encoder embeds batch n+1
    while the consumer scores batch n)."""
    previous = None
    for item in items:
        current = start(item)
        if previous is not None:
            yield previous
        previous = current
    if previous is not None:
        yield previous


def stage_to_disk(rows: list[RawRow], vecs: np.ndarray, path: Path, categoriser, eval_fraction: float) -> pl.DataFrame:
    """Score one batch and stage it at ``path`` (embeddings first, the Parquet file last, each renamed into
    place); returns the metadata columns a resumed run reads back."""
    frame, vecs = stage_rows(rows, vecs, categoriser, eval_fraction)
    _write_atomic(path.with_suffix(".npy"), lambda tmp: _save_npy(tmp, vecs))
    _write_atomic(path, lambda tmp: pq.write_table(to_table(frame, _STAGE_SCHEMA), tmp, compression="zstd"))
    return frame.select(_META_COLUMNS)


def _score_in_workers(config: CurateConfig, stage_dir: Path, stats: ReadStats, given_embedder, categoriser,
                      resume: bool) -> Iterator[_Staged]:
    """Pass 1 in ``config.workers`` processes, each with its own encoder (one torch thread per core it gets).

    This process reads raw lines and hands each batch out whole: workers parse, embed, score and stage it.
    Results come back in input order, so the output does not depend on the number of workers. Workers are
    spawned, not forked (polars and torch threads do not survive a fork), and ignore Ctrl-C: this process
    stops them.
    """
    import multiprocessing

    from curation.embed import usable_cores

    batches = enumerate(_batched(read_lines(config.inputs, config.strict, stats, config.max_line_bytes),
                                 config.batch_size))
    threads = max(1, usable_cores() // config.workers)
    pending: deque[Future] = deque()
    with ProcessPoolExecutor(config.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                             initargs=(config, given_embedder, categoriser, threads)) as pool:
        try:
            for number, lines in batches:
                pending.append(pool.submit(_stage_lines, lines, stage_dir / f"batch-{number:06d}.parquet", resume))
                while len(pending) > 2 * config.workers:  # keep every worker busy while this one collects
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


_WORKER: dict = {}


def _init_worker(config: CurateConfig, embedder, categoriser, threads: int) -> None:
    import signal
    import threading

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    _WORKER["embedder"], _WORKER["categoriser"] = load_models(config, embedder, categoriser)
    if "torch" in sys.modules:  # a transformer encoder: one thread per core this worker gets (the static one has no torch)
        sys.modules["torch"].set_num_threads(threads)
    _WORKER["config"] = config


def _exit_with_parent(parent: int) -> None:
    """A worker whose parent was killed (``kill -9``, out of memory) exits instead of waiting forever on its queue
    (and holding the parent's stdout open)."""
    import time

    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _stage_lines(lines: list, path: Path, resume: bool) -> _Staged:
    """A worker's whole batch: parse the lines, then read back the staged batch or embed, score and stage it."""
    config = _WORKER["config"]
    items = list(parse_lines(lines, config.input_format, config.strict))
    rows = [x for x in items if isinstance(x, RawRow)]
    staged = _Staged(len(lines), [x for x in items if isinstance(x, Reject)], path)
    if rows:
        if not (resume and staged.read_back(len(rows))):
            staged.stage(rows, _WORKER["embedder"].encode(prompt_texts(rows)), _WORKER["categoriser"],
                         config.eval_fraction)
    return staged


def _staged_batch(path: Path, expected_rows: int) -> pl.DataFrame | None:
    """A batch an earlier run finished: its metadata (its embeddings stay on disk), or ``None`` to score it again.

    A staged file that cannot be read whole (cut short by a power loss or a full disk) is removed and its batch
    scored again; it never costs the other batches' work.
    """
    vectors_path = path.with_suffix(".npy")
    if not (path.is_file() and vectors_path.is_file()):
        return None
    try:
        frame = pl.read_parquet(path, columns=list(_META_COLUMNS))
        pq.ParquetFile(path).read()  # every column decodes (the footer alone can survive a cut)
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


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:  # a handle: np.save would append ".npy" to a path's name
        np.save(handle, array, allow_pickle=False)


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write beside ``path``, flush it to the disk, then rename it into place (and flush the rename): a staged
    batch that exists survives a power loss whole."""
    # The pid keeps two writers apart (a worker orphaned by a killed run may still finish its batch).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_pool(stage_files: list, clusters: np.ndarray, folder: Path, config: CurateConfig) -> list:
    """Pass 2: stream the staged rows into the pool shards, adding the ``cluster`` column."""
    pool = ShardWriter(folder, "pool", POOL_SCHEMA, config.shard_rows)
    offset = 0
    for path, _, _ in stage_files:
        for record_batch in pq.ParquetFile(path).iter_batches(batch_size=config.batch_size):
            frame = pl.from_arrow(record_batch)
            frame = frame.with_columns(pl.Series("cluster", clusters[offset:offset + frame.height], pl.Int32))
            offset += frame.height
            pool.write(to_table(frame, POOL_SCHEMA))
    return pool.close()


def _render_card(manifest: dict) -> str:
    from curation.card import render_card

    return render_card(manifest)


def _count(groups: list[str]) -> dict[str, int]:
    return {g: groups.count(g) for g in GROUPS if g in groups}


def _count_by_split(mixture: pl.DataFrame) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for group, split, n in mixture.group_by(["group", "split"]).len().iter_rows() if mixture.height else []:
        counts.setdefault(group, {})[split] = n
    return counts


# Staged rows: the pool's columns before clustering, plus (not contract columns) the prompt's harm
# probability that the mixer needs to score the spans of single responses it pairs, and the row kind
# (pair, single, prompt) that a resumed run reads back.
_STAGE_SCHEMA = pa.schema([f for f in POOL_SCHEMA if f.name != "cluster"]
                          + [pa.field("harm_score", pa.float32()), pa.field("kind", pa.string())])


def build_mixture_rows(stage_files: list, selected: pl.DataFrame, eval_fraction: float) -> pl.DataFrame:
    """Full mixture rows for the selection: native pairs copied, single responses joined into pairs."""
    from curation.mixer import eval_split
    from curation.segments import pair_span_columns

    if selected.height == 0:
        return pl.DataFrame(schema=pl.from_arrow(MIX_SCHEMA.empty_table()).schema)
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
    columns = [c for c in MIX_SCHEMA.names if c not in ("split",)]
    mixture = pl.concat([native.select(columns), single.select(columns)] if single.height else
                        [native.select(columns)]).sort("rank")
    return mixture.with_columns(pl.Series("split", eval_split(mixture["id"].to_list(), eval_fraction)))


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


def write_mixture(folder: Path, mixture: pl.DataFrame, rows_per_shard: int) -> list:
    """One group per shard (so the card can offer a config per group), rows in rank order."""
    written = []
    for split in ("train", "eval"):
        part = mixture.filter(pl.col("split") == split)
        if part.height == 0:
            continue
        writer = ShardWriter(folder, split, MIX_SCHEMA, rows_per_shard)
        for group in GROUPS:
            rows = part.filter(pl.col("group") == group)
            if rows.height:
                writer.write(to_table(rows, MIX_SCHEMA), group=group, new_shard=True)
        written += [(p, rows, (split, g)) for p, rows, g in writer.close()]
    return written
