"""AMA spans (character offsets into a response) → per-token masks.

The contract's rule: a response token gets mask 1 unless
- it is in ``chosen`` and overlaps a ``sign = -1`` span (do not reinforce bad segments of a good answer), or
- it is in ``rejected`` and overlaps a ``sign = +1`` span (do not punish good segments of a bad answer).

A span that straddles a token boundary masks every token it touches. Tokens that cover no character
(zero-width offsets) are never masked. The functions here are pure so they can be property-tested.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

#: Which span sign masks tokens on each side of a pair.
MASKED_SIGN = {"chosen": -1, "rejected": +1}


def spans_with_sign(spans: Iterable[Mapping[str, int]] | None, sign: int) -> list[tuple[int, int]]:
    """The ``(start, end)`` of every non-empty span with the given sign."""
    return [(int(s["start"]), int(s["end"])) for s in spans or () if int(s["sign"]) == sign and s["end"] > s["start"]]


def token_mask(
    offsets: Sequence[tuple[int, int]],
    masked_ranges: Sequence[tuple[int, int]],
    shift: int = 0,
) -> list[int]:
    """1 for each token, 0 where its character range overlaps one of ``masked_ranges``.

    ``offsets`` are the tokens' ``(start, end)`` character offsets in the tokenised text; ``masked_ranges``
    are in response coordinates and ``shift`` is where the response starts in that text.
    Overlap is strict (``token_start < range_end and token_end > range_start``), so touching is not overlapping.
    """
    # An empty range covers no character, so it must not mask the token around its position.
    ranges = sorted((start + shift, end + shift) for start, end in masked_ranges if end > start)
    if not ranges:
        return [1] * len(offsets)
    mask = []
    for token_start, token_end in offsets:
        hit = token_end > token_start and any(token_start < end and token_end > start for start, end in ranges)
        mask.append(0 if hit else 1)
    return mask


def response_token_mask(
    offsets: Sequence[tuple[int, int]],
    spans: Iterable[Mapping[str, int]] | None,
    side: str,
    response_start: int,
) -> list[int]:
    """The AMA mask of the response tokens of one side (``"chosen"`` or ``"rejected"``) of a pair."""
    return token_mask(offsets, spans_with_sign(spans, MASKED_SIGN[side]), shift=response_start)


def truncate_like_collator(values: list[int], max_length: int | None, truncation_mode: str) -> list[int]:
    """Cut a per-position list the way TRL's ``DataCollatorForPreference`` cuts prompt+completion ids."""
    if max_length is None:
        return values
    return values[:max_length] if truncation_mode == "keep_start" else values[-max_length:]
