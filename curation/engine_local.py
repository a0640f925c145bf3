"""``equi curate --engine local``: the first pass (read + score) in this process or in worker processes.

With ``config.workers`` = 1 each batch is embedded and scored here (:func:`_score_here`); with more, whole
batches (parse, embed, score, stage) run in spawned worker processes, each holding its own
:class:`curation.steps.BatchScorer` (:func:`_score_in_workers`). Either way the batches are staged by
:mod:`curation.staging` and collected here in input order into a :class:`curation.staging.ScoredInput`, as
:mod:`curation.engine_ray` does on Ray.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from contextlib import closing
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from equi.config import CurateConfig
from equi.progress import own_bar_disabled
from equi.schema import REJECTS

from curation.embed import fills_every_core, usable_cores
from curation.readers import RawRow, ReadStats, Reject, parse_lines, read_lines, read_rows
from curation.staging import ScoredInput, batched, read_staged_batch, write_staged_batch
from curation.steps import BatchScorer, batch_meta, configured_labellers, prompt_texts, stage_rows


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
    loads ``config.embedder`` itself, or is sent ``given_embedder`` (one the caller passed to ``curate``).
    """
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
            tqdm(desc="curate: read+score", unit=" lines", disable=own_bar_disabled(config.quiet),
                 file=sys.stderr) as bar:
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


def release_free_memory() -> None:
    """Hand memory that is free but still held by the C heap back to the system (glibc only; else nothing).

    After encoding, the transformer's freed activations stay in the heap (hundreds of MiB for MiniLM) and
    count as this process's resident memory while the next, largest step runs.
    """
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl without malloc_trim, Windows)
        pass


@dataclass
class _Staged:
    """One batch of input lines after pass 1."""

    lines: int  # input lines it holds
    rejects: list[Reject]
    path: Path  # its staged Parquet file (its embeddings are beside it, in the .npy file of the same name)
    meta: pl.DataFrame | None = None  # the staged rows' metadata (META_COLUMNS); None when it has no usable row
    resumed: bool = False  # read back from an interrupted run

    def read_back(self, n_rows: int) -> bool:
        """Take the batch from an interrupted run's staged files, if that run finished it."""
        self.meta = read_staged_batch(self.path, n_rows)
        self.resumed = self.meta is not None
        return self.resumed

    def write(self, frame: pl.DataFrame, vectors: np.ndarray) -> None:
        """Stage the scored batch on disk (:func:`curation.staging.write_staged_batch`)."""
        self.meta = write_staged_batch(self.path, frame, vectors)


def _score_here(config: CurateConfig, stage_dir: Path, stats: ReadStats, embedder, categoriser,
                resume: bool) -> Iterator[_Staged]:
    """Pass 1 in this process: each batch is embedded, then scored by the heuristics.

    An encoder that leaves cores idle (the static one, a GPU) embeds batch n+1 in a thread while the heuristics
    score batch n. One that spreads over every core itself (torch on the CPU) is not given a neighbour: with
    the heuristics beside it on two cores it ran ~10% slower, more than the heuristics' own time (about 5% of
    the encoder's), because each of its parallel steps waits for the thread that shares a core with them.
    """
    rows = read_rows(config.inputs, config.input_format, config.strict, stats, config.max_line_bytes)
    batches = enumerate(batched(rows, config.batch_size))
    labellers = configured_labellers(config)
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
                staged.write(*stage_rows(rows, embedding.result(), categoriser, config.eval_fraction, labellers))
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


def _score_in_workers(config: CurateConfig, stage_dir: Path, stats: ReadStats, given_embedder, categoriser,
                      resume: bool) -> Iterator[_Staged]:
    """Pass 1 in ``config.workers`` processes, each with its own encoder (one torch thread per core it gets).

    This process reads raw lines and hands each batch out whole: workers parse, embed, score and stage it.
    Results come back in input order, so the output does not depend on the number of workers. Workers are
    spawned, not forked (polars and torch threads do not survive a fork), and ignore Ctrl-C: this process
    stops them.
    """
    batches = enumerate(batched(read_lines(config.inputs, config.strict, stats, config.max_line_bytes),
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


#: A worker process's scorer, set once by :func:`_init_worker` (a pool's initializer can only leave state
#: behind in its process's modules).
_worker_scorer: BatchScorer | None = None


def _init_worker(config: CurateConfig, embedder, categoriser, threads: int) -> None:
    global _worker_scorer

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    _worker_scorer = BatchScorer(config, embedder, categoriser)
    if "torch" in sys.modules:  # a transformer encoder: one thread per core this worker gets (the static one has no torch)
        sys.modules["torch"].set_num_threads(threads)


def _exit_with_parent(parent: int) -> None:
    """A worker whose parent was killed (``kill -9``, out of memory) exits instead of waiting forever on its queue
    (and holding the parent's stdout open)."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _stage_lines(lines: list, path: Path, resume: bool) -> _Staged:
    """A worker's whole batch: parse the lines, then read back the staged batch or embed, score and stage it."""
    config = _worker_scorer.config
    items = list(parse_lines(lines, config.input_format, config.strict))
    rows = [x for x in items if isinstance(x, RawRow)]
    staged = _Staged(len(lines), [x for x in items if isinstance(x, Reject)], path)
    if rows:
        if not (resume and staged.read_back(len(rows))):
            staged.write(*_worker_scorer.stage(rows))
    return staged
