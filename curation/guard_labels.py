"""``equi curate --guard-model MODEL``: a safety guard decides each prompt's harm and each answer's cost.

The guard is a Llama-Guard-style causal LM (its own chat template; :class:`curation.guard.CausalGuard`) or any
sequence-classification checkpoint (:class:`curation.guard.ClassifierGuard`), loaded by
:func:`curation.guard.load_model_guard`. For every row it is asked twice over:

- the prompt alone (the user's turn, every turn of a multi-turn prompt kept): ``harm_score`` = P(unsafe). The
  categoriser then only says *which* safety group a harmful prompt is in (harm ≥ 0.5: the heads' best of EHD, IHD,
  MHD, OTHER; below: BENIGN); labels carried by the input still win;
- each answer after it (``chosen``, ``rejected``, ``response``): ``*_cost`` = 2·P(unsafe answer) − 1 (> 0 unsafe, the
  contract's sign), in place of equi's harm × (1 − withheld) estimate. An ``is_safe`` label carried by the input
  still wins.

``*_refusal`` stays equi's refusal detector: a guard judges whether an answer is unsafe, not whether it refuses, and
refusal is what the over-refusal curves count. Probabilities are cached by the guard's weights and the
conversation's text (``$EQUI_CACHE/guard``), so a re-run or a resume asks nothing twice; the manifest's
``labellers`` names the guard.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import polars as pl

from curation.judge import AnswerCache

if TYPE_CHECKING:  # curation.guard imports curation.steps, which imports this module
    from curation.guard import ModelGuard

ANSWER_COLUMNS = ("chosen", "rejected", "response")


@dataclass
class GuardLabeller:
    """A loaded guard with its weights ``digest`` and answer cache: ``unsafe(conversations)`` → P(unsafe) each."""

    name: str
    guard: "ModelGuard"
    digest: str
    cache: AnswerCache | None = None

    def unsafe(self, conversations: Sequence[list[dict[str, str]]]) -> np.ndarray:
        """P(the last turn is unsafe) per conversation (same order), each distinct conversation asked once."""
        keys = [json.dumps(c, ensure_ascii=False, sort_keys=True) for c in conversations]
        by_key = dict(zip(keys, conversations))
        known = {k: float(v) for k, v in (self.cache.get(list(by_key)) if self.cache is not None else {}).items()}
        missing = [k for k in by_key if k not in known]
        if missing:
            values = self.guard.unsafe_probability([by_key[k] for k in missing])
            new = {k: float(v) for k, v in zip(missing, values, strict=True)}
            if self.cache is not None:
                self.cache.put({k: repr(v) for k, v in new.items()})
            known.update(new)
        return np.array([known[k] for k in keys], dtype=np.float32)


def load_guard_labeller(model: str, use_cache: bool = True, trust_remote_code: bool = False,
                        device: str | None = None) -> GuardLabeller:
    from curation.embed import answers_digest
    from curation.guard import load_model_guard
    from equi.cache import cache_dir

    guard = load_model_guard(model, trust_remote_code=trust_remote_code, device=device)
    digest = answers_digest(guard.model, guard.tokenizer)
    return GuardLabeller(name=model, guard=guard, digest=digest,
                         cache=AnswerCache(cache_dir() / "guard", digest) if use_cache else None)


def prompt_conversations(frame: pl.DataFrame) -> list[list[dict[str, str]]]:
    """Each row's prompt as chat messages: its ``prompt_messages`` (every turn), else its text as one user turn."""
    from curation.guard import conversation

    turns = frame["prompt_messages"].to_list() if "prompt_messages" in frame.columns else [None] * frame.height
    return [list(m) if m else conversation(p) for p, m in zip(frame["prompt"].to_list(), turns)]


def guard_harm(frame: pl.DataFrame, labeller: GuardLabeller | None) -> np.ndarray | None:
    """P(unsafe) of each row's prompt by the guard (None without one): the categoriser's ``harm`` override."""
    if labeller is None or frame.height == 0:
        return None
    return labeller.unsafe(prompt_conversations(frame))


def guard_costs(frame: pl.DataFrame, labeller: GuardLabeller | None) -> pl.DataFrame:
    """``*_cost`` = 2·P(unsafe answer) − 1 by the guard where there is an answer (``is_safe`` labels kept)."""
    if labeller is None or frame.height == 0:
        return frame
    prompts = prompt_conversations(frame)
    labelled = frame["is_safe"].to_list() if "is_safe" in frame.columns else [None] * frame.height
    asked, where = [], []
    for column in ANSWER_COLUMNS:
        for i, answer in enumerate(frame[column].to_list()):
            # a response whose row carries an is_safe label keeps the label's cost: the guard is not asked
            if answer is not None and not (column == "response" and labelled[i] is not None):
                asked.append(prompts[i] + [{"role": "assistant", "content": answer}])
                where.append((column, i))
    unsafe = labeller.unsafe(asked) if asked else np.zeros(0, np.float32)
    costs = {c: frame[f"{c}_cost"].to_list() for c in ANSWER_COLUMNS}
    for (column, i), p in zip(where, unsafe):
        costs[column][i] = float(2.0 * p - 1.0)
    return frame.with_columns(*(pl.Series(f"{c}_cost", costs[c], pl.Float32) for c in ANSWER_COLUMNS))
