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

import re
from typing import Sequence

import numpy as np
import polars as pl
import pyarrow as pa

from equi.schema import SPAN_TYPE

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
    non-whitespace character.
    """
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
    from curation.refusal import _distinct_text_proba, distinct_texts, load_heads

    if not segment_texts:
        return np.zeros(0, dtype=np.float32)
    # One pass of the refusal detector's text head over the distinct segments: its probabilities (refusal_scores),
    # the core-phrase flag (has_refusal_phrase) and the concreteness cues, all from the same polars select.
    distinct, inverse = distinct_texts(segment_texts)
    proba, core, counts = _distinct_text_proba(distinct, load_heads().text, (_CONCRETE.pattern,))
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
    from curation.refusal import _distinct_text_proba, _text_proba, distinct_texts, load_heads

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
    opening = [_opening_segments(responses[i]) for i in looked]
    flat = [responses[i][s:e] for i, segs in zip(looked, opening) for s, e in segs]
    distinct, inverse = distinct_texts(flat)
    head = load_heads().text
    refusing = (_segment_refusal(*_distinct_text_proba(distinct, head)[:2]) >= 0.5)[inverse].tolist()
    rests, rest_of = [], []
    cursor = 0
    for i, segs in zip(looked, opening):
        run = 0
        while run < len(segs) and refusing[cursor + run]:
            run += 1
        rest = responses[i][segs[run - 1][1]:].strip() if run else ""
        if rest:
            rests.append(rest[:FOLLOW_READ_CHARS])
            rest_of.append(i)
        cursor += len(segs)
    if rests:
        comply = _text_proba(rests, head)[0][:, 0]
        length = np.fromiter(map(len, rests), dtype=np.float32, count=len(rests))
        cue = 0.5 + 0.5 * _has_delivery_cue(rests).astype(np.float32)
        out[rest_of] = comply * np.minimum(1.0, length / FOLLOW_FULL_CHARS) * cue
    return out


def _opening_segments(text: str) -> list[tuple[int, int]]:
    """:func:`split_segments` of the first :data:`OPENING_CHARS` characters, less a last segment the cut may shorten."""
    if len(text) <= OPENING_CHARS:
        return split_segments(text)
    return [(s, e) for s, e in split_segments(text[:OPENING_CHARS]) if e < OPENING_CHARS]


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


def _as_dicts(spans: list[tuple[int, int, int]]) -> list[dict]:
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
    return [None if spans is None else _as_dicts(spans) for spans in _row_spans(prompt_harm, responses, high, low)]


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
    offsets, valid, flat = [0], [], []
    for spans in _row_spans(prompt_harm, responses, high, low):
        valid.append(spans is not None)
        flat += spans or ()
        offsets.append(len(flat))
    columns = np.array(flat, dtype=np.int32).reshape(-1, 3)
    values = pa.StructArray.from_arrays(
        [pa.array(columns[:, 0]), pa.array(columns[:, 1]), pa.array(columns[:, 2].astype(np.int8))],
        fields=list(SPAN_TYPE.value_type),
    )
    mask = pa.array(~np.array(valid, dtype=bool)) if not all(valid) else None
    array = pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), values, type=SPAN_TYPE, mask=mask)
    return pl.Series(name, pl.from_arrow(array), dtype=SPAN_DTYPE)


def pair_span_columns(prompt_harm: Sequence[float], chosen: Sequence[str | None],
                      rejected: Sequence[str | None]) -> tuple[pl.Series, pl.Series]:
    """``chosen_spans`` and ``rejected_spans`` of preference pairs, scored in one call over both answers."""
    harm = list(prompt_harm)
    spans = span_column("spans", harm + harm, list(chosen) + list(rejected))
    return spans[:len(harm)].alias("chosen_spans"), spans[len(harm):].alias("rejected_spans")


def _row_spans(
    prompt_harm: Sequence[float], responses: Sequence[str | None], high: float, low: float
) -> list[list[tuple[int, int, int]] | None]:
    """Per response, its merged ``(start, end, sign)`` spans (None for None), scoring every segment in one call."""
    if len(prompt_harm) != len(responses):
        raise ValueError(f"{len(prompt_harm)} prompt_harm values but {len(responses)} responses")
    _check_thresholds(high, low)
    per_row: list[list[tuple[int, int]] | None] = []
    split_once: dict[str, list[tuple[int, int]]] = {}
    texts: list[str] = []
    harms: list[float] = []
    for harm, response in zip(prompt_harm, responses):
        if response is None:
            per_row.append(None)
            continue
        segments = split_once.get(response)
        if segments is None:
            segments = split_once[response] = split_segments(response)
        per_row.append(segments)
        texts += [response[s:e] for s, e in segments]
        harms += [float(harm)] * len(segments)
    scores = _score_segments(np.asarray(harms, dtype=np.float32), texts).tolist()
    out: list[list[tuple[int, int, int]] | None] = []
    cursor = 0
    for segments in per_row:
        if segments is None:
            out.append(None)
            continue
        row_scores = scores[cursor : cursor + len(segments)]
        cursor += len(segments)
        out.append(_merged_spans(segments, row_scores, high, low))
    return out


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
