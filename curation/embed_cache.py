"""A persistent embedding cache keyed by (embedder, text hash).

Re-running ``equi curate`` on the same or a grown input embeds only texts it has not seen. The
cache is a SQLite file per embedder under the user's cache directory (``$EQUI_CACHE`` or
``~/.cache/equi``); vectors are stored as float16.
"""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path
from typing import Sequence

import numpy as np

from equi.cache import cache_dir


def _key(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()[:16]


class EmbeddingCache:
    """``get``/``put`` float vectors by text for one embedder identity."""

    def __init__(self, identity: str, dim: int, root: Path | None = None):
        folder = (root or cache_dir()) / "embeddings"
        folder.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256(f"{identity}|{dim}".encode()).hexdigest()[:16]
        self.path = folder / f"{name}.sqlite"
        self.dim = dim
        # The pipeline encodes in a worker thread (one at a time), not the thread that opened the cache; with
        # --workers several processes share the file, so a writer waits for another's lock instead of failing.
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=120)
        self._db.execute("CREATE TABLE IF NOT EXISTS vectors (key BLOB PRIMARY KEY, vec BLOB NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (identity TEXT)")

    def get(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Vectors for ``texts`` (zeros where missing) and a boolean mask of which were found."""
        keys = [_key(t) for t in texts]
        found: dict[bytes, bytes] = {}
        for start in range(0, len(keys), 500):  # SQLite's bound-parameter limit
            chunk = keys[start:start + 500]
            rows = self._db.execute(f"SELECT key, vec FROM vectors WHERE key IN ({','.join('?' * len(chunk))})",
                                    chunk).fetchall()
            found.update(rows)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        hit = np.zeros(len(texts), dtype=bool)
        for i, key in enumerate(keys):
            blob = found.get(key)
            if blob is not None:
                out[i] = np.frombuffer(blob, dtype=np.float16)
                hit[i] = True
        return out, hit

    def put(self, texts: Sequence[str], vectors: np.ndarray) -> None:
        rows = [(_key(t), np.asarray(v, dtype=np.float16).tobytes()) for t, v in zip(texts, vectors)]
        with self._db:
            self._db.executemany("INSERT OR IGNORE INTO vectors (key, vec) VALUES (?, ?)", rows)

    def close(self) -> None:
        self._db.close()


class CachedEmbedder:
    """Wraps an embedder: cached texts are looked up, the rest encoded once and stored.

    Vectors round-trip through float16, so cached and fresh runs give identical results.
    """

    def __init__(self, embedder, cache: EmbeddingCache):
        self.embedder, self.cache = embedder, cache
        self.name, self.dim = embedder.name, embedder.dim
        self.identity = getattr(embedder, "identity", embedder.name)
        self.hits = self.misses = 0

    @property
    def fills_every_core(self) -> bool:
        from curation.embed import fills_every_core

        return fills_every_core(self.embedder)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        vectors, hit = self.cache.get(texts)
        missing = np.flatnonzero(~hit)
        if len(missing):
            unique = list(dict.fromkeys(texts[i] for i in missing))
            fresh = self.embedder.encode(unique).astype(np.float16)
            self.cache.put(unique, fresh)
            lookup = dict(zip(unique, fresh))
            for i in missing:
                vectors[i] = lookup[texts[i]]
        self.hits += int(hit.sum())
        self.misses += len(missing)
        return vectors
