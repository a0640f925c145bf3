"""Helpers shared by the heuristics that count patterns with polars (Rust's regex), and by the encoders.

:func:`distinct_texts`: a batch repeats texts (several answers to one prompt, one prompt in several rows), and
every per-text computation is a function of its text alone, so each distinct text is scored or embedded once.

Rust's regex finds a pattern's literals with a fast prefilter when they come in one case; ``(?i)`` asks it to try
every case variant of every literal, which for a pattern of many alternatives means no prefilter at all and a
2-5× slower scan. The heuristics therefore read lowercased ASCII text with case-sensitive patterns
(:func:`case_folded`) wherever that finds the same matches.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

#: The flag groups :func:`case_folded` rewrites, and what each becomes.
_FOLDED_FLAGS = {"(?i)": "", "(?i-u)": "(?-u)"}


@functools.lru_cache(maxsize=None)
def case_folded(pattern: str) -> str | None:
    """A pattern that starts with ``(?i)`` (or ``(?i-u)``) as the case-sensitive pattern that finds the same matches
    in lowercased ASCII text: its letters lowercased, escapes (``\\b``, ``\\S``) left as they are. None for a pattern
    without the flag, or with ``\\p{..}`` / ``\\x{..}`` escapes, whose names would not survive lowercasing.

    On ASCII text, ``(?i)`` lets a letter match itself in either case and nothing else, so a match of the pattern in
    a text is a match of the folded pattern in the lowercased text, at the same offsets (lowercasing ASCII moves no
    character). Only for text that is all ASCII: ``(?i)`` also folds ``ſ`` onto ``s`` and the Kelvin sign onto ``k``.
    """
    flags = next((f for f in _FOLDED_FLAGS if pattern.startswith(f)), None)
    if flags is None:
        return None
    body, out, i = pattern[len(flags):], [_FOLDED_FLAGS[flags]], 0
    while i < len(body):
        if body[i] == "\\":
            if body[i + 1] in "pPx":
                return None
            out.append(body[i:i + 2])
            i += 2
            continue
        out.append(body[i].lower())
        i += 1
    return "".join(out)


def distinct_texts(strings: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """The distinct strings in first-seen order, and for each string its index among them."""
    first: dict[str, int] = {}
    inverse = np.fromiter((first.setdefault(s, len(first)) for s in strings), dtype=np.int64, count=len(strings))
    return list(first), inverse
