"""Issue 18: the compiled segment splitter (curation.kernels.segment_bounds) and span merge (merged_spans) against
the Python path they sit beside and the original splitter, on real texts (../shared/data), on generated text with
odd Unicode, and code point by code point for the character classes they read."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from curation import segments  # noqa: E402
from tests.realdata import real_texts  # noqa: E402
from tests.test_heuristics_speed_reference import _TRICKY, _old_split_segments  # noqa: E402


@pytest.fixture(scope="module")
def texts(shared_data):
    """Every real text, then a sample with one of the characters the splitter reads specially put in."""
    every = real_texts(shared_data)
    tricky = []
    for k, i in enumerate(np.random.default_rng(7).choice(len(every), 1200, replace=False).tolist()):
        text, c = every[i], _TRICKY[k % len(_TRICKY)]
        cut = (31 * k) % (len(text) + 1)
        tricky += [text[:cut] + c + text[cut:], text.replace(" ", c, 5), text.replace("\n", c, 2)]
    return every + tricky


def _python(text):
    return segments._split_python(text)


def _per_text(starts, ends, offsets):
    s, e, o = starts.tolist(), ends.tolist(), offsets.tolist()
    return [list(zip(s[a:b], e[a:b])) for a, b in zip(o[:-1], o[1:])]


# ---- character classes ----------------------------------------------------------------------------------------------

def test_char_classes_are_res_and_isspace_on_every_code_point():
    kernels = pytest.importorskip("curation.kernels")
    table = segments._char_classes()
    assert table.dtype == np.uint8 and len(table) == 0x110000
    every = [chr(c) for c in range(0x110000)]  # lone surrogates included: re and str read them too
    for bit, pattern in ((kernels.SPACE, r"\s"), (kernels.WORD, r"\w"), (kernels.DIGIT, r"\d"),
                         (kernels.END, r"[.!?]"), (kernels.CLOSE, r"[\"')\]]")):
        match = re.compile(pattern).match
        want = np.fromiter((match(c) is not None for c in every), dtype=bool, count=len(every))
        assert np.array_equal((table & bit) != 0, want), pattern
    want = np.fromiter(map(str.isspace, every), dtype=bool, count=len(every))
    assert np.array_equal((table & kernels.ISSPACE) != 0, want)
    # the classes differ where the splitter could confuse them: non-ASCII digits and spaces, marks, surrogates
    assert table[0x0660] & kernels.DIGIT and table[0x00B2] & kernels.WORD and not table[0x00B2] & kernels.DIGIT
    assert table[0x2028] & kernels.SPACE and table[0x0085] & kernels.ISSPACE and not table[0xD800]


# ---- the splitter ---------------------------------------------------------------------------------------------------

def test_compiled_splitter_equals_python_and_the_original_on_real_texts(texts):
    pytest.importorskip("numba")
    got = _per_text(*segments.split_batch(texts))
    for text, segs in zip(texts, got):
        want = _python(text)
        assert segs == want == _old_split_segments(text), text[:200]
    assert sum(map(len, got)) > 100_000
    for text in texts[:3000] + texts[-600:]:
        assert segments.split_segments(text) == _python(text)


def test_batch_equals_per_text_calls_and_chunks_change_nothing(texts, kernel_mode, monkeypatch):
    sample = texts[:2000] + texts[-300:] + ["", "x", "\ud800. a", "```", "a. " * 400]  # the last outgrows its arrays
    whole = segments.split_batch(sample)
    assert [a.dtype for a in whole] == [np.int64] * 3 and len(whole[2]) == len(sample) + 1
    assert _per_text(*whole) == [segments.split_segments(t) for t in sample]
    monkeypatch.setattr(segments, "SPLIT_CHUNK_CHARS", 5000)  # many chunks, some of a single longer text
    assert all(np.array_equal(a, b) for a, b in zip(segments.split_batch(sample), whole))
    assert [a.tolist() for a in segments.split_batch([])] == [[], [], [0]]


#: Pieces that reach every branch of the splitter: abbreviations at the text's start, after a word or non-word
#: character, or cut by a line start; sentence ends before every kind of whitespace, at the end of a line, piece or
#: code block; list markers with 1–4 digits, ASCII and non-ASCII, bullets, letters; fences; blank lines of odd spaces.
_ODD_PIECES = ["e.g. x", "ie.g. ", "(e.g.) ", "i.e.", "xvs. ", " vs.", "Mr.", "Mrs? ", "_Dr! ", "\u00e9St. ",
               "St.\n", "Mr", "s.", ". ", "!", "?\u00a0", ".\u2028", ".\u0085", ".\x1c", ".\x0b", "!)\" ", ".']\n",
               "...", "?!?", "1. ", "12) ", "123. ", "1234. ", "\u0661. ", "\u0967) ", "\u00b2. ", "a) ", "Z. ",
               "\u00e9) ", "- ", "* ", "+\t", "\u2022 ", "\u2022x", "-", "\n", "\n\n", "\n \t\n", "\r\n", "\u2028",
               "\u00a0\n", "\u3000", "```", "``", "`", "```py\n", "\u0301", "e\u0301. ", "\U0001f60a. ", "\ud83d",
               "\ude0a", "\ud800. ", "word", " ", "\t", "x", "Q", "3.5", "\u0660"]


@given(st.one_of(st.lists(st.sampled_from(_ODD_PIECES), max_size=24).map("".join),
                 st.text(alphabet=st.sampled_from(list("e.gi vsMrDSt!?)\"'-*+\u2022123a\n\t`") + _TRICKY), max_size=60),
                 st.text(max_size=120)))
@settings(max_examples=1500, deadline=None)
def test_compiled_splitter_equals_python_and_the_original_on_generated_text(text):
    pytest.importorskip("numba")
    want = _python(text)
    assert want == _old_split_segments(text)
    assert segments.split_segments(text) == want
    # the same text inside a batch, after text that ends mid-line, mid-word and inside a code block
    batch = ["x```y", "vs", text, "e.g", text]
    assert _per_text(*segments.split_batch(batch)) == [_python(t) for t in batch]


def test_no_numba_path_splits_as_before(texts, monkeypatch):
    monkeypatch.setattr(segments, "_kernels", lambda: None)
    sample = texts[:1500] + texts[-300:]
    assert [segments.split_segments(t) for t in sample] == [_old_split_segments(t) for t in sample]


# ---- the opening ----------------------------------------------------------------------------------------------------

def _old_opening(text):
    if len(text) <= segments.OPENING_CHARS:
        return _old_split_segments(text)
    return [(s, e) for s, e in _old_split_segments(text[:segments.OPENING_CHARS]) if e < segments.OPENING_CHARS]


def test_opening_segments_equal_the_cut_split(texts, kernel_mode):
    sample = texts[:3000] + texts[-600:]
    assert _per_text(*segments._opening_segments(sample)) == [_old_opening(t) for t in sample]


@given(st.lists(st.lists(st.sampled_from(_ODD_PIECES), max_size=12).map("".join), max_size=8))
@settings(max_examples=300, deadline=None)
def test_opening_segments_equal_the_cut_split_on_generated_text(batch):
    pytest.importorskip("numba")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(segments, "OPENING_CHARS", 9)  # most generated texts are cut, some at a segment's end
        assert _per_text(*segments._opening_segments(batch)) == [_old_opening(t) for t in batch]


# ---- spans ----------------------------------------------------------------------------------------------------------

@given(st.lists(st.lists(st.sampled_from([0.9, 0.35, 0.2, 0.05, 0.0, -0.05, -0.2, -0.35, -0.9, 0.5, -0.5, 1.0, -1.0]),
                         max_size=10), max_size=6),
       st.sampled_from([(0.35, 0.05), (0.5, -0.2), (0.2, 0.2 - 1e-9), (1.0, 0.0), (0.35, -0.3)]))
@settings(max_examples=400, deadline=None)
def test_merged_spans_kernel_equals_the_python_merge(rows, thresholds):
    kernels = pytest.importorskip("curation.kernels")
    high, low = thresholds
    counts = np.array([0] + [len(r) for r in rows], dtype=np.int64).cumsum()
    scores = np.array([v for r in rows for v in r], dtype=np.float32).astype(np.float64)  # thresholds exactly hit
    starts = np.arange(len(scores), dtype=np.int64) * 10
    got = _per_span_row(*kernels.merged_spans(starts, starts + 3, scores, counts, high, low))
    want = [segments._merged_spans([(10 * k, 10 * k + 3) for k in range(a, b)], scores[a:b].tolist(), high, low)
            for a, b in zip(counts[:-1], counts[1:])]
    assert got == want


def _per_span_row(starts, ends, signs, offsets):
    assert signs.dtype == np.int8
    o = offsets.tolist()
    return [list(zip(starts[a:b].tolist(), ends[a:b].tolist(), signs[a:b].tolist())) for a, b in zip(o[:-1], o[1:])]


def test_span_outputs_equal_with_and_without_numba(texts, monkeypatch):
    pytest.importorskip("numba")
    responses = texts[:600] + [None, "", "  ", texts[-1], None] + texts[-200:]
    harm = np.random.default_rng(2).random(len(responses)).astype(np.float32).tolist()
    refusals = np.random.default_rng(3).random(len(responses)).astype(np.float32)
    present = [r for r in responses if r is not None]

    def outputs():
        chosen, rejected = segments.pair_span_columns(harm, responses, responses[::-1])
        return (segments.spans_for_rows(harm, responses, 0.5, -0.2), chosen.to_list(), rejected.to_list(),
                chosen.dtype, segments.withheld_scores(present, refusals[:len(present)]).tolist())

    compiled = outputs()
    monkeypatch.setattr(segments, "_kernels", lambda: None)
    assert outputs() == compiled
    assert any(row for row in compiled[0] if row) and compiled[0][600] is None
