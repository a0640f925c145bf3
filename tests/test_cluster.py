"""Embedding clusters (:mod:`curation.cluster`): identical rows are clustered once, weighted by their count.
Vectors are real: the static embedder's of real AdvBench and XSTest prompts (../shared/data), repeated."""

from __future__ import annotations

import numpy as np
import pytest

from curation import cluster
from curation.cluster import distinct_rows, fit_assign_clusters
from tests.realdata import advbench_rows, xstest_prompts


@pytest.fixture(scope="module")
def vectors(shared_data) -> np.ndarray:
    pytest.importorskip("model2vec")
    from curation.embed import get_embedder

    prompts = [r["prompt"] for r in advbench_rows(shared_data, 200)] + [r["prompt"] for r in xstest_prompts(shared_data)]
    return get_embedder("static").encode(prompts).astype(np.float16)


def test_distinct_rows_are_exact_in_first_seen_order(vectors):
    rng = np.random.default_rng(0)
    rows = vectors[rng.integers(0, len(vectors), 3000)]
    first, inverse, counts = distinct_rows(rows, batch=256)
    assert np.array_equal(rows[first][inverse], rows) and counts.sum() == len(rows)
    assert (np.diff(first) > 0).all() and first[0] == 0  # first occurrences, in order
    assert len(first) == len({r.tobytes() for r in rows})
    assert np.array_equal(counts, np.bincount(inverse))


def test_a_hash_collision_falls_back_to_the_bytes(vectors, monkeypatch):
    rows = np.concatenate([vectors[:50], vectors[:50], vectors[50:60]])
    want = distinct_rows(rows)
    monkeypatch.setattr(cluster, "_row_hashes", lambda e, batch: np.zeros(len(e), dtype=np.uint64))  # all collide
    got = distinct_rows(rows)
    assert all(np.array_equal(a, b) for a, b in zip(got, want)) and len(got[0]) == 60


def test_copies_share_a_cluster_and_duplicates_weigh_like_rows(vectors):
    rng = np.random.default_rng(1)
    picks = rng.integers(0, len(vectors), 4000)
    rows = vectors[picks]
    labels = fit_assign_clusters(rows, 12, seed=0)
    assert labels.dtype == np.int32 and len(set(labels.tolist())) == 12
    for p in np.unique(picks):  # every copy of a row in its row's cluster
        assert len(set(labels[picks == p].tolist())) == 1
    # the fit sees the distinct rows with their counts: duplicating every row changes nothing
    assert np.array_equal(fit_assign_clusters(np.concatenate([rows, rows]), 12, seed=0), np.tile(labels, 2))
    # same input, same clusters
    assert np.array_equal(fit_assign_clusters(rows, 12, seed=0), labels)


def test_k_is_capped_by_the_distinct_rows(vectors):
    rows = np.concatenate([vectors[:3]] * 100)
    labels = fit_assign_clusters(rows, 50, seed=0)
    assert len(set(labels.tolist())) == 3
    assert (fit_assign_clusters(np.repeat(vectors[:1], 10, axis=0), 5, seed=0) == 0).all()
    assert len(fit_assign_clusters(vectors[:0], 5, seed=0)) == 0
