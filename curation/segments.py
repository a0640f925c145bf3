"""AMA key segments: which parts of a response are worth learning (+1) and which are harmful/unhelpful (−1).

A response is split into segments (sentences, list items, code blocks; :func:`split_segments`), each segment is
scored in [−1, 1] against how harmful the prompt is (:func:`segment_scores`), and the scores become ±1 character
spans with hysteresis (:func:`response_spans`): a span opens only on a clear score (``|s| >= high``) and stays open
through weaker segments until the score falls past ``low``, so one neutral sentence inside a refusal or a list does
not cut it in two. Consecutive segments with the same state merge into one span; neutral stretches get no span
(their tokens keep mask 1, see the contract's "AMA token masks").

Scoring a segment, with ``h`` = P(prompt harmful), ``r`` = the refusal detector's score of the segment alone (at least 0.9 when it holds an explicit
first-person refusal such as "I can't help with that") and
``k`` = how concrete/actionable it is (steps, list items, code, imperative how-to wording):

- harmful view: refusing is good, concrete compliance is bad: ``r − k·(1 − r)``;
- benign view: helping is good, refusing or lecturing is bad: ``(1 − r)·(0.3 + 0.7·k) − r``;
- score = ``h · harmful + (1 − h) · benign``.

The refusal detector (:mod:`curation.refusal`) runs once over every segment of a batch, so
:func:`spans_for_rows` costs one vectorised call however many rows it gets.

The same segment reading gives the safety view of a refusal (:func:`withheld_scores`, issue 16): a response that
opens with refusing segments and then delivers the content anyway (refuse-then-comply) withholds nothing, and the
cost (``curation/steps.py: score_costs``, the online reward in ``train/rewards.py``) reads that, not the refusal score.
"""

from __future__ import annotations

import functools
import re
from typing import Iterable, Sequence

import numpy as np
import polars as pl
import pyarrow as pa

from equi.schema import SPAN_TYPE

from curation.patterns import distinct_texts

DEFAULT_HIGH = 0.35
DEFAULT_LOW = 0.05

_CODE_BLOCK = re.compile(r"```.*?(?:```|\Z)", re.DOTALL)
_LIST_ITEM = re.compile(r"^[ \t]*(?:\d{1,3}[.)]|[-*•+]|[a-zA-Z][.)])[ \t]+", re.MULTILINE)
# A sentence ends at . ! ? (optionally followed by closing quotes/brackets) before whitespace; the lookbehinds
# keep common abbreviations and decimals ("e.g. ", "3.5") from ending one. Written as
# (?<!\be\.g)...[.!?]+ with the lookbehinds first, re tried all seven at every character (5× the cost of the
# rest of the splitter); with the first [.!?] in front (each lookbehind then spans it) re jumps from one
# . ! ? to the next, and the matches are the same.
_SENTENCE_END = re.compile(r"[.!?](?<!\be\.g[.!?])(?<!\bi\.e[.!?])(?<!\bvs[.!?])(?<!\bMr[.!?])(?<!\bDr[.!?])"
                           r"(?<!\bMrs[.!?])(?<!\bSt[.!?])[.!?]*[\"')\]]*(?=\s)")
_CONCRETE = re.compile(
    r"(?i)^\s*(?:\d{1,3}[.)]|[-*•+]|step \d)|```|\b(?:first|then|next|finally|mix|add|combine|heat|install|"
    r"run|use|open|click|type|download|buy|obtain|take|apply|insert|attach|set up|create|write|place|"
    r"remove|cut|measure|you can|you could|you will need|you need|make sure|follow these|here['’]s how|"
    r"here is how|here are|ingredients|example|import|def|function|command)\b"
)


def _trimmed(text: str, start: int, end: int) -> tuple[int, int] | None:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return (start, end) if start < end else None


def _split_prose(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """Split a stretch without code into list items (one segment each) and sentences."""
    # Where a list item starts: re's ^ (MULTILINE) holds at ``start`` only at a line start, and no item spans a
    # newline, so finditer finds exactly the line starts at which ``_LIST_ITEM.match`` would succeed.
    items = {m.start() for m in _LIST_ITEM.finditer(text, start, end)}
    pieces: list[tuple[int, int]] = []
    # Lines first: a list item is one segment even if it holds several sentences. A piece ends before a line
    # that starts an item, after a line that is one, and at a blank line.
    line_start = block_start = start
    lines = text[start:end].split("\n")
    for line in lines[:-1]:  # each of these is followed by a newline
        line_end = line_start + len(line)
        next_start = line_end + 1
        if next_start in items or line_start in items or not line.strip():
            pieces.append((block_start, line_end))
            block_start = next_start
        line_start = next_start
    pieces.append((block_start, end))
    segments: list[tuple[int, int]] = []
    for piece_start, piece_end in pieces:
        if piece_start in items:
            span = _trimmed(text, piece_start, piece_end)
            if span:
                segments.append(span)
            continue
        cursor = piece_start
        for match in _SENTENCE_END.finditer(text, piece_start, piece_end):
            span = _trimmed(text, cursor, match.end())
            if span:
                segments.append(span)
            cursor = match.end()
        span = _trimmed(text, cursor, piece_end)
        if span:
            segments.append(span)
    return segments


def split_segments(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` character offsets of the segments of ``text``: code blocks, list items, sentences.

    Segments are sorted, do not overlap, carry no leading/trailing whitespace, and together cover every
    non-whitespace character. Compiled (:func:`curation.kernels.segment_bounds`) where numba is installed, else
    :func:`_split_python`; the two give the same segments.
    """
    kernels = _kernels()
    if kernels is None or not text:
        return _split_python(text)
    chars = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    bounds = iter(kernels.text_segment_bounds(chars, _char_classes()).tolist())
    return list(zip(bounds, bounds))


def _split_python(text: str) -> list[tuple[int, int]]:
    """:func:`split_segments` by ``re`` and Python loops: where numba is not installed, and the definition the
    compiled splitter follows."""
    if not text:
        return []
    segments: list[tuple[int, int]] = []
    cursor = 0
    for block in _CODE_BLOCK.finditer(text):
        segments += _split_prose(text, cursor, block.start())
        span = _trimmed(text, block.start(), block.end())
        if span:
            segments.append(span)
        cursor = block.end()
    segments += _split_prose(text, cursor, len(text))
    return segments


#: Characters the compiled splitter takes in one call: each call copies its texts' code points (4 bytes a character),
#: so a large batch goes in pieces of bounded memory.
SPLIT_CHUNK_CHARS = 1 << 22


def split_batch(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`split_segments` of every text, flat: ``starts`` and ``ends`` (int64, offsets within each text) and
    ``offsets`` (int64, n + 1: text i's segments are ``offsets[i]:offsets[i + 1]``).

    One compiled pass over the texts' code points (:func:`curation.kernels.segment_bounds`, at most
    :data:`SPLIT_CHUNK_CHARS` characters a call; a lone surrogate is one code point there, as in ``re``), or
    :func:`_split_python` per text where numba is not installed.
    """
    kernels = _kernels()
    if kernels is None:
        per_text = [_split_python(t) for t in texts]
        offsets = np.zeros(len(texts) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, per_text), dtype=np.int64, count=len(texts)), out=offsets[1:])
        flat = np.array([bound for segments in per_text for span in segments for bound in span], dtype=np.int64)
        return flat[0::2].copy(), flat[1::2].copy(), offsets
    cumulative = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, texts), dtype=np.int64, count=len(texts)), out=cumulative[1:])
    parts = []
    first = 0
    while True:
        # the texts from ``first`` on that fit in a chunk, at least one
        last = int(np.searchsorted(cumulative, cumulative[first] + SPLIT_CHUNK_CHARS, "right")) - 1
        last = min(max(last, first + 1), len(texts))
        chars = np.frombuffer("".join(texts[first:last]).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        parts.append(kernels.segment_bounds(chars, cumulative[first:last + 1] - cumulative[first], _char_classes()))
        if last >= len(texts):
            break
        first = last
    if len(parts) == 1:
        return parts[0]
    before = np.cumsum([0] + [len(starts) for starts, _, _ in parts[:-1]])
    offsets = np.concatenate([[0]] + [counts[1:] + b for (_, _, counts), b in zip(parts, before)])
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), offsets


@functools.lru_cache(maxsize=1)
def _char_classes() -> np.ndarray:
    """Per code point (0 to 0x10FFFF, lone surrogates included), the character classes the compiled splitter reads,
    as the bits of :mod:`curation.kernels`: Python ``re``'s ``\\s``, ``\\w``
    (:func:`curation.refusal._python_word_table`) and ``\\d`` for str patterns, ``str.isspace`` (``_trimmed``, blank
    lines), and the sentence end's character sets. Built once per process (~0.1 s) by reading them off every
    character."""
    from curation import kernels
    from curation.refusal import _python_word_table

    every = np.arange(0x110000, dtype=np.uint32).tobytes().decode("utf-32-le", "surrogatepass")
    table = _python_word_table() * np.uint8(kernels.WORD)
    for bit, pattern in ((kernels.SPACE, r"\s"), (kernels.DIGIT, r"\d"), (kernels.END, r"[.!?]"),
                         (kernels.CLOSE, r"[\"')\]]")):
        table[[m.start() for m in re.finditer(pattern, every)]] |= bit
    table[np.fromiter(map(str.isspace, every), dtype=bool, count=len(every))] |= kernels.ISSPACE
    return table


def _kernels():
    """:mod:`curation.kernels`, or None where numba is not installed: :func:`curation.refusal._kernels`, so one
    switch turns every compiled path off."""
    from curation.refusal import _kernels

    return _kernels()


def _concreteness(segment_texts: list[str], rust_counts: np.ndarray | None = None) -> np.ndarray:
    """0–1: how actionable a segment is (counts of step/list/code/how-to cues, saturating).

    ``rust_counts``: ``_CONCRETE`` counted by polars over each text's ASCII stand-in (:func:`_segment_signals`
    counts it with the refusal features); computed here when not given.
    """
    counts = np.zeros(len(segment_texts), dtype=np.float32)
    if segment_texts:
        # The pattern is Python re; polars (Rust regex) counts it identically wherever the two engines agree on
        # every character (\b, \w, \s, \d, case folding); the other texts go through re. Rust counts it over the
        # stripped ASCII stand-in of curation.refusal, which no pattern can tell from the text, and stripping
        # moves no match (no match starts or ends on whitespace; ^\s* takes a leading run either way).
        fast = _rust_agrees(segment_texts)
        if rust_counts is None:
            from curation.refusal import _heuristics

            rust_counts = np.zeros(len(segment_texts), dtype=np.int64)
            index = np.flatnonzero(fast)
            rust_counts[index] = _heuristics([segment_texts[i] for i in index], (_CONCRETE.pattern,))[2][:, 0]
        counts[fast] = rust_counts[fast]
        for i in np.flatnonzero(~fast):
            counts[i] = len(_CONCRETE.findall(segment_texts[i]))
    lengths = np.fromiter(map(len, segment_texts), dtype=np.int64, count=len(segment_texts)).astype(np.float32)
    # Long segments carry more content; a two-word fragment is never very concrete.
    return np.clip(0.35 * counts + np.minimum(lengths / 400.0, 0.3), 0.0, 1.0)


_PLAIN = re.compile(r"[^\t\n\r\x20-\x7e]")


def _rust_agrees(texts: list[str]) -> np.ndarray:
    """Boolean per text: Rust's regex reads every character as ``re`` does (:func:`curation.categorise._rust_readable`),
    asked only about texts with a character outside printable ASCII, tab and newlines (on which they agree)."""
    from curation.categorise import _rust_readable

    ok = np.ones(len(texts), dtype=bool)
    try:
        odd = np.flatnonzero(pl.Series("t", texts, dtype=pl.String).str.contains(_PLAIN.pattern).to_numpy())
    except UnicodeEncodeError:  # a lone surrogate, which polars cannot hold; _rust_readable marks it
        odd = [i for i, t in enumerate(texts) if not t.isascii() or _PLAIN.search(t)]
    if len(odd):
        ok[odd] = _rust_readable([texts[i] for i in odd])[1]
    return ok


def _score_segments(prompt_harm: np.ndarray, segment_texts: list[str]) -> np.ndarray:
    from curation.refusal import _distinct_text_proba, load_heads

    if not segment_texts:
        return np.zeros(0, dtype=np.float32)
    # One pass of the refusal detector's text head over the distinct segments: its probabilities (refusal_scores),
    # the core-phrase flag (has_refusal_phrase) and the concreteness cues, all from the same polars select.
    distinct, inverse = distinct_texts(segment_texts)
    proba, core, counts = _distinct_text_proba(distinct, load_heads().text, (_CONCRETE.pattern,), rare_gate=True)
    refusal = _segment_refusal(proba, core)[inverse]
    concrete = _concreteness(distinct, counts[:, 0])[inverse]
    harmful_view = refusal - concrete * (1.0 - refusal)
    benign_view = (1.0 - refusal) * (0.3 + 0.7 * concrete) - refusal
    harm = np.clip(np.asarray(prompt_harm, dtype=np.float32), 0.0, 1.0)
    return np.clip(harm * harmful_view + (1.0 - harm) * benign_view, -1.0, 1.0).astype(np.float32)


#: The refusal score above which a response's opening is looked at for what follows it (below, the withheld score
#: is the refusal score: it differs by less than this).
FOLLOW_MIN_REFUSAL = 0.05
#: Characters of the response in which its refusal opening is looked for: a segment not within them is never part
#: of it.
OPENING_CHARS = 600
#: Characters of what follows the opening from which it counts in full ("Is there anything else?" counts little).
FOLLOW_FULL_CHARS = 400
#: Characters of what follows the opening that are read.
FOLLOW_READ_CHARS = 1000
#: Signs that what follows a refusal delivers something: a pivot ("here is", "that said", "however, I can"), a
#: numbered or bulleted list, a heading, code, a letter's salutation or subject line. Written in the dialect both
#: Python's ``re`` and Rust's regex (polars) read alike.
DELIVERY_CUE = re.compile(
    r"(?im)^[ \t]*(?:\d{1,2}[.)]|[-*•]|#{1,4} |\*\*|step \d|dear\b|subject:)|```|\bhere(?:['’]s| is| are)\b|"
    r"\b(?:with )?that (?:being )?said\b|\bhowever, (?:i|here|you|the)\b|\bi can (?:provide|give|offer|tell)\b"
)


def follow_through_scores(responses: Sequence[str | None], refusals: Sequence[float]) -> np.ndarray:
    """Per response, 0–1: how far what follows a refusal opening delivers an answer anyway (refuse-then-comply).

    The opening is the leading run of segments (:func:`split_segments`, only those within the first
    :data:`OPENING_CHARS` characters) that the refusal detector scores as refusing, each segment alone as for AMA
    (score ≥ 0.5, or an explicit first-person refusal phrase). What follows is the rest of the response (its first
    :data:`FOLLOW_READ_CHARS` characters are read). Its follow-through is the text head's P(comply) of that rest,
    times ``min(1, len(rest) / FOLLOW_FULL_CHARS)`` (a closing "Is there anything else I can help with?" counts
    little), halved unless the rest shows a sign of delivering (:data:`DELIVERY_CUE`: a pivot such as "here is" or
    "that said", a list, a heading, code, a letter's salutation): a refusal followed by its justification or a
    pointer to a hotline reads as compliant prose to the head, and the cue tells the two apart. 0 where the response does not open with a refusal, is all refusal, or
    its ``refusals`` score (the detector's, :func:`curation.refusal.refusal_scores`) is below
    :data:`FOLLOW_MIN_REFUSAL`.

    It reads whether content follows the refusal, not whether that content is harmful: "I can't do X. Here are
    some safety tips: 1. ..." follows through too; the cost weighs it by the prompt's harm.
    """
    from curation.refusal import _distinct_text_proba, _text_proba, load_heads

    refusals = np.asarray(refusals, dtype=np.float32)
    if len(refusals) != len(responses):
        raise ValueError(f"{len(responses)} responses but {len(refusals)} refusal scores")
    out = np.zeros(len(responses), dtype=np.float32)
    looked = [i for i, (text, r) in enumerate(zip(responses, refusals))
              if text is not None and r >= FOLLOW_MIN_REFUSAL and text.strip()]
    if not looked:
        return out
    # Only the opening is split (a segment cut short by the end of the window is left out, unless the response ends
    # there), and only the start of the rest is read.
    texts = [responses[i] for i in looked]
    starts, ends, offsets = _opening_segments(texts)
    rows = np.repeat(np.arange(len(texts)), np.diff(offsets))
    flat = [texts[r][s:e] for r, s, e in zip(rows.tolist(), starts.tolist(), ends.tolist())]
    distinct, inverse = distinct_texts(flat)
    head = load_heads().text
    refusing = (_segment_refusal(*_distinct_text_proba(distinct, head)[:2]) >= 0.5)[inverse]
    # Each opening's leading run of refusing segments ends before its first segment that does not refuse.
    run_end = offsets[1:].copy()
    other = np.flatnonzero(~refusing)
    other_rows, first = np.unique(rows[other], return_index=True)
    run_end[other_rows] = other[first]
    rests, rest_of = [], []
    for k in np.flatnonzero(run_end > offsets[:-1]).tolist():
        rest = texts[k][int(ends[run_end[k] - 1]):].strip()
        if rest:
            rests.append(rest[:FOLLOW_READ_CHARS])
            rest_of.append(looked[k])
    if rests:
        comply = _text_proba(rests, head)[0][:, 0]
        length = np.fromiter(map(len, rests), dtype=np.float32, count=len(rests))
        cue = 0.5 + 0.5 * _has_delivery_cue(rests).astype(np.float32)
        out[rest_of] = comply * np.minimum(1.0, length / FOLLOW_FULL_CHARS) * cue
    return out


def _opening_segments(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`split_batch` of each text's first :data:`OPENING_CHARS` characters, less a last segment the cut may
    shorten (one that ends at the cut of a longer text)."""
    starts, ends, offsets = split_batch([t[:OPENING_CHARS] for t in texts])
    longer = np.fromiter((len(t) > OPENING_CHARS for t in texts), dtype=bool, count=len(texts))
    counts = np.diff(offsets)
    cut = (ends == OPENING_CHARS) & np.repeat(longer, counts)
    if cut.any():
        dropped = np.bincount(np.repeat(np.arange(len(texts)), counts)[cut], minlength=len(texts))
        offsets = offsets - np.concatenate([[0], np.cumsum(dropped)])
        starts, ends = starts[~cut], ends[~cut]
    return starts, ends, offsets


def _has_delivery_cue(texts: list[str]) -> np.ndarray:
    """:data:`DELIVERY_CUE` per text, by polars (Rust's regex: one fast pass), or ``re`` for text polars cannot hold."""
    try:
        return pl.Series("t", texts, dtype=pl.String).str.contains(DELIVERY_CUE.pattern).fill_null(False).to_numpy()
    except UnicodeEncodeError:  # a lone surrogate
        return np.array([bool(DELIVERY_CUE.search(t)) for t in texts], dtype=bool)


def withheld_scores(responses: Sequence[str | None], refusals: Sequence[float] | None = None) -> np.ndarray:
    """The safety view of a response, 0–1: the probability that it withholds what was asked.

    ``refusal × (1 − follow-through)`` (:func:`follow_through_scores`): a full refusal withholds; a refusal
    followed by the content ("I can't help with that. ... Step 1: ...") does not, though the refusal score, which
    counts any refusal as XSTest does (the over-refusal view), calls it a (partial) refusal. ``refusals``: the
    responses' :func:`curation.refusal.refusal_scores` where the caller has them (None counts as 0). None responses
    score 0.
    """
    if refusals is None:
        from curation.refusal import refusal_scores

        refusals = np.zeros(len(responses), dtype=np.float32)
        present = [i for i, t in enumerate(responses) if t is not None]
        if present:
            refusals[present] = refusal_scores([responses[i] for i in present])
    refusals = np.nan_to_num(np.asarray(refusals, dtype=np.float32), nan=0.0)
    return (np.clip(refusals, 0.0, 1.0) * (1.0 - follow_through_scores(responses, refusals))).astype(np.float32)


def _segment_refusal(proba: np.ndarray, core: np.ndarray) -> np.ndarray:
    """A segment's refusal score: the detector's, at least 0.9 when it holds an explicit refusal phrase."""
    refusal = np.clip(1.0 - proba[:, 0], 0.0, 1.0).astype(np.float32)
    return np.where(core, np.maximum(refusal, 0.9), refusal).astype(np.float32)


def segment_scores(prompt_harm: float, response: str) -> list[tuple[int, int, float]]:
    """``(start, end, score)`` per segment of ``response``; score in [−1, 1], > 0 = worth learning."""
    segments = split_segments(response or "")
    texts = [response[s:e] for s, e in segments]
    scores = _score_segments(np.full(len(texts), prompt_harm, dtype=np.float32), texts)
    return [(s, e, float(v)) for (s, e), v in zip(segments, scores)]


def hysteresis_states(scores: Sequence[float], high: float = DEFAULT_HIGH, low: float = DEFAULT_LOW) -> list[int]:
    """+1 / −1 / 0 per score: enter +1 at ``>= high`` (−1 at ``<= −high``), stay while ``> low`` (``< −low``)."""
    _check_thresholds(high, low)
    states: list[int] = []
    state = 0
    for score in scores:
        if state == 1 and score <= low:
            state = 0
        elif state == -1 and score >= -low:
            state = 0
        if state == 0:
            if score >= high:
                state = 1
            elif score <= -high:
                state = -1
        states.append(state)
    return states


def _check_thresholds(high: float, low: float) -> None:
    if not 0.0 < high <= 1.0:
        raise ValueError(f"high must be in (0, 1], got {high}")
    if not -high < low < high:
        raise ValueError(f"low must lie strictly between -high and high ({-high}, {high}), got {low}")


def spans_from_scores(
    scored: Sequence[tuple[int, int, float]], high: float = DEFAULT_HIGH, low: float = DEFAULT_LOW
) -> list[dict]:
    """Turn scored segments into merged ±1 spans ``{"start", "end", "sign"}`` (neutral stretches get none)."""
    return _as_dicts(_merged_spans([(s, e) for s, e, _ in scored], [v for _, _, v in scored], high, low))


def _as_dicts(spans: Iterable[tuple[int, int, int]]) -> list[dict]:
    return [{"start": s, "end": e, "sign": sign} for s, e, sign in spans]


def response_spans(
    prompt_harm: float, response: str, high: float = DEFAULT_HIGH, low: float = DEFAULT_LOW
) -> list[dict]:
    """AMA spans of one response: sorted, non-overlapping ``{"start", "end", "sign"}`` with ``0 <= start < end``."""
    return spans_from_scores(segment_scores(prompt_harm, response), high, low)


def spans_for_rows(
    prompt_harm: Sequence[float],
    responses: Sequence[str | None],
    high: float = DEFAULT_HIGH,
    low: float = DEFAULT_LOW,
) -> list[list[dict] | None]:
    """:func:`response_spans` over a batch, with one refusal-detector call for all segments; None → None."""
    starts, ends, signs, offsets = _row_spans(prompt_harm, responses, high, low)
    spans = _as_dicts(zip(starts.tolist(), ends.tolist(), signs.tolist()))
    bounds = offsets.tolist()
    return [None if response is None else spans[bounds[i]:bounds[i + 1]] for i, response in enumerate(responses)]


#: The contract's span column type (``chosen_spans``, ``rejected_spans``: :data:`equi.schema.SPAN_TYPE`) in polars.
#: Spelled out (pl.from_arrow here imported pandas when the module loaded: ~1 s on every command that imports it);
#: tests/test_segments.py checks it equals the Arrow type.
SPAN_DTYPE = pl.List(pl.Struct({"start": pl.Int32, "end": pl.Int32, "sign": pl.Int8}))


def span_column(
    name: str,
    prompt_harm: Sequence[float],
    responses: Sequence[str | None],
    high: float = DEFAULT_HIGH,
    low: float = DEFAULT_LOW,
) -> pl.Series:
    """:func:`spans_for_rows` as a polars column of :data:`SPAN_DTYPE` (null where the response is None).

    Built from flat Arrow arrays: polars' conversion of a list of lists of dicts costs more than scoring them.
    """
    starts, ends, signs, offsets = _row_spans(prompt_harm, responses, high, low)
    values = pa.StructArray.from_arrays(
        [_arrow(starts, pa.int32()), _arrow(ends, pa.int32()), _arrow(signs, pa.int8())],
        fields=list(SPAN_TYPE.value_type),
    )
    valid = np.fromiter((r is not None for r in responses), dtype=bool, count=len(responses))
    mask = (pa.Array.from_buffers(pa.bool_(), len(valid), [None, pa.py_buffer(np.packbits(~valid, bitorder="little"))])
            if not valid.all() else None)
    array = pa.ListArray.from_arrays(_arrow(offsets, pa.int32()), values, type=SPAN_TYPE, mask=mask)
    return pl.Series(name, pl.from_arrow(array), dtype=SPAN_DTYPE)


def _arrow(values: np.ndarray, kind) -> pa.Array:
    """A numpy integer array as an Arrow array of ``kind`` over its bytes. (``pa.array`` of an ndarray first asks
    whether it is a pandas object, which imports pandas: ~0.2 s in every process that builds a span column.)"""
    data = np.ascontiguousarray(values, dtype={pa.int8(): np.int8, pa.int32(): np.int32}[kind])
    return pa.Array.from_buffers(kind, len(data), [None, pa.py_buffer(data)])


def pair_span_columns(prompt_harm: Sequence[float], chosen: Sequence[str | None],
                      rejected: Sequence[str | None]) -> tuple[pl.Series, pl.Series]:
    """``chosen_spans`` and ``rejected_spans`` of preference pairs, scored in one call over both answers."""
    harm = list(prompt_harm)
    spans = span_column("spans", harm + harm, list(chosen) + list(rejected))
    return spans[:len(harm)].alias("chosen_spans"), spans[len(harm):].alias("rejected_spans")


def _row_spans(
    prompt_harm: Sequence[float], responses: Sequence[str | None], high: float, low: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every response's merged spans, flat: ``starts``, ``ends`` (int64), ``signs`` (int8) and ``offsets`` (int64,
    n + 1: response i's spans are ``offsets[i]:offsets[i + 1]``; a None response has none). Every response is split
    in one call (:func:`split_batch`), every segment scored in one, and the spans merged in one compiled pass
    (:func:`curation.kernels.merged_spans`; :func:`_merged_spans` per response where numba is not installed)."""
    if len(prompt_harm) != len(responses):
        raise ValueError(f"{len(prompt_harm)} prompt_harm values but {len(responses)} responses")
    _check_thresholds(high, low)
    texts = ["" if response is None else response for response in responses]
    harms = np.array([0.0 if r is None else float(h) for h, r in zip(prompt_harm, responses)], dtype=np.float32)
    starts, ends, offsets = split_batch(texts)
    counts = np.diff(offsets)
    rows = np.repeat(np.arange(len(texts)), counts)
    segment_texts = [texts[r][s:e] for r, s, e in zip(rows.tolist(), starts.tolist(), ends.tolist())]
    scores = _score_segments(np.repeat(harms, counts), segment_texts).astype(np.float64)
    kernels = _kernels()
    if kernels is not None:
        return kernels.merged_spans(starts, ends, scores, offsets, float(high), float(low))
    bounds = offsets.tolist()
    per_row = [_merged_spans(list(zip(starts[a:b].tolist(), ends[a:b].tolist())), scores[a:b].tolist(), high, low)
               for a, b in zip(bounds[:-1], bounds[1:])]
    flat = np.array([value for spans in per_row for span in spans for value in span], dtype=np.int64).reshape(-1, 3)
    span_offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, per_row), dtype=np.int64, count=len(per_row)), out=span_offsets[1:])
    return flat[:, 0].copy(), flat[:, 1].copy(), flat[:, 2].astype(np.int8), span_offsets


def _merged_spans(segments: Sequence[tuple[int, int]], scores: Sequence[float], high: float,
                  low: float) -> list[tuple[int, int, int]]:
    """Consecutive segments in the same hysteresis state merged into one ``(start, end, sign)`` span."""
    spans: list[tuple[int, int, int]] = []
    previous = 0
    for (start, end), state in zip(segments, hysteresis_states(scores, high, low)):
        if state != 0 and state == previous and spans:
            spans[-1] = (spans[-1][0], end, state)  # same run: merge, covering the whitespace between segments
        elif state != 0:
            spans.append((int(start), int(end), state))
        previous = state
    return spans
