"""Issue 18, second pass: the n-gram kernel over UTF-8 (every opening, not only ASCII ones) and the refusal features'
rest counts taken only where there is a rest, against the paths they replaced, on real texts (../shared/data) and
on characters those paths treat specially."""

from __future__ import annotations

import re

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from curation import refusal  # noqa: E402
from curation.patterns import case_folded  # noqa: E402
from tests.realdata import real_texts  # noqa: E402
from tests.test_heuristics_speed_reference import _hashing_vectorizer, _same_csr  # noqa: E402


@pytest.fixture(scope="module")
def texts(shared_data):
    return real_texts(shared_data)




#: Word characters of every UTF-8 width, characters Rust and Python read differently (superscripts, combining
#: marks), case folding that changes length (İ), the Kelvin sign, emoji, curly quotes, non-ASCII whitespace.
_ODD = [
    "caf\u00e9 na\u00efve d\u00e9j\u00e0 vu", "x\u00b2 + y\u00b2 = z\u00b2 \u00bd\u00bd", "\u0130stanbul \u0130\u0130",
    "e\u0301te\u0301 co\u0308operate", "\u4e0d\u8981 \u5e2e\u52a9\u6211 ab", "\U0001d400\U0001d401 \U0001f60a\U0001f60a ok",
    "\u212a\u212a is kk", "I can\u2019t help\u2014sorry\u2026 \u201cquoted\u201d", "a\u00a0b\u2003cd\u3000ef",
    "\u0661\u0662\u0663 \u0968\u0969 12", "\u00df\u00df stra\u00dfe", "_\u00e9 \u00e9_ __", "\u00e9", "",
]


def test_ngram_kernel_over_utf8_equals_hashing_vectorizer(texts):
    pytest.importorskip("numba")
    odd = [t for t in texts if not t.strip()[: refusal.NGRAM_CHARS].lower().isascii()]
    assert len(odd) > 100  # the real data holds plenty of non-ASCII openings
    strings = odd[:1500] + texts[:500] + _ODD + [s * 40 for s in _ODD]
    got = refusal._ngram_features(strings)
    assert _same_csr(got, _hashing_vectorizer(strings)) and got.has_sorted_indices


def test_ngram_kernel_equals_the_mixed_path_it_replaced(texts):
    kernels = pytest.importorskip("curation.kernels")
    strings = texts[:800] + texts[6000:6400] + _ODD
    openings = [s.strip()[: refusal.NGRAM_CHARS].lower() for s in strings]
    assert _same_csr(refusal._ngram_features(strings), refusal._mixed_ngram_features(openings, kernels))


def test_python_word_table_is_res_word_class():
    table = refusal._python_word_table()
    rng = np.random.default_rng(0)
    points = np.concatenate([np.arange(0, 0x3000), rng.integers(0x3000, 0x110000, 20000)])
    points = points[(points < 0xD800) | (points >= 0xE000)]
    want = np.array([re.match(r"\w", chr(c)) is not None for c in points], dtype=np.uint8)
    assert np.array_equal(table[points], want)
    assert not table[0xD800:0xE000].any()


def _reference_features(strings):
    """The refusal features as before: every pattern counted on the opening and on the rest of every text."""
    stripped = pl.Series("t", strings, dtype=pl.String).str.strip_chars()
    frame = refusal._with_stand_in(stripped).with_columns(
        pl.col("a").str.slice(0, refusal.HEAD_CHARS).alias("head"), pl.col("a").str.slice(refusal.HEAD_CHARS).alias("rest"))
    counts = frame.select([pl.col(part).str.count_matches(refusal._stand_in_pattern(p)).fill_null(0).alias(f"{part}{k}")
                           for part in ("head", "rest") for k, p in enumerate(refusal._REFUSAL_PATTERNS.values())])
    return np.stack([np.log1p(counts[:, k].to_numpy().astype(np.float32)) for k in range(counts.width)], axis=1)


def test_rest_counts_only_where_there_is_a_rest(texts):
    n = len(refusal.PATTERN_NAMES)
    cut = refusal.HEAD_CHARS
    edge = ["x" * (cut - 1) + ". 1. step", "y" * cut + "\n- item\n", "z" * (cut + 1) + ".", "I can't. " * 30,
            "a" * (cut - 5) + " " * 10 + "I cannot help.", "  " + "b" * cut + "  ", "\n\n1. a\n" * 60, "", "   "]
    strings = texts[:2000] + texts[6000:6300] + edge
    features = refusal.refusal_features(strings)
    want = _reference_features(strings)
    assert features.dtype == np.float32 and np.array_equal(features[:, : 2 * n], want)
    assert (features[:, n : 2 * n] > 0).any(axis=1).mean() > 0.1  # rests were counted


# ---- (?i) patterns read lowercased text ----------------------------------------------------------------------------

def _old_heuristics(strings, extra=()):
    """The refusal features, core-phrase flags and extra counts as before: every pattern as written, (?i) and all,
    over the ASCII stand-in."""
    text, ascii_text = pl.col("t"), pl.col("a")
    patterns = [refusal._stand_in_pattern(p) for p in refusal._REFUSAL_PATTERNS.values()]
    first = ascii_text.str.find(refusal._CORE)
    first_byte = (pl.when(first.is_null()).then(None).when(pl.col("kept")).then(first)
                  .otherwise(text.str.slice(0, first).str.len_bytes()))
    frame = refusal._with_stand_in(pl.Series("t", strings, dtype=pl.String).str.strip_chars()).with_columns(
        ascii_text.str.slice(0, refusal.HEAD_CHARS).alias("head"), ascii_text.str.slice(refusal.HEAD_CHARS).alias("rest"))
    got = frame.select(
        *[pl.col(part).str.count_matches(p).fill_null(0).alias(f"{part}{k}")
          for part in ("head", "rest") for k, p in enumerate(patterns)],
        *[ascii_text.str.count_matches(refusal._stand_in_pattern(p)).fill_null(0).alias(f"extra{k}")
          for k, p in enumerate(extra)],
        text.str.len_chars().alias("chars"), text.str.count_matches("\n").alias("lines"), first_byte.alias("first"))
    counts = np.log1p(got.select(pl.all().exclude("chars", "lines", "first", "^extra.*$")).to_numpy().astype(np.float32))
    chars = got["chars"].to_numpy().astype(np.float32)
    first = got["first"].cast(pl.Float64).fill_null(-1.0).to_numpy()
    has = first >= 0
    structure = np.stack([np.log1p(chars), np.log1p(got["lines"].to_numpy().astype(np.float32)),
                          (chars == 0).astype(np.float32),
                          np.where(has, first / np.maximum(chars, 1.0), 1.0).astype(np.float32),
                          (has & (chars < 300)).astype(np.float32)], axis=1)
    extra_counts = got.select(f"extra{k}" for k in range(len(extra))).to_numpy().astype(np.int64)
    return np.concatenate([counts, structure], axis=1).astype(np.float32), has, extra_counts


def _flip_case(text, rng):
    flips = rng.random(len(text)) < 0.5
    return "".join(c.swapcase() if f else c for c, f in zip(text, flips))


def test_case_folded_patterns_count_what_the_originals_count(texts):
    from curation.segments import _CONCRETE

    rng = np.random.default_rng(18)
    sample = texts[:1200] + texts[6000:6300]
    shouting = ["I CAN'T HELP WITH THAT. HOWEVER, HERE IS HOW: 1. MIX", "AS AN AI, I'M UNABLE TO. PLEASE NOTE",
                "Sorry \u212aelvin \u017forry I cannot", "\u0661. I WON\u2019T \u2022 STEP 1\n- Then", "\u0130 cannot help"]
    strings = sample + [_flip_case(t, rng) for t in sample[:800]] + [t.upper() for t in sample[800:1100]] + shouting + _ODD
    features, has, extra = refusal._heuristics(strings, (_CONCRETE.pattern,))
    want_features, want_has, want_extra = _old_heuristics(strings, (_CONCRETE.pattern,))
    assert np.array_equal(features, want_features)
    assert np.array_equal(has, want_has) and has.sum() > 200
    assert np.array_equal(extra, want_extra) and extra.sum() > 200


def test_case_folding_rewrites_letters_and_keeps_escapes():
    for pattern in list(refusal._REFUSAL_PATTERNS.values()) + [refusal._CORE]:
        folded = case_folded(pattern)
        if not pattern.startswith("(?i)"):
            assert folded is None
            continue
        assert folded == re.sub(r"\\.|.", lambda m: m[0] if m[0].startswith("\\") else m[0].lower(),
                                pattern[len("(?i)"):], flags=re.DOTALL)
        assert re.findall(r"\\.", folded) == re.findall(r"\\.", pattern[len("(?i)"):])
        assert not re.search(r"[A-Z]", re.sub(r"\\.", "", folded))
    assert case_folded(r"(?i)\p{Lu}x") is None and case_folded("(?i)[^\\x00-\\x7F]") is None


_LINE_PIECES = ["\n", "  ", "\t", "- ", "* ", "\u2022 ", "\x02 ", "1. ", "12) ", "step 3 ", "Step 3 ", "# ", "#### ",
                "**Title**", "**Bold** text", ": ", "I can't. ", "word ", "```", "    code", "\u00a0", "\u0662. "]


@given(st.lists(st.sampled_from(_LINE_PIECES), max_size=30).map("".join))
@settings(max_examples=300, deadline=None)
def test_gated_line_start_patterns_count_what_the_full_scan_counts(text):
    strings = [text, text * 12, "x" * refusal.HEAD_CHARS + text]
    assert np.array_equal(refusal._heuristics(strings)[0], _old_heuristics(strings)[0])


def test_gates_are_the_line_start_patterns_and_fire_on_real_texts(texts):
    names = {name for name, p in refusal._REFUSAL_PATTERNS.items() if refusal._stand_in_pattern(p) in refusal._GATES}
    assert names == {"numbered", "bullet", "heading"}
    features = refusal.refusal_features(texts)
    for name in names:  # each gated pattern counted something, in the opening and past it
        for part in ("head", "rest"):
            assert (features[:, refusal.FEATURE_NAMES.index(f"{part}_{name}")] > 0).sum() >= 10, (part, name)
