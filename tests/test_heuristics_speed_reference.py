"""Issue 18: the faster per-row heuristics against the implementations they replaced, kept here as references,
on real texts (../shared/data) and on characters the fast paths treat specially."""

from __future__ import annotations

import re

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from curation import refusal, segments  # noqa: E402
from curation.segments import _CONCRETE, _LIST_ITEM, split_segments  # noqa: E402
from tests.realdata import real_texts  # noqa: E402

# ---- references: the code before issue 18 -----------------------------------------------------------------------

_OLD_SENTENCE_END = re.compile(r"(?<!\be\.g)(?<!\bi\.e)(?<!\bvs)(?<!\bMr)(?<!\bDr)(?<!\bMrs)(?<!\bSt)[.!?]+[\"')\]]*(?=\s)")
_OLD_CODE_BLOCK = re.compile(r"```.*?(?:```|\Z)", re.DOTALL)


def _old_trimmed(text, start, end):
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return (start, end) if start < end else None


def _old_split_prose(text, start, end):
    pieces = []
    line_start = start
    block_start = start
    for match in re.finditer(r"\n", text[start:end]):
        line_end = start + match.start()
        next_start = start + match.end()
        if (
            _LIST_ITEM.match(text, next_start, end)
            or _LIST_ITEM.match(text, line_start, line_end)
            or not text[line_start:line_end].strip()
        ):
            pieces.append((block_start, line_end))
            block_start = next_start
        line_start = next_start
    pieces.append((block_start, end))
    out = []
    for piece_start, piece_end in pieces:
        if _LIST_ITEM.match(text, piece_start, piece_end):
            span = _old_trimmed(text, piece_start, piece_end)
            if span:
                out.append(span)
            continue
        cursor = piece_start
        for match in _OLD_SENTENCE_END.finditer(text, piece_start, piece_end):
            span = _old_trimmed(text, cursor, match.end())
            if span:
                out.append(span)
            cursor = match.end()
        span = _old_trimmed(text, cursor, piece_end)
        if span:
            out.append(span)
    return out


def _old_split_segments(text):
    if not text:
        return []
    out = []
    cursor = 0
    for block in _OLD_CODE_BLOCK.finditer(text):
        out += _old_split_prose(text, cursor, block.start())
        span = _old_trimmed(text, block.start(), block.end())
        if span:
            out.append(span)
        cursor = block.end()
    return out + _old_split_prose(text, cursor, len(text))


def _old_has_refusal_phrase(texts):
    """Polars over the original characters (Unicode \\b: no fast DFA on non-ASCII text)."""
    return pl.Series("t", texts, dtype=pl.String).str.contains(refusal._CORE).fill_null(False).to_numpy()


def _old_score_segments(harm, texts):
    """refusal_scores + has_refusal_phrase + concreteness by Python re, one call each."""
    score = refusal.refusal_scores(texts).astype(np.float32)
    score = np.where(_old_has_refusal_phrase(texts), np.maximum(score, 0.9), score).astype(np.float32)
    counts = np.array([len(_CONCRETE.findall(t)) for t in texts], dtype=np.float32)
    lengths = np.array([len(t) for t in texts], dtype=np.float32)
    concrete = np.clip(0.35 * counts + np.minimum(lengths / 400.0, 0.3), 0.0, 1.0)
    harmful_view = score - concrete * (1.0 - score)
    benign_view = (1.0 - score) * (0.3 + 0.7 * concrete) - score
    harm = np.clip(np.asarray(harm, dtype=np.float32), 0.0, 1.0)
    return np.clip(harm * harmful_view + (1.0 - harm) * benign_view, -1.0, 1.0).astype(np.float32)


# ---- data -----------------------------------------------------------------------------------------------------

# Characters the fast paths rewrite or route elsewhere: curly apostrophe, bullet, \x02, NBSP and other spaces,
# accents, CJK, emoji, non-ASCII and superscript digits, long s and Kelvin sign, combining marks, \x1c, separators.
_TRICKY = ["\u2019", "\u2022", "\x02", "\x01", "\u00a0", "\u2003", "\u00e9", "\u00c9", "\u4e0d", "\U0001f60a",
           "\u0660", "\u00b2", "\u017f", "\u212a", "\u0301", "_", "\x0b", "\x1c", "\u2028", "\u0085", "\u0130"]


@pytest.fixture(scope="module")
def texts(shared_data):
    every = real_texts(shared_data)
    sample = [every[i] for i in np.random.default_rng(18).choice(len(every), 6000, replace=False)]
    tricky = []
    for k, text in enumerate(sample[:600]):
        c = _TRICKY[k % len(_TRICKY)]
        cut = (17 * k) % (len(text) + 1)
        tricky += [text[:cut] + c + text[cut:], text.replace(" ", c, 3), text.replace("'", "\u2019"),
                   text.replace("\n- ", "\n\u2022 ")]
    return sample + tricky + ["", "  ", "\u2022 step 1", "I\u2019m sorry", "e.g. this. Mr. X! ok?) yes. 3.5 kg.",
                              "```py\nx\n```\n- a\n1) b\n\n", "x```y\n- z```\n 1) q\n"]


# ---- splitting ----------------------------------------------------------------------------------------------------

def test_split_segments_equal_the_reference_on_real_texts(shared_data, texts):
    every = real_texts(shared_data)
    for text in every + texts:
        assert split_segments(text) == _old_split_segments(text), text[:200]


_pieces = st.sampled_from(["I can't help. ", "Sure! ", "1. Mix it.\n", "- item\n", "```py\nx = 1\n```\n", "\n\n",
                           "e.g. this ", "Why? ", "Step 2) go\n", "   ", "word", "3.5 kg. ", "Mr.", "Mrs. ", "...",
                           "!?\" ", "\t* x\n", "a) b\n", "i.e. ", "vs. ", "St. ", ".", "\n", "\u2022 y\n", "\r\n"])


@given(st.one_of(st.lists(_pieces, max_size=16).map("".join), st.text(max_size=200)))
@settings(max_examples=500, deadline=None)
def test_split_segments_equal_the_reference_on_synthetic_text(text):
    assert split_segments(text) == _old_split_segments(text)


# ---- refusal signals ----------------------------------------------------------------------------------------------

def test_has_refusal_phrase_equals_the_reference(texts):
    assert np.array_equal(refusal.has_refusal_phrase(texts), _old_has_refusal_phrase(texts))
    assert refusal.has_refusal_phrase(texts).mean() > 0.02


def test_segment_scores_equal_the_reference_on_real_segments(texts):
    pieces = [t[s:e] for t in texts[:2500] for s, e in split_segments(t)] + texts[-7:] + texts[6000:6400]
    harm = np.random.default_rng(0).random(len(pieces)).astype(np.float32)
    got = segments._score_segments(harm, pieces)
    want = _old_score_segments(harm, pieces)
    assert got.dtype == want.dtype and np.array_equal(got, want)
    # both concreteness paths ran: Rust on the stand-in, re for texts the engines read differently
    agrees = segments._rust_agrees(pieces)
    assert agrees.any() and (~agrees).any()


def test_concreteness_without_given_counts_equals_with(texts):
    pieces = [t[s:e] for t in texts[:800] for s, e in split_segments(t)] + texts[6000:6300]
    counts = refusal._text_proba(pieces, refusal.load_heads().text, (_CONCRETE.pattern,))[2][:, 0]
    assert np.array_equal(segments._concreteness(pieces), segments._concreteness(pieces, counts))


def test_printable_ascii_is_read_alike_by_both_engines():
    from curation.categorise import _rust_readable

    plain = [chr(c) for c in range(0x20, 0x7F)] + ["\t", "\n", "\r"]
    assert _rust_readable(plain)[1].all()
    assert not segments._rust_agrees(["a\x1cb"])[0] or _rust_readable(["a\x1cb"])[1][0]


def test_span_columns_equal_the_reference_pipeline(texts):
    responses = texts[:1500] + [None, "", texts[6001]]
    harm = list(np.random.default_rng(1).random(len(responses)).astype(np.float32))
    got = segments.spans_for_rows(harm, responses)
    per_row = [None if r is None else _old_split_segments(r) for r in responses]
    flat = [r[s:e] for r, segs in zip(responses, per_row) if segs for s, e in segs]
    flat_harm = [h for h, segs in zip(harm, per_row) if segs for _ in segs]
    scores = _old_score_segments(np.asarray(flat_harm, dtype=np.float32), flat).tolist()
    cursor = 0
    for response, segs, spans in zip(responses, per_row, got):
        if segs is None:
            assert spans is None
            continue
        row = scores[cursor:cursor + len(segs)]
        cursor += len(segs)
        assert spans == segments.spans_from_scores([(s, e, v) for (s, e), v in zip(segs, row)])


# ---- n-grams ------------------------------------------------------------------------------------------------------

def test_tokens_take_both_paths_and_equal_re(texts):
    openings = [t.strip()[: refusal.NGRAM_CHARS].lower() for t in texts]
    slow = refusal._word_disagrees(pl.Series("t", openings, dtype=pl.String))
    assert slow.any() and not slow.all()
    assert refusal._tokens(openings).to_list() == [refusal._TOKEN.findall(o) for o in openings]


def test_murmurhash_of_byte_ranges_equals_sklearns():
    from sklearn.utils import murmurhash3_32

    blob = "i can't help with that. caf\u00e9 \u4e0d\U0001f60a " * 7 + "x" * 301
    data = np.frombuffer(blob.encode("utf-8"), dtype=np.uint8)
    rng = np.random.default_rng(0)
    starts = rng.integers(0, len(data), 3000)
    lengths = np.minimum(rng.integers(0, 40, 3000), len(data) - starts)
    lengths[:5] = [0, 1, 2, 3, 4]
    starts[-1], lengths[-1] = 0, len(data)
    got = refusal._murmurhash3_32(data, starts, lengths)
    want = [murmurhash3_32(bytes(data[s:s + n]), seed=0) for s, n in zip(starts, lengths)]
    assert got.tolist() == want


# ---- compiled kernels (numba) against their numpy/polars paths ------------------------------------------------------

def _hashing_vectorizer(strings):
    from sklearn.feature_extraction.text import HashingVectorizer

    return HashingVectorizer(n_features=refusal.NGRAM_BUCKETS, ngram_range=(1, 3), alternate_sign=False, norm="l2",
                             lowercase=True).transform([s.strip()[: refusal.NGRAM_CHARS] for s in strings])


def _same_csr(got, want):
    return (got.shape == want.shape and got.dtype == want.dtype and np.array_equal(got.indptr, want.indptr)
            and np.array_equal(got.indices, want.indices) and np.array_equal(got.data, want.data))


def test_ngram_features_equal_hashing_vectorizer_with_and_without_numba(texts, kernel_mode):
    # ASCII and non-ASCII openings mixed (the compiled pass takes the first, the polars path the rest), a text whose
    # opening is ASCII only once lowercased (Kelvin sign), and hash-heavy repeats
    strings = texts[:3000] + texts[6000:6400] + ["\u212a\u212a is kk", "a b", "", "ab " * 200, "x_1 2y __ ab-cd"]
    got = refusal._ngram_features(strings)
    assert _same_csr(got, _hashing_vectorizer(strings)) and got.has_sorted_indices


@pytest.mark.parametrize("n_buckets", [1, 2, 3, 97, 1000, 2**12, 2**13, 2**16 + 3])
def test_ngram_kernel_equals_hashing_vectorizer_for_any_bucket_count(texts, n_buckets):
    # the radix sort's digits and the hash fold depend on the bucket count: odd bit counts, non-powers of two
    # (modulo, not a mask), one bucket (every n-gram collides into one run)
    from sklearn.feature_extraction.text import HashingVectorizer

    kernels = refusal._kernels()
    if kernels is None:
        pytest.skip("numba is not installed")
    openings = [s.strip()[: refusal.NGRAM_CHARS].lower() for s in texts[:800]] + ["ab " * 100, "", "a b"]
    data = np.frombuffer("".join(openings).encode("utf-8"), dtype=np.uint8)
    lengths = np.fromiter(map(len, openings), dtype=np.int64, count=len(openings))
    indptr, indices, values = kernels.ngram_counts(data, lengths, refusal._python_word_table(), n_buckets)
    want = HashingVectorizer(n_features=n_buckets, ngram_range=(1, 3), alternate_sign=False, norm="l2",
                             lowercase=False).transform(openings)
    assert np.array_equal(indptr, want.indptr) and np.array_equal(indices, want.indices)
    assert np.array_equal(values, want.data)


def test_head_logits_equal_the_design_matrix_product(texts, kernel_mode):
    heads = refusal.load_heads()
    strings = texts[:1500] + texts[6000:6100]
    embeddings = np.random.default_rng(3).standard_normal((len(strings), heads.embed.embedding_dim)).astype(np.float32)
    for head, emb in ((heads.text, None), (heads.embed, embeddings)):
        want = np.asarray(head.design(strings, emb) @ head.coef.T) + head.intercept
        assert np.array_equal(head.logits(strings, emb), want)


def test_the_rare_patterns_alternation_gate_changes_no_count(texts):
    # the rare refusal patterns are counted only over the texts their alternation finds; counting every pattern over
    # every text gives the same features, on both readings (lowercased ASCII stand-ins, and the texts that keep
    # non-ASCII characters: _TRICKY's ſ / K / non-ASCII digits), segments included
    from curation.segments import split_segments

    pieces = [t[s:e] for t in texts[:1500] for s, e in split_segments(t)]
    strings = texts + pieces + [t.upper() for t in texts[:300]]
    gated = refusal._heuristics(strings, ("(?i)\\bsorry",), rare_gate=True)
    assert 0 < len(refusal._RARE)
    ungated = refusal._heuristics(strings, ("(?i)\\bsorry",))
    for got, want in zip(gated, ungated):
        assert np.array_equal(got, want)
    names = [f"head_{n}" for n in refusal.PATTERN_NAMES]
    fired = (ungated[0][:, : len(names)] > 0).any(axis=0)
    assert fired.all(), [n for n, f in zip(names, fired) if not f]
