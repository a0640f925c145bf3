"""The curation stage's step functions over one batch of rows, and the per-process scorer that runs them.

Each step is pure apart from the models passed in, so both engines run the same code: the local engine
(:mod:`curation.engine_local`) in this process or its worker processes, the Ray engine
(:mod:`curation.engine_ray`) in its actors. :class:`BatchScorer` is what such a process holds: the embedder
and categoriser, loaded once, and the batch's scoring.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import polars as pl

from equi.config import CurateConfig
from equi.messages import MESSAGES
from equi.progress import quiet_transformers

from curation.categorise import Categoriser, categorise
from curation.embed import STATIC_EMBEDDER, EmbedderError, get_embedder, resolve_device
from curation.embed_cache import CachedEmbedder, EmbeddingCache
from curation.guard_labels import GuardLabeller, guard_costs, guard_harm, load_guard_labeller
from curation.judge import Judge, apply_judge, load_judge
from curation.mixer import eval_split, prompt_key
from curation.readers import InputError, RawRow, Reject
from curation.refusal import refusal_scores
from curation.segments import pair_span_columns, withheld_scores


def rows_to_frame(rows: list[RawRow]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "id": [r.id for r in rows],
            "source": [r.source for r in rows],
            "source_line": [r.source_line for r in rows],
            "kind": [_kind(r.shape) for r in rows],
            "prompt": [r.prompt for r in rows],
            "chosen": [r.chosen for r in rows],
            "rejected": [r.rejected for r in rows],
            "response": [r.response for r in rows],
            "category": [r.category for r in rows],
            "severity": [r.severity for r in rows],
            "is_safe": [r.is_safe for r in rows],
            "image": [r.image for r in rows],
            "image_severity": [r.image_severity for r in rows],
            "prompt_messages": [r.prompt_messages for r in rows],
        },
        schema={"id": pl.String, "source": pl.String, "source_line": pl.Int64, "kind": pl.String,
                "prompt": pl.String, "chosen": pl.String, "rejected": pl.String, "response": pl.String,
                "category": pl.String, "severity": pl.String, "is_safe": pl.Boolean,
                "image": pl.String, "image_severity": pl.String, "prompt_messages": MESSAGES},
    )


def _kind(shape: str) -> str:
    return {"pair": "pair", "conversation": "pair", "hh": "pair", "single": "single"}.get(shape, "prompt")


def score_refusals(frame: pl.DataFrame) -> pl.DataFrame:
    """``*_refusal``: probability that each response refuses (null where there is no response).

    One call over the three response columns, so a text repeated across them is scored once.
    """
    columns = ("chosen", "rejected", "response")
    present = {c: frame[c].is_not_null().to_numpy() for c in columns}
    texts = [t for c in columns for t in frame[c].drop_nulls().to_list()]
    scores = refusal_scores(texts) if texts else np.zeros(0, dtype=np.float32)
    out, offset = {}, 0
    for column in columns:
        column_scores = np.full(frame.height, np.nan, dtype=np.float32)
        n = int(present[column].sum())
        column_scores[present[column]] = scores[offset:offset + n]
        offset += n
        out[f"{column}_refusal"] = pl.Series(column_scores).fill_nan(None).cast(pl.Float32)
    return frame.with_columns(**out)


def score_costs(frame: pl.DataFrame) -> pl.DataFrame:
    """``*_cost`` (> 0 unsafe): from ``is_safe`` labels where present, else prompt harm × not withholding.

    ``2·harm·(1 − withheld) − 1`` is +1 for full compliance with a surely harmful prompt, −1 for a
    refusal or for any answer to a benign prompt, and crosses 0 where harm × (1 − withheld) = 0.5. ``withheld``
    (:func:`curation.segments.withheld_scores`) is ``*_refusal`` less what follows a refusal opening: "I can't
    help with that. ... Step 1: ..." refuses in ``*_refusal``'s sense (any refusal, as XSTest counts it) but gives
    the content, so it costs as compliance. One call over the three response columns.
    """
    harm = pl.col("harm_score")
    columns = ("chosen", "rejected", "response")
    texts = [t for c in columns for t in frame[c].to_list()]
    refusals = np.concatenate([frame[f"{c}_refusal"].cast(pl.Float32).fill_null(0.0).to_numpy() for c in columns])
    withheld = withheld_scores(texts, refusals) if texts else np.zeros(0, dtype=np.float32)

    def estimate(k: int, column: str) -> pl.Expr:
        kept = pl.Series(withheld[k * frame.height:(k + 1) * frame.height], dtype=pl.Float32)
        value = (2 * harm * (1 - pl.lit(kept)) - 1).cast(pl.Float32)
        return pl.when(pl.col(f"{column}_refusal").is_null()).then(None).otherwise(value)

    labelled = pl.when(pl.col("is_safe")).then(pl.lit(-1.0)).otherwise(pl.lit(1.0)).cast(pl.Float32)
    return frame.with_columns(
        chosen_cost=estimate(0, "chosen"),
        rejected_cost=estimate(1, "rejected"),
        response_cost=pl.when(pl.col("is_safe").is_not_null()).then(labelled).otherwise(estimate(2, "response")),
    )


def score_spans(frame: pl.DataFrame) -> pl.DataFrame:
    """AMA key segments for chosen and rejected answers (one call over both)."""
    return frame.with_columns(*pair_span_columns(frame["harm_score"].to_list(), frame["chosen"].to_list(),
                                                 frame["rejected"].to_list()))


def text_for_embedding(prompt: str) -> str:
    """What the encoder sees of a prompt: the user's turns of a multi-turn transcript.

    The assistant's earlier turns say little about the request's risk and would push the user's
    words past the encoder's token limit.
    """
    if not prompt.startswith("Human:"):
        return prompt
    turns = [t for t in prompt.split("\n\n") if t.startswith("Human:")]
    return " ".join(t[len("Human:"):].strip() for t in turns) or prompt


def score_batch(rows: list[RawRow], embed: Callable[[list[str]], np.ndarray],
                categoriser, labellers: Labellers | None = None) -> tuple[pl.DataFrame, np.ndarray]:
    """All per-row columns of the contract except ``cluster`` and ``split``, plus the prompt embeddings."""
    embeddings = embed(prompt_texts(rows))
    return score_rows(rows, embeddings, categoriser, labellers), embeddings


def prompt_texts(rows: list[RawRow]) -> list[str]:
    """What the encoder embeds, one text per row."""
    return [text_for_embedding(r.prompt) for r in rows]


def score_rows(rows: list[RawRow], embeddings: np.ndarray, categoriser, labellers: Labellers | None = None) -> pl.DataFrame:
    """:func:`score_batch` once the prompt embeddings are known (the local engine computes them ahead)."""
    labellers = labellers or Labellers()
    frame = rows_to_frame(rows)
    frame = categorise(frame, embeddings, categoriser, harm=guard_harm(frame, labellers.guard))
    frame = apply_judge(frame, labellers.judge)
    frame = score_refusals(frame)
    frame = guard_costs(score_costs(frame), labellers.guard)
    return score_spans(frame)


def stage_batch(rows: list[RawRow], embed: Callable[[list[str]], np.ndarray], categoriser,
                eval_fraction: float, labellers: Labellers | None = None) -> tuple[pl.DataFrame, np.ndarray]:
    """One batch's staged rows (:func:`score_batch` plus ``split``) and its float16 prompt embeddings."""
    return stage_rows(rows, embed(prompt_texts(rows)), categoriser, eval_fraction, labellers)


def stage_rows(rows: list[RawRow], embeddings: np.ndarray, categoriser,
               eval_fraction: float, labellers: Labellers | None = None) -> tuple[pl.DataFrame, np.ndarray]:
    """:func:`stage_batch` once the prompt embeddings are known.

    Everything downstream sees the embeddings as stored, in float16: the categoriser included, so a run that
    takes them from the embedding cache (float16) writes the same mix as one that encodes them afresh.
    """
    stored = np.asarray(embeddings).astype(np.float16)
    frame = score_rows(rows, stored.astype(np.float32), categoriser, labellers)
    frame = frame.with_columns(pl.Series("split", eval_split(frame["id"].to_list(), eval_fraction)))
    return frame, stored


def batch_meta(frame: pl.DataFrame, start: int) -> pl.DataFrame:
    """The slim metadata the mixer needs for one staged batch whose first row is pool row ``start``."""
    return frame.select(pl.int_range(start, start + frame.height, dtype=pl.Int64).alias("idx"),
                        prompt_key(pl.col("prompt"), pl.col("image")).alias("prompt_key"), "kind", "group",
                        "response_cost", "harm_score", pl.col("image").is_not_null().alias("has_image"),
                        "group_labeller")


def take_rows(batch: list[RawRow | Reject], rejects) -> list[RawRow]:
    """The usable rows of a reader batch; its rejects are written, one JSON line each, to ``rejects``."""
    for item in batch:
        if isinstance(item, Reject):
            rejects.write(item.to_json() + "\n")
    return [item for item in batch if isinstance(item, RawRow)]


# --------------------------------------------------------------------------------------------------
# The models, and the scorer a process holds
# --------------------------------------------------------------------------------------------------

def load_models(config: CurateConfig, embedder=None, categoriser=None):
    """The embedder (behind the embedding cache) and a categoriser fit for its embedding size."""
    if embedder is None:  # the static embedder does not import transformers: nothing to silence
        with quiet_transformers(config.quiet and config.embedder != STATIC_EMBEDDER):
            embedder = get_embedder(config.embedder, config.device)
    if config.embedding_cache:
        embedder = CachedEmbedder(embedder, EmbeddingCache(getattr(embedder, "identity", embedder.name), embedder.dim))
    if categoriser is None:
        try:
            categoriser = (Categoriser.load(config.categoriser) if config.categoriser
                           else Categoriser.default_for(config.embedder))
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot load categoriser {config.categoriser}: {exc}") from None
    if categoriser.embedding_dim != embedder.dim:
        raise EmbedderError(
            f"the categoriser was fit on {categoriser.embedding_dim}-dimensional embeddings "
            f"({categoriser.embedder or 'unknown embedder'}) but --embedder {embedder.name} gives {embedder.dim}: "
            f"fit one with `equi fit-categoriser LABELLED.jsonl --embedder {embedder.name} --out cat.json` and pass "
            "--categoriser cat.json")
    return embedder, categoriser


class BatchScorer:
    """What a scoring process holds (a local worker process, a Ray actor): the embedder and categoriser, loaded
    once in that process by :func:`load_models`, then one reader batch staged per call (:func:`stage_batch`).

    ``embedder`` and ``categoriser``, when given, are used instead of loading ``config``'s.
    """

    def __init__(self, config: CurateConfig, embedder=None, categoriser=None):
        self.config = config
        self.embedder, self.categoriser = load_models(config, embedder, categoriser)
        self.labellers = configured_labellers(config)

    def stage(self, rows: list[RawRow]) -> tuple[pl.DataFrame, np.ndarray]:
        return stage_batch(rows, self.embedder.encode, self.categoriser, self.config.eval_fraction, self.labellers)


@dataclass
class Labellers:
    """The optional models that take labels over from the built-in heads: ``--judge`` (the group among
    EHD/IHD/MHD, :mod:`curation.judge`) and ``--guard-model`` (prompt harm and answer costs,
    :mod:`curation.guard_labels`)."""

    judge: Judge | None = None
    guard: GuardLabeller | None = None


def configured_labellers(config: CurateConfig) -> Labellers:
    """``--judge`` and ``--guard-model`` loaded (answers cached unless ``--no-cache``); None where not asked for."""
    if not (config.judge or config.guard_model):
        return Labellers()
    device = resolve_device(config.device)  # the encoder's --device: a missing one fails before a model loads
    with quiet_transformers(config.quiet):
        judge = (load_judge(config.judge, quiet=config.quiet, use_cache=config.embedding_cache, device=device)
                 if config.judge else None)
        guard = (load_guard_labeller(config.guard_model, use_cache=config.embedding_cache, device=device)
                 if config.guard_model else None)
    return Labellers(judge=judge, guard=guard)
