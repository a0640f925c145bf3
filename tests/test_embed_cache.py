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


def test_a_texts_vector_does_not_depend_on_its_neighbours(shared_data):
    """Bit for bit: encoded alone, in other batches, reversed, or beside duplicates (issue 14: a cold cache encodes
    only a batch's misses, so the same text met other neighbours than in a run without a cache)."""
    texts = [r["prompt"] for r in xstest_prompts(shared_data)[:80]]
    embedder = get_embedder()
    together = embedder.encode(texts)
    chunked = np.concatenate([embedder.encode(texts[i:i + 13]) for i in range(0, len(texts), 13)])
    reversed_ = embedder.encode(texts[::-1])[::-1]
    with_duplicates = embedder.encode(texts[:5] + texts)[5:]
    alone = np.stack([embedder.encode([t])[0] for t in texts[:8]])
    for other in (chunked, reversed_, with_duplicates):
        np.testing.assert_array_equal(together, other)
    np.testing.assert_array_equal(together[:8], alone)
    # still the model's own embedding (sentence-transformers pads to the batch's longest text instead)
    plain = embedder.model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(together, plain, atol=1e-5)


def test_the_cache_key_follows_the_weights_not_the_path(tmp_path):
    """New weights saved at the same path get another identity, so a cache never returns their old vectors."""
    import shutil

    import torch

    from curation.embed import Embedder, bundled_minilm_path

    folder = tmp_path / "encoder"
    shutil.copytree(bundled_minilm_path(), folder)
    before = Embedder(str(folder))
    with torch.no_grad():
        next(before.model.parameters()).add_(1e-3)
    before.model.save(str(folder))
    after = Embedder(str(folder))
    assert before.name == after.name and before.identity != after.identity
    assert Embedder(str(folder)).identity == after.identity  # stable for the same weights
