"""Compiled inner loops of the per-row heuristics (numba): hashed n-grams, the refusal head's dense products, the
AMA segment splitter and the spans' hysteresis merge.

:func:`ngram_counts` is the refusal detector's n-gram block (:func:`curation.refusal._ngram_features`),
sklearn's ``HashingVectorizer(ngram_range=(1, 3), alternate_sign=False, norm="l2")``. Its token pattern
``\\b\\w\\w+\\b`` is a maximal run of two or more word characters, so one loop over the UTF-8 bytes (decoding each
character and reading whether Python's ``re`` calls it ``\\w`` from a table indexed by code point) finds the tokens,
writes them joined by single spaces into a scratch row (where every n-gram is a contiguous byte range, as
HashingVectorizer builds it), hashes each 1–3-gram with MurmurHash3_x86_32 (seed 0; the 1-, 2- and 3-gram that
start at the same token share their first blocks, which are mixed once), folds it into a bucket the way sklearn's
FeatureHasher does, and counts buckets per row: the CSR arrays HashingVectorizer gives, bit for bit.
:func:`ascii_ngram_counts` is the same over ASCII rows given by byte offsets.

:func:`add_dense_products` adds a dense block's share of a linear head's logits in scipy's order.

:func:`segment_bounds` is :func:`curation.segments.split_segments` over a batch of texts' code points, reading
Python ``re``'s character classes from a table (:func:`curation.segments._char_classes`); :func:`merged_spans` is
the per-response hysteresis and merge of :func:`curation.segments._merged_spans` over flat arrays.

Imported lazily through :func:`curation.refusal._kernels` (numba's import costs about a second), which
:mod:`curation.segments` also asks; compiled on first use and cached on disk (``cache=True``). Without numba the
callers use their numpy/polars/``re`` paths, which give the same numbers.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_M = np.uint64(0xFFFFFFFF)


@njit(cache=True, inline="always")
def _rotl32(x, r):
    return ((x << np.uint64(r)) | (x >> np.uint64(32 - r))) & _M


@njit(cache=True, inline="always")
def _murmur_block(buf, p, h):
    """One 4-byte block of MurmurHash3_x86_32 at ``buf[p:p + 4]`` mixed into ``h``."""
    k = (np.uint64(buf[p]) | (np.uint64(buf[p + 1]) << np.uint64(8)) | (np.uint64(buf[p + 2]) << np.uint64(16))
         | (np.uint64(buf[p + 3]) << np.uint64(24)))
    k = (k * np.uint64(0xCC9E2D51)) & _M
    k = _rotl32(k, 15)
    k = (k * np.uint64(0x1B873593)) & _M
    h ^= k
    h = _rotl32(h, 13)
    return (h * np.uint64(5) + np.uint64(0xE6546B64)) & _M


@njit(cache=True, inline="always")
def _murmur_finish(buf, start, length, h):
    """MurmurHash3_x86_32 of ``buf[start:start + length]`` given ``h`` after its ``length // 4`` full blocks."""
    tail = length & 3
    p = start + 4 * (length // 4)
    k = np.uint64(0)
    if tail == 3:
        k ^= np.uint64(buf[p + 2]) << np.uint64(16)
    if tail >= 2:
        k ^= np.uint64(buf[p + 1]) << np.uint64(8)
    if tail >= 1:
        k ^= np.uint64(buf[p])
        k = (k * np.uint64(0xCC9E2D51)) & _M
        k = _rotl32(k, 15)
        k = (k * np.uint64(0x1B873593)) & _M
        h ^= k
    h ^= np.uint64(length)
    h ^= h >> np.uint64(16)
    h = (h * np.uint64(0x85EBCA6B)) & _M
    h ^= h >> np.uint64(13)
    h = (h * np.uint64(0xC2B2AE35)) & _M
    h ^= h >> np.uint64(16)
    return h


@njit(cache=True)
def _murmurhash3_32(buf, start, length):
    """Unsigned MurmurHash3_x86_32, seed 0, of ``buf[start:start + length]`` (uint8)."""
    h = np.uint64(0)
    for b in range(length // 4):
        h = _murmur_block(buf, start + 4 * b, h)
    return _murmur_finish(buf, start, length, h)


@njit(cache=True, inline="always")
def _is_word(c):
    return (97 <= c <= 122) or (65 <= c <= 90) or (48 <= c <= 57) or c == 95


@njit(cache=True)
def ascii_ngram_counts(data, offsets, n_buckets):
    """:func:`ngram_counts` of ASCII rows: ``data`` holds the rows' bytes back to back, ``offsets`` (int64, n + 1)
    where each row starts and ends."""
    word = np.zeros(128, np.uint8)
    for c in range(128):
        word[c] = 1 if _is_word(c) else 0
    return _ngram_counts(data, offsets, word, n_buckets)


@njit(cache=True)
def ngram_counts(data, row_chars, word, n_buckets):
    """CSR ``(indptr, indices, data)`` of the l2-normalised bucket counts of each row's 1–3-grams.

    ``data`` holds the rows' UTF-8 bytes back to back, ``row_chars`` (int64, n) each row's length in characters,
    ``word`` (uint8, indexed by code point, covering every code point in ``data``) 1 where the character is a word
    character (Python's ``re`` ``\\w``). A token is a maximal run of word characters, at least two characters long;
    its bytes are hashed, as sklearn hashes the UTF-8 of the n-gram string. Indices are sorted within a row; a row
    without tokens is empty. ``n_buckets`` > 0.
    """
    n = len(row_chars)
    offsets = np.zeros(n + 1, np.int64)
    p = 0
    for r in range(n):
        for _ in range(row_chars[r]):
            p += _utf8_size(data[p])
        offsets[r + 1] = p
    return _ngram_counts(data, offsets, word, n_buckets)


@njit(cache=True, inline="always")
def _utf8_size(lead):
    if lead < 0x80:
        return 1
    if lead < 0xE0:
        return 2
    if lead < 0xF0:
        return 3
    return 4


@njit(cache=True, inline="always")
def _code_point(data, i, size):
    if size == 1:
        return np.int64(data[i])
    if size == 2:
        return ((np.int64(data[i]) & 0x1F) << 6) | (np.int64(data[i + 1]) & 0x3F)
    if size == 3:
        return ((np.int64(data[i]) & 0x0F) << 12) | ((np.int64(data[i + 1]) & 0x3F) << 6) | (np.int64(data[i + 2]) & 0x3F)
    return (((np.int64(data[i]) & 0x07) << 18) | ((np.int64(data[i + 1]) & 0x3F) << 12)
            | ((np.int64(data[i + 2]) & 0x3F) << 6) | (np.int64(data[i + 3]) & 0x3F))


@njit(cache=True)
def _ngram_counts(data, offsets, word, n_buckets):
    """:func:`ngram_counts` with each row's byte ``offsets`` (n + 1)."""
    n = len(offsets) - 1
    widest = 0
    cap = 0
    for r in range(n):
        width = offsets[r + 1] - offsets[r]
        widest = max(widest, width)
        cap += 3 * ((width + 1) // 3)  # a token takes two bytes and a separator: at most (width + 1) // 3 tokens
    scratch = np.empty(widest + 1, np.uint8)
    token_start = np.empty(widest // 2 + 1, np.int64)
    token_end = np.empty(widest // 2 + 1, np.int64)
    row_buckets = np.empty(3 * (widest // 2 + 1), np.int64)
    sorted_buckets = np.empty(3 * (widest // 2 + 1), np.int64)
    # A row's buckets are put in order by a two-pass radix sort (low digit, then high): no comparisons to mispredict.
    bits = 1
    while (1 << bits) < n_buckets:
        bits += 1
    low_bits = (bits + 1) // 2
    histogram = np.zeros((1 << low_bits) + 1, np.int64)
    indptr = np.zeros(n + 1, np.int64)
    indices = np.empty(cap, np.int32)
    values = np.empty(cap, np.float64)
    nnz = 0
    buckets = np.uint64(n_buckets)
    mask = np.uint64(n_buckets - 1)
    power_of_two = n_buckets & (n_buckets - 1) == 0
    for r in range(n):
        tokens = 0
        written = 0
        i, end = offsets[r], offsets[r + 1]
        while i < end:
            size = _utf8_size(data[i])
            if word[_code_point(data, i, size)] == 0:
                i += size
                continue
            j = i
            chars = 0
            while j < end:
                size = _utf8_size(data[j])
                if word[_code_point(data, j, size)] == 0:
                    break
                chars += 1
                j += size
            if chars >= 2:
                if tokens:
                    scratch[written] = 32
                    written += 1
                token_start[tokens] = written
                for q in range(i, j):
                    scratch[written] = data[q]
                    written += 1
                token_end[tokens] = written
                tokens += 1
            i = j
        m = 0
        for a in range(tokens):
            # the 1-, 2- and 3-gram starting at token a share their first bytes: their full 4-byte blocks are mixed
            # once, in order, and each n-gram's hash finishes from the state after its own full blocks
            start = token_start[a]
            h = np.uint64(0)
            done = 0
            for g in range(3):
                b = a + g
                if b >= tokens:
                    break
                length = token_end[b] - start
                while done < length // 4:
                    h = _murmur_block(scratch, start + 4 * done, h)
                    done += 1
                u = _murmur_finish(scratch, start, length, h)
                # FeatureHasher's fold of the signed int32 hash, abs(u) % n_buckets, without a branch: the magnitude
                # of a negative u is 2**32 - u. Its rule for -2**31 (2**31 - 1 - (n_buckets - 1), mod n_buckets)
                # is 2**31 mod n_buckets, which is what the magnitude gives.
                negative = u >> np.uint64(31)
                magnitude = ((u ^ (negative * _M)) + negative) & _M
                row_buckets[m] = magnitude & mask if power_of_two else magnitude % buckets
                m += 1
        # The row's buckets in increasing order (radix sort: low digit, then high; stable), then each run counted.
        _radix_pass(row_buckets, sorted_buckets, m, histogram, 0, 1 << low_bits)
        _radix_pass(sorted_buckets, row_buckets, m, histogram, low_bits, 1 << (bits - low_bits))
        first = nnz
        squares = 0.0
        q = 0
        while q < m:
            bucket = row_buckets[q]
            k = q + 1
            while k < m and row_buckets[k] == bucket:
                k += 1
            count = k - q
            indices[nnz] = bucket
            values[nnz] = count
            squares += count * count
            nnz += 1
            q = k
        if squares > 0:  # sklearn's inplace_csr_row_normalize_l2: integer counts, so every order sums exactly
            norm = np.sqrt(squares)
            for q in range(first, nnz):
                values[q] /= norm
        indptr[r + 1] = nnz
    return indptr, indices[:nnz].copy(), values[:nnz].copy()


@njit(cache=True, inline="always")
def _radix_pass(source, target, m, histogram, shift, digits):
    """Stable counting sort of ``source[:m]`` into ``target[:m]`` by the digit ``(value >> shift) % digits``
    (``digits`` a power of two, ``histogram`` at least ``digits + 1`` long; only that much of it is touched)."""
    mask = digits - 1
    for v in range(digits + 1):
        histogram[v] = 0
    for q in range(m):
        histogram[((source[q] >> shift) & mask) + 1] += 1
    for v in range(digits):
        histogram[v + 1] += histogram[v]
    for q in range(m):
        digit = (source[q] >> shift) & mask
        target[histogram[digit]] = source[q]
        histogram[digit] += 1


@njit(cache=True)
def add_dense_products(out, block, coef):
    """``out[i, c] += block[i, k] * coef[c, k]`` for k in increasing order, skipping zeros of ``block``: the rounding
    of scipy's CSR product (row by row, stored entries in column order) over a block appended after the sparse one.
    ``out`` (n, classes) and ``coef`` (classes, block columns) float64, ``block`` (n, block columns) float64."""
    for i in range(out.shape[0]):
        for k in range(block.shape[1]):
            a = block[i, k]
            if a != 0.0:
                for c in range(out.shape[1]):
                    out[i, c] += a * coef[c, k]


# ---- AMA segments (curation.segments) -----------------------------------------------------------------------------
#
# :func:`segment_bounds` is :func:`curation.segments.split_segments` over a batch, the same segments to the offset:
# it walks each text's code points as re walks the splitter's patterns, reading re's character classes from a table
# indexed by code point (:func:`curation.segments._char_classes`). :func:`merged_spans` is
# :func:`curation.segments._merged_spans` (hysteresis, then runs merged) over every response of a batch.

#: Bits of the character-class table: Python re's ``\s``, ``\w``, ``\d`` (str patterns), ``str.isspace``, and the
#: sentence end's ``[.!?]`` and closing ``[\"')\]]`` (a table lookup tests a character faster than a chain of
#: comparisons).
SPACE, WORD, DIGIT, ISSPACE, END, CLOSE = 1, 2, 4, 8, 16, 32


@njit(cache=True)
def segment_bounds(chars, offsets, classes):
    """:func:`curation.segments.split_segments` of each text: flat ``(starts, ends)`` (int64, character offsets
    within its text) and ``counts`` (int64, n + 1: text r's segments are ``counts[r]:counts[r + 1]``).

    ``chars`` (uint32) holds the texts' code points back to back, ``offsets`` (int64, n + 1) where each text starts
    and ends, ``classes`` (uint8, indexed by code point, covering every code point in ``chars``) the
    :data:`SPACE` / :data:`WORD` / :data:`DIGIT` / :data:`ISSPACE` / :data:`END` / :data:`CLOSE` bits of each
    character.
    """
    n = len(offsets) - 1
    starts = np.empty(max(16, len(chars) // 32), np.int64)
    ends = np.empty(len(starts), np.int64)
    counts = np.zeros(n + 1, np.int64)
    m = 0
    for r in range(n):
        m = _split_text(chars, classes, offsets[r], offsets[r + 1], starts, ends, counts[r])
        if m > len(starts):  # the arrays were full: grown, and the text split again
            size = max(2 * len(starts), m)
            starts = np.concatenate((starts[:counts[r]], np.empty(size - counts[r], np.int64)))
            ends = np.concatenate((ends[:counts[r]], np.empty(size - counts[r], np.int64)))
            m = _split_text(chars, classes, offsets[r], offsets[r + 1], starts, ends, counts[r])
        counts[r + 1] = m
    return starts[:m].copy(), ends[:m].copy(), counts


@njit(cache=True)
def text_segment_bounds(chars, classes):
    """:func:`segment_bounds` of one text (all of ``chars``), flat as ``start, end, start, end, ...``: one array in
    and one out, for :func:`curation.segments.split_segments` (each array passed or returned costs a call ~0.3 µs)."""
    offsets = np.zeros(2, np.int64)
    offsets[1] = len(chars)
    starts, ends, _ = segment_bounds(chars, offsets, classes)
    bounds = np.empty(2 * len(starts), np.int64)
    bounds[0::2] = starts
    bounds[1::2] = ends
    return bounds


@njit(cache=True)
def _split_text(chars, classes, base, stop, starts, ends, m):
    """Add the segments of ``chars[base:stop]`` from ``m`` on; returns the new count (past the arrays' end where
    they are full: only what fits is written). The arrays are arguments, never reassigned here: an array variable
    reassigned inside a loop costs numba reference counting at every character."""
    # Code blocks (```.*?(?:```|\Z), DOTALL): from a fence to the next one, or to the end of the text; the prose
    # before each is split into list items and sentences.
    cursor = base
    while True:
        fence = _find_fence(chars, cursor, stop)
        if fence < 0:
            break
        close = _find_fence(chars, fence + 3, stop)
        block_end = stop if close < 0 else close + 3
        m = _split_prose(chars, classes, base, cursor, fence, starts, ends, m)
        m = _add_trimmed(chars, classes, base, fence, block_end, starts, ends, m)
        cursor = block_end
    return _split_prose(chars, classes, base, cursor, stop, starts, ends, m)


@njit(cache=True, inline="always")
def _find_fence(chars, start, stop):
    """The first ``i >= start`` where three backticks start and end by ``stop``, or -1."""
    for i in range(start, stop - 2):
        if chars[i] == 96 and chars[i + 1] == 96 and chars[i + 2] == 96:
            return i
    return -1


@njit(cache=True)
def _add_trimmed(chars, classes, base, start, end, starts, ends, m):
    """Append ``chars[start:end]`` less leading and trailing ``str.isspace`` characters, if anything is left, as
    offsets from ``base``, where the arrays have room; returns ``m`` counted on."""
    while start < end and classes[chars[start]] & ISSPACE:
        start += 1
    while end > start and classes[chars[end - 1]] & ISSPACE:
        end -= 1
    if start < end:
        if m < len(starts):
            starts[m] = start - base
            ends[m] = end - base
        m += 1
    return m


@njit(cache=True)
def _is_list_item(chars, classes, base, p, end):
    """Whether ``_LIST_ITEM`` (``^[ \\t]*(?:\\d{1,3}[.)]|[-*•+]|[a-zA-Z][.)])[ \\t]+``, MULTILINE) matches at ``p``
    with ``end`` as ``endpos``: ``^`` holds at the text's start and after a newline only."""
    if p >= end or (p != base and chars[p - 1] != 10):
        return False
    q = p
    while q < end and (chars[q] == 32 or chars[q] == 9):
        q += 1
    if q >= end:
        return False
    c = chars[q]
    if classes[c] & DIGIT:
        digits = 0
        while q < end and classes[chars[q]] & DIGIT and digits < 4:
            q += 1
            digits += 1
        if digits > 3 or q >= end or (chars[q] != 46 and chars[q] != 41):  # no backtracking into \d{1,3} helps
            return False
        q += 1
    elif c == 45 or c == 42 or c == 0x2022 or c == 43:
        q += 1
    elif (65 <= c <= 90 or 97 <= c <= 122) and q + 1 < end and (chars[q + 1] == 46 or chars[q + 1] == 41):
        q += 2
    else:
        return False
    return q < end and (chars[q] == 32 or chars[q] == 9)


@njit(cache=True)
def _split_prose(chars, classes, base, start, end, starts, ends, m):
    """``curation.segments._split_prose``: pieces end before a line that starts a list item, after a line that is
    one, and at a blank line; an item piece is one segment, the others are split into sentences."""
    line_start = block_start = start
    line_item = block_item = _is_list_item(chars, classes, base, start, end)
    while True:
        line_end = line_start
        blank = True
        while line_end < end:
            c = chars[line_end]
            if c == 10:
                break
            if blank and not classes[c] & ISSPACE:
                blank = False
            line_end += 1
        if line_end >= end:  # the last line, not followed by a newline
            break
        next_start = line_end + 1
        next_item = _is_list_item(chars, classes, base, next_start, end)
        if next_item or line_item or blank:
            m = _split_piece(chars, classes, base, block_start, line_end, block_item, starts, ends, m)
            block_start, block_item = next_start, next_item
        line_start, line_item = next_start, next_item
    return _split_piece(chars, classes, base, block_start, end, block_item, starts, ends, m)


@njit(cache=True)
def _split_piece(chars, classes, base, start, end, item, starts, ends, m):
    """One piece of prose: a list item whole, or split after each ``_SENTENCE_END`` match found in
    ``[start, end)``."""
    if item:
        return _add_trimmed(chars, classes, base, start, end, starts, ends, m)
    cursor = p = start
    while p < end:
        if classes[chars[p]] & END and not _abbreviation(chars, classes, base, p):
            # [.!?]*[\"')\]]*(?=\s): no backtracking can help (what it gives back is no whitespace), and a match
            # starting at a later [.!?] of this run would end, or fail, at the same place: the search goes on there.
            q = p + 1
            while q < end and classes[chars[q]] & END:
                q += 1
            while q < end and classes[chars[q]] & CLOSE:
                q += 1
            if q < end and classes[chars[q]] & SPACE:  # the lookahead sees nothing past endpos
                m = _add_trimmed(chars, classes, base, cursor, q, starts, ends, m)
                cursor = q
            p = q
        else:
            p += 1
    return _add_trimmed(chars, classes, base, cursor, end, starts, ends, m)


@njit(cache=True, inline="always")
def _word_boundary_before(chars, classes, base, i):
    """``\\b`` before the word character at ``i``: the text starts there or the character before is no ``\\w``
    (lookbehinds read before ``pos``, back to the text's start)."""
    return i == base or not classes[chars[i - 1]] & WORD


@njit(cache=True)
def _abbreviation(chars, classes, base, p):
    """Whether one of ``_SENTENCE_END``'s lookbehinds (``\\be\\.g``, ``\\bi\\.e``, ``\\bMrs``; ``\\bvs``, ``\\bMr``,
    ``\\bDr``, ``\\bSt``, case-sensitive) rules out a sentence end at the ``[.!?]`` at ``p``."""
    if p - base >= 3 and _word_boundary_before(chars, classes, base, p - 3):
        a, b, c = chars[p - 3], chars[p - 2], chars[p - 1]
        if (b == 46 and ((a == 101 and c == 103) or (a == 105 and c == 101))) or (a == 77 and b == 114 and c == 115):
            return True
    if p - base >= 2 and _word_boundary_before(chars, classes, base, p - 2):
        a, b = chars[p - 2], chars[p - 1]
        if (a == 118 and b == 115) or (b == 114 and (a == 77 or a == 68)) or (a == 83 and b == 116):
            return True
    return False


@njit(cache=True)
def merged_spans(starts, ends, scores, counts, high, low):
    """``curation.segments._merged_spans`` of each response: hysteresis states of its segments' ``scores``
    (float64), consecutive segments in the same non-zero state merged into one span.

    ``starts``, ``ends``, ``counts`` as :func:`segment_bounds` gives them. Returns flat span ``(starts, ends)``
    (int64), ``signs`` (int8) and span ``counts`` (int64, n + 1) per response.
    """
    n = len(counts) - 1
    span_starts = np.empty(len(starts), np.int64)
    span_ends = np.empty(len(starts), np.int64)
    signs = np.empty(len(starts), np.int8)
    span_counts = np.zeros(n + 1, np.int64)
    m = 0
    for r in range(n):
        state = 0
        for k in range(counts[r], counts[r + 1]):
            score = scores[k]
            previous = state
            if state == 1 and score <= low:
                state = 0
            elif state == -1 and score >= -low:
                state = 0
            if state == 0:
                if score >= high:
                    state = 1
                elif score <= -high:
                    state = -1
            if state != 0 and state == previous:  # same run: merge, covering the whitespace between segments
                span_ends[m - 1] = ends[k]
            elif state != 0:
                span_starts[m] = starts[k]
                span_ends[m] = ends[k]
                signs[m] = state
                m += 1
        span_counts[r + 1] = m
    return span_starts[:m].copy(), span_ends[:m].copy(), signs[:m].copy(), span_counts
