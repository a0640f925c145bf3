"""``equi curate --engine ray``: the first pass (read + score) on Ray Data, the rest of the stage unchanged.

What runs where:

* **Driver** (the ``equi curate`` process): streams the inputs through the same line reader as the local
  engine (:func:`curation.readers.read_rows`), in the same batches of ``config.batch_size`` lines. It keeps the
  rejects accounting and line numbers, writes ``rejects.jsonl``, and puts each batch's usable rows into the
  Ray object store as one Arrow table. Reading JSON is cheap next to scoring, and one reader is what makes
  line numbers and rejects exact.
* **Actors** (a Ray Data ``map_batches`` actor pool, one actor per GPU when the cluster has GPUs, else one
  single-threaded actor per CPU): each holds the embedder and categoriser (a :class:`curation.steps.BatchScorer`,
  as each local worker process does) and runs the local engine's step function
  (:func:`curation.steps.stage_batch`) on one whole reader batch per call, returning the staged rows with their
  float16 prompt embeddings.
* **Driver** again: collects the scored batches in input order (``preserve_order``) into the same staged
  Parquet, embeddings matrix and slim metadata as :func:`curation.engine_local.read_and_score`; clustering,
  mixing and writing then run as for ``--engine local``.

Each reader batch is one Ray block mapped whole (``batch_size=None``), so batch boundaries — and with them
every score and the mix — are those of the local engine. Raw batches are handed over as Arrow object
references rather than ``ray.data.read_parquet`` files because Parquet read tasks re-block their files; the
references need no storage shared between nodes either. The cost: the whole input's usable rows sit in the
object store (Ray spills to local disk beyond its memory) before scoring starts.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from equi.config import ConfigError, CurateConfig
from equi.progress import own_bar_disabled
from equi.schema import MESSAGES_TYPE, REJECTS

from curation.embed import get_embedder
from curation.readers import RawRow, ReadStats, read_rows
from curation.staging import STAGE_SCHEMA, ScoredInput, ShardWriter, batched, save_npy, to_table, write_atomic
from curation.steps import BatchScorer, batch_meta, take_rows

#: Per raw row, the number of rows of its reader batch: lets an actor check it got the whole batch.
BATCH_ROWS = "_reader_batch_rows"
_RAW_TYPES = {"source_line": pa.int64(), "is_safe": pa.bool_(), "prompt_messages": MESSAGES_TYPE}
RAW_SCHEMA = pa.schema([pa.field(f.name, _RAW_TYPES.get(f.name, pa.string())) for f in dataclasses.fields(RawRow)]
                       + [pa.field(BATCH_ROWS, pa.int64())])
#: What a scored block carries besides the staged columns: the float16 prompt embedding.
EMBEDDING = "embedding"


def import_ray():
    """Ray, imported here and nowhere else, or a :class:`ConfigError` saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (the extra may be Ray core without Data)
    except ImportError:
        raise ConfigError("--engine ray needs Ray Data: pip install 'equi[ray]'") from None
    return ray


def read_and_score_ray(config: CurateConfig, work: Path, embedder, categoriser) -> ScoredInput:
    """Pass 1 on Ray: what :func:`curation.engine_local.read_and_score` returns, scored by a Ray actor pool.

    The actors build their own embedder from ``config.embedder`` (and embedding cache, per node); the
    ``embedder`` given here only supplies the embedding size. ``categoriser`` is shipped to the actors.
    """
    ray = import_ray()
    started = connect(ray, config)
    try:
        stats = ReadStats()
        raw_refs, n_rejected = put_batches(ray, config, work, stats)
        scored = score_on_ray(ray, raw_refs, config, categoriser) if raw_refs else []
        stage_dir, stage_files, embeddings, meta_parts = collect(scored, work, embedder.dim, config.batch_size)
        return ScoredInput.assemble(stage_dir, stage_files, embeddings, meta_parts, n_rejected, stats,
                                    embedder.dim)
    finally:
        if started:
            ray.shutdown()


def connect(ray, config: CurateConfig) -> bool:
    """Join ``config.ray_address`` (``None``: ``$RAY_ADDRESS``, else a new local instance) unless Ray is up.

    Returns whether this call started the connection (and so should shut it down).
    """
    if ray.is_initialized():
        return False
    ray.init(address=config.ray_address, log_to_driver=not config.quiet,
             logging_level=logging.WARNING if config.quiet else logging.INFO)
    return True


def put_batches(ray, config: CurateConfig, work: Path, stats: ReadStats) -> tuple[list, int]:
    """Read the inputs in the local engine's batches; rejects to ``rejects.jsonl``, usable rows to Ray.

    Returns one object reference per batch with usable rows (an Arrow table) and the number of rejects.
    """
    from tqdm.auto import tqdm

    refs, n_rejected = [], 0
    with open(work / REJECTS, "w", encoding="utf-8") as rejects, \
            tqdm(desc="curate: read", unit=" lines", disable=own_bar_disabled(config.quiet),
                 file=sys.stderr) as bar:
        parsed = read_rows(config.inputs, config.input_format, config.strict, stats, config.max_line_bytes)
        for batch in batched(parsed, config.batch_size):
            rows = take_rows(batch, rejects)
            n_rejected += len(batch) - len(rows)
            if rows:
                refs.append(ray.put(raw_table(rows)))
            bar.update(len(batch))
    return refs, n_rejected


def raw_table(rows: list[RawRow]) -> pa.Table:
    """One reader batch's usable rows as Arrow, each tagged with the batch's size."""
    records = [dataclasses.asdict(row) | {BATCH_ROWS: len(rows)} for row in rows]
    return pa.Table.from_pylist(records, schema=RAW_SCHEMA)


def raw_rows(table: pa.Table) -> list[RawRow]:
    """The rows of one whole reader batch back from Arrow; refuses a block that is not exactly one batch."""
    sizes = set(table.column(BATCH_ROWS).to_pylist())
    if sizes != {table.num_rows}:
        raise RuntimeError(f"a Ray block of {table.num_rows} rows is not one whole reader batch (sizes {sorted(sizes)}):"
                           " scores would differ from --engine local")
    return [RawRow(**record) for record in table.drop_columns([BATCH_ROWS]).to_pylist()]


class ActorScorer(BatchScorer):
    """A Ray Data actor: the per-process :class:`~curation.steps.BatchScorer` (models loaded once, on the actor's GPU
    when it has one), taking one reader batch per call as an Arrow block and returning it staged."""

    def __init__(self, config: CurateConfig, categoriser, on_gpu: bool):
        super().__init__(config, base_embedder(config.embedder, "cuda" if on_gpu else config.device), categoriser)

    def __call__(self, raw: pa.Table) -> pa.Table:
        frame, vectors = self.stage(raw_rows(raw))
        return to_table(frame, STAGE_SCHEMA).append_column(EMBEDDING, embedding_column(vectors))


def base_embedder(name: str | None, device: str):
    """The encoder for an actor on ``device`` (its GPU when it has one; the static embedder has no GPU code)."""
    return get_embedder(name, device)


def embedding_column(vectors: np.ndarray) -> pa.FixedSizeListArray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float16)
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])


def actor_pool(resources: dict) -> tuple[int, dict]:
    """Actor-pool size and per-actor resources: one actor per GPU when there are GPUs, else one per CPU.

    A CPU actor gets one CPU, so Ray gives it one torch thread (``OMP_NUM_THREADS=1``).
    """
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return gpus, {"num_gpus": 1}
    return max(1, int(resources.get("CPU", 1))), {"num_cpus": 1}


def score_on_ray(ray, raw_refs: list, config: CurateConfig, categoriser):
    """The scored blocks: each raw block (one reader batch) mapped whole by the actor pool, in input order."""
    size, per_actor = actor_pool(ray.cluster_resources())
    scored = ray.data.from_arrow_refs(raw_refs).map_batches(
        ActorScorer, batch_size=None, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=size),
        fn_constructor_args=(config, categoriser, "num_gpus" in per_actor), **per_actor)
    scored.context.execution_options.preserve_order = True
    scored.context.enable_progress_bars = not config.quiet
    if config.quiet:
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    return scored.iter_batches(batch_size=None, batch_format="pyarrow")


def collect(scored_blocks, work: Path, dim: int,
            rows_per_file: int) -> tuple[Path, list, Iterator[np.ndarray], list[pl.DataFrame]]:
    """Write the scored blocks, in order, into staged Parquet files of ``rows_per_file`` rows and their embeddings
    into one ``.npy`` file each (as the local engine stages them); keep only the slim metadata in memory. The
    mixture's rows are later gathered one staged file at a time, so no file may hold the whole input.

    Returns the embeddings as a generator that reads the files back one at a time, so filling the matrix
    never holds it and every block's vectors at once.
    """
    stage_dir = work / ".stage"
    stage = ShardWriter(stage_dir, "stage", STAGE_SCHEMA, rows_per_shard=rows_per_file)
    vector_files, meta_parts, n_rows = [], [], 0
    for number, block in enumerate(scored_blocks):
        table = block.select(STAGE_SCHEMA.names).cast(STAGE_SCHEMA)
        stage.write(table)
        vectors = block.column(EMBEDDING).combine_chunks().flatten().to_numpy().reshape(-1, dim)
        vector_files.append(stage_dir / f"embeddings-{number:06d}.npy")
        write_atomic(vector_files[-1], lambda tmp: save_npy(tmp, vectors))
        meta_parts.append(batch_meta(pl.from_arrow(table), n_rows))
        n_rows += table.num_rows
    embeddings = (np.load(path, allow_pickle=False) for path in vector_files)
    return stage_dir, stage.close(), embeddings, meta_parts
