"""The embedding cache: a second pass embeds only new texts and returns the same vectors."""

from __future__ import annotations

import numpy as np

from curation.embed import get_embedder
from curation.embed_cache import CachedEmbedder, EmbeddingCache
from tests.realdata import xstest_prompts


def test_second_pass_hits_the_cache_and_returns_identical_vectors(shared_data, tmp_path):
    texts = [r["prompt"] for r in xstest_prompts(shared_data)[:40]]
    base = get_embedder()
    first = CachedEmbedder(base, EmbeddingCache(base.identity, base.dim, root=tmp_path))
    a = first.encode(texts[:30])
    assert (first.hits, first.misses) == (0, 30)
    second = CachedEmbedder(base, EmbeddingCache(base.identity, base.dim, root=tmp_path))
    b = second.encode(texts)  # 30 seen + 10 new
    assert (second.hits, second.misses) == (30, 10)
    np.testing.assert_array_equal(a, b[:30])
    fresh = base.encode(texts[30:])
    np.testing.assert_allclose(b[30:], fresh, atol=1e-3)  # float16 storage


def test_caches_of_different_embedders_do_not_mix(tmp_path):
    one = EmbeddingCache("model-a", 4, root=tmp_path)
    two = EmbeddingCache("model-b", 4, root=tmp_path)
    one.put(["x"], np.ones((1, 4)))
    _, hit = two.get(["x"])
    assert not hit.any() and one.get(["x"])[1].all()
