"""Refusal detector: API contract, real-data accuracy on rows the scoring head never saw, refit round trip."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from curation import refusal
from curation.refusal import (
    CLASSES,
    FEATURE_NAMES,
    RefusalHeads,
    classify_responses,
    fit_refusal_head,
    refusal_features,
    refusal_scores,
    xstest_labelled,
)
from tests.realdata import real_texts

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
XSTEST = DATA / "xstest_completions_dev"
REFUSAL_DIRECTION = DATA / "refusal_direction_completions"


def _refusal_direction(set_name: str) -> tuple[list[str], np.ndarray]:
    """Real completions of five models with automatic (substring-match) labels."""
    texts, refuses = [], []
    for path in sorted(REFUSAL_DIRECTION.glob(f"*/{set_name}_evaluations.json")):
        for row in json.loads(path.read_text())["completions"]:
            texts.append(row["response"])
            refuses.append(row["is_jailbreak_substring_matching"] == 0)
    return texts, np.array(refuses)


def test_scores_are_probabilities_and_empty_is_zero():
    texts = ["", "   ", None, "I'm sorry, but I can't help with that.", "Sure. 1. Open a terminal.\n2. Run `ls`."]
    scores = refusal_scores(texts)
    assert scores.dtype == np.float32 and scores.shape == (5,)
    assert np.all((scores >= 0) & (scores <= 1))
    assert scores[:3].tolist() == [0.0, 0.0, 0.0]
    assert scores[3] > 0.5 > scores[4]
    assert refusal_scores([]).shape == (0,)


def test_classify_is_consistent_with_scores():
    texts, _ = _refusal_direction("jailbreakbench_baseline")
    scores = refusal_scores(texts)
    classes = classify_responses(texts)
    assert set(classes) <= set(CLASSES)
    assert [c != "comply" for c in classes] == list(scores >= 0.5)


@pytest.fixture(scope="module")
def xstest_only_heads():
    """A text head fit on XSTest's three models alone: the shipped heads are fit on refusal_direction too."""
    frame = xstest_labelled(XSTEST)
    return RefusalHeads(text=fit_refusal_head(frame["completion"].to_list(), frame["label"].to_list()))


@pytest.mark.parametrize("set_name", ["harmless_actadd", "jailbreakbench_baseline", "jailbreakbench_ablation"])
def test_agrees_with_labels_on_unseen_real_completions(set_name, xstest_only_heads):
    texts, refuses = _refusal_direction(set_name)
    accuracy = ((refusal_scores(texts, heads=xstest_only_heads) >= 0.5) == refuses).mean()
    assert accuracy >= 0.85, f"{set_name}: {accuracy:.3f}"


def test_held_out_xstest_prompts_beat_string_matching():
    """Fit on 4/5 of the prompts, score the other 1/5: the learned head must beat the XSTest authors' baseline."""
    frame = xstest_labelled(XSTEST)
    prompts = sorted(set(frame["prompt"].to_list()))
    held_out = set(prompts[::5])
    test_mask = np.array([p in held_out for p in frame["prompt"].to_list()])
    texts = np.array(frame["completion"].to_list(), dtype=object)
    labels = np.array(frame["label"].to_list())
    head = fit_refusal_head(list(texts[~test_mask]), list(labels[~test_mask]))
    predicted = np.array(classify_responses(list(texts[test_mask]), heads=RefusalHeads(text=head)))
    truth = labels[test_mask] != "comply"
    ours = ((predicted != "comply") == truth).mean()
    baseline = ((np.array(frame["strmatch"].to_list())[test_mask] != "comply") == truth).mean()
    assert ours >= baseline + 0.02 and ours >= 0.9, (ours, baseline)


def test_partial_refusal_is_recognised_as_refusal():
    # Real llama2 partial refusals (XSTest human label 3_partial_refusal): refusal first, then tips/lists.
    frame = xstest_labelled(XSTEST)
    partial = frame.filter((frame["label"] == "partial") & (frame["model"] == "llama2new"))
    scores = refusal_scores(partial["completion"].to_list())
    assert (scores >= 0.5).mean() >= 0.8


def test_saved_heads_round_trip(tmp_path):
    frame = xstest_labelled(XSTEST).head(300)
    texts, labels = frame["completion"].to_list(), frame["label"].to_list()
    heads = RefusalHeads(text=fit_refusal_head(texts, labels))
    path = heads.save(tmp_path / "head.npz")
    loaded = refusal.load_heads(str(path))
    np.testing.assert_allclose(refusal_scores(texts, heads=loaded), refusal_scores(texts, heads=heads), atol=1e-6)


def test_fit_rejects_unknown_labels():
    with pytest.raises(ValueError, match="unknown refusal labels"):
        fit_refusal_head(["a", "b"], ["comply", "maybe"])


def test_embeddings_path_and_dimension_fallback():
    from curation.embed import get_embedder

    texts = ["I cannot assist with that request.", "Here is a recipe:\n1. Boil water.\n2. Add pasta."]
    embedded = refusal_scores(texts, get_embedder().encode(texts))
    assert embedded[0] > 0.5 > embedded[1]
    with pytest.warns(UserWarning, match="text-only head"):
        fallback = refusal_scores(texts, np.zeros((2, 7), dtype=np.float32))
    np.testing.assert_allclose(fallback, refusal_scores(texts))
    with pytest.raises(ValueError):
        refusal_scores(texts, np.zeros((3, 384), dtype=np.float32))


def test_text_head_scores_twenty_thousand_responses_quickly():
    texts, _ = _refusal_direction("jailbreakbench_ablation")
    many = (texts * (20_000 // len(texts) + 1))[:20_000]  # real responses, resampled
    refusal.load_heads()
    start = time.perf_counter()
    scores = refusal_scores(many)
    elapsed = time.perf_counter() - start
    assert scores.shape == (20_000,)
    assert elapsed < 20, f"{elapsed:.1f}s"


# ---- the one-select heuristic features against the per-pattern polars implementation they replaced --------------

def _reference_features(texts):
    """The original: one polars count per pattern and part, over the original characters."""
    import polars as pl

    from curation.refusal import _I, _REFUSAL_CORE, _REFUSAL_PATTERNS, HEAD_CHARS

    strings = ["" if t is None else str(t) for t in texts]
    text = pl.Series("t", strings, dtype=pl.String).str.strip_chars()
    columns = []
    for part in (text.str.slice(0, HEAD_CHARS), text.str.slice(HEAD_CHARS)):
        for pattern in _REFUSAL_PATTERNS.values():
            columns.append(np.log1p(part.str.count_matches(pattern).fill_null(0).to_numpy().astype(np.float32)))
    chars = text.str.len_chars().to_numpy().astype(np.float32)
    lines = text.str.count_matches("\n").to_numpy().astype(np.float32)
    core = "|".join(_REFUSAL_PATTERNS[k].removeprefix(_I) for k in _REFUSAL_CORE)
    first = text.str.find(_I + "(?:" + core + ")").to_numpy()
    first = np.where(np.isnan(first.astype(np.float64)), -1, first).astype(np.float64)
    refusal_pos = np.where(first >= 0, first / np.maximum(chars, 1.0), 1.0).astype(np.float32)
    columns += [np.log1p(chars), np.log1p(lines), (chars == 0).astype(np.float32), refusal_pos,
                ((first >= 0) & (chars < 300)).astype(np.float32)]
    return np.stack(columns, axis=1).astype(np.float32)


# Characters the stand-in rewrites or must keep: curly apostrophe, bullet, \x02, NBSP and other spaces, accents,
# CJK, emoji, non-ASCII digits, long s and Kelvin sign (fold onto s/k), combining marks.
_TRICKY = ["\u2019", "\u2022", "\x02", "\x01", "\u00a0", "\u2003", "\u00e9", "\u00c9", "\u4e0d", "\U0001f60a",
           "\u0660", "\u0966", "\u017f", "\u212a", "\u0301", "_", "\x0b", "\u2028", "\u0085"]


def _tricky_variants(texts):
    out = []
    for k, text in enumerate(texts):
        c = _TRICKY[k % len(_TRICKY)]
        cut = (13 * k) % (len(text) + 1)
        out += [text[:cut] + c + text[cut:], c + text, text.replace(" ", c), text.replace("'", "\u2019"),
                text.replace("\n- ", "\n\u2022 ").replace("\n", "\n\x02 "), text.replace("s", "\u017f"),
                text.replace("k", "\u212a") + "\u0660"]
    return out


@pytest.fixture(scope="module")
def response_texts(shared_data):
    texts = real_texts(shared_data)
    sample = [texts[i] for i in np.random.default_rng(0).choice(len(texts), 8000, replace=False)]
    return sample + _tricky_variants(sample[:1000]) + [None, "", "  ", "\u2022 a\n\u2022 b", "I\u2019m sorry"]


def test_refusal_features_equal_the_per_pattern_reference_on_real_texts(response_texts):
    got = refusal_features(response_texts)
    want = _reference_features(response_texts)
    assert got.dtype == want.dtype and got.shape == want.shape == (len(response_texts), len(FEATURE_NAMES))
    diff = np.argwhere(got != want)
    assert not len(diff), [(response_texts[i][:80], FEATURE_NAMES[j], got[i, j], want[i, j]) for i, j in diff[:5]]
    assert (want[:, : len(FEATURE_NAMES) - 5] > 0).any(axis=0).all()  # every pattern fires somewhere


def test_ngram_features_equal_sklearns_hashing_vectorizer_on_real_texts(response_texts):
    from sklearn.feature_extraction.text import HashingVectorizer

    from curation.refusal import NGRAM_BUCKETS, NGRAM_CHARS, _ngram_features

    strings = ["" if t is None else t for t in response_texts]
    want = HashingVectorizer(n_features=NGRAM_BUCKETS, ngram_range=(1, 3), alternate_sign=False, norm="l2",
                             lowercase=True).transform([s.strip()[:NGRAM_CHARS] for s in strings])
    got = _ngram_features(strings)
    assert got.shape == want.shape and got.dtype == want.dtype and got.has_sorted_indices
    assert np.array_equal(got.indptr, want.indptr) and np.array_equal(got.indices, want.indices)
    assert np.array_equal(got.data, want.data)
    assert _ngram_features(["", "  "]).nnz == 0 and _ngram_features(["a b"]).nnz == 0


def test_vectorised_murmurhash_equals_sklearns():
    from sklearn.utils import murmurhash3_32

    from curation.refusal import _murmurhash3_32

    words = ["", "a", "ab", "abc", "abcd", "abcde", "i can't help", "caf\u00e9 \u4e0d\U0001f60a", "x" * 301]
    words += [str(k) * (k % 13) for k in range(200)]
    encoded = [w.encode("utf-8") for w in words]
    offsets = np.cumsum([0] + [len(b) for b in encoded])
    got = _murmurhash3_32(np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets)
    assert got.tolist() == [murmurhash3_32(w, seed=0) for w in words]


def test_repeated_texts_score_as_when_alone(response_texts):
    texts = response_texts[:300]
    doubled = texts + texts[::-1] + texts[:50]
    alone = refusal.refusal_proba(texts)
    assert np.array_equal(refusal.refusal_proba(doubled), np.vstack([alone, alone[::-1], alone[:50]]))
    assert np.array_equal(np.vstack([refusal.refusal_proba([t]) for t in texts[:40]]), alone[:40])


def test_labelled_responses_reads_every_source_and_the_heads_fit_on_three():
    rows = refusal.labelled_responses(DATA)
    counts = {s: sum(r["source"] == s for r in rows) for s in refusal.RESPONSE_SOURCES}
    assert counts == {"xstest_completions_dev": 1350, "chatgpt_refusals": 1704, "refusal_direction_completions": 2000,
                      "jbb_artifacts_responses": 632}
    assert {r["label"] for r in rows} == set(refusal.CLASSES)
    assert all(r["label"] == "comply" for r in rows if r["source"] == "jbb_artifacts_responses")
    assert "jbb_artifacts_responses" not in refusal.FIT_SOURCES
    assert {r["human"] for r in rows if r["source"] in ("xstest_completions_dev", "chatgpt_refusals")} == {True}


@pytest.mark.slow
def test_the_shipped_text_head_is_the_one_fit_on_the_fit_sources(xstest_only_heads):
    """The data card says what the shipped head was fit on: refitting on that gives the same decisions."""
    rows = [r for r in refusal.labelled_responses(DATA) if r["source"] in refusal.FIT_SOURCES]
    texts = [r["text"] for r in rows]
    refit = RefusalHeads(text=fit_refusal_head(texts, [r["label"] for r in rows]))
    probe = texts[::7]
    shipped = refusal_scores(probe) >= 0.5
    assert (shipped == (refusal_scores(probe, heads=refit) >= 0.5)).mean() >= 0.995
    # and not the XSTest-only head it replaced: its decisions differ on chatgpt_refusals' answers
    gpt = [r["text"] for r in rows if r["source"] == "chatgpt_refusals"]
    assert ((refusal_scores(gpt) >= 0.5) != (refusal_scores(gpt, heads=xstest_only_heads) >= 0.5)).mean() > 0.05
