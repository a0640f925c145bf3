"""The contract's conversational columns and the text that curation scores.

A mix stores ``prompt``, ``chosen``, ``rejected`` and ``response`` as TRL's conversational messages (lists of
``{role, content}``). Curation scores text: the prompt as one string (a single turn's content, or the turns
rendered ``Human: …\\n\\nAssistant: …``, which is also what a row's id hashes) and each answer's content. Staged
batches keep that text plus ``prompt_messages`` (the prompt's turns; null for a single user turn), and
:func:`to_conversational` turns such a frame into the contract's columns when the pool and the mixture are
written; :func:`to_text` goes back (``equi guard`` reads a mix that way).
"""

from __future__ import annotations

import re
from typing import Any

import polars as pl

MESSAGE = pl.Struct({"role": pl.String, "content": pl.String})
MESSAGES = pl.List(MESSAGE)
ANSWER_COLUMNS: tuple[str, ...] = ("chosen", "rejected", "response")
ROLE_NAMES = {"user": "Human", "assistant": "Assistant", "system": "System"}
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")


def render_turns(messages: list[dict[str, Any]]) -> str:
    """A prompt's messages as one string: a single message is its content, several are ``Name: content`` turns."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n\n".join(f"{ROLE_NAMES.get(m['role'], m['role'].title())}: {m['content']}" for m in messages)


def prompt_text(prompt: Any) -> str:
    """A prompt as one string, as curation scores it: text as given, messages through :func:`render_turns`."""
    if prompt is None:
        return ""
    return prompt if isinstance(prompt, str) else render_turns(list(prompt))


def answer_text(answer: Any) -> str:
    """An answer (chosen, rejected, a completion) as plain text: a string as given, a message its content, a list
    of messages their contents one per line (TRL passes a conversational completion as one assistant message)."""
    if answer is None:
        return ""
    if isinstance(answer, str):
        return answer
    if isinstance(answer, dict):
        return str(answer.get("content") or "")
    return "\n".join(answer_text(m) for m in answer)


def last_user_text(prompt: Any) -> str:
    """The user's request in a prompt: the last user turn of a conversation, or the text given."""
    if isinstance(prompt, list):
        users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return answer_text(users[-1]) if users else answer_text(prompt)
    return answer_text(prompt)


def hh_messages(transcript: str) -> list[dict[str, str]]:
    """The turns of a ``Human: …\\n\\nAssistant: …`` transcript as messages (text before the first turn, if any,
    belongs to the first user turn)."""
    parts = _HH_TURN.split(transcript.strip())
    lead, turns = parts[0].strip(), parts[1:]
    messages = [{"role": "user" if name == "Human" else "assistant", "content": text.strip()}
                for name, text in zip(turns[::2], turns[1::2])]
    if lead:
        if messages and messages[0]["role"] == "user":
            messages[0]["content"] = f"{lead}\n\n{messages[0]['content']}"
        else:
            messages.insert(0, {"role": "user", "content": lead})
    return messages


def _message(role: str | pl.Expr, content: pl.Expr) -> pl.Expr:
    role = pl.lit(role) if isinstance(role, str) else role
    return pl.concat_list(pl.struct(role.alias("role"), content.alias("content")))


def to_conversational(frame: pl.DataFrame) -> pl.DataFrame:
    """Text columns → the contract's messages: ``prompt`` from ``prompt_messages`` (a single user turn where that
    is null), each answer one assistant message (null stays null); ``prompt_messages`` is dropped."""
    prompt = _message("user", pl.col("prompt"))
    if "prompt_messages" in frame.columns:
        prompt = pl.when(pl.col("prompt_messages").is_null()).then(prompt).otherwise(pl.col("prompt_messages"))
    answers = {c: pl.when(pl.col(c).is_null()).then(pl.lit(None, MESSAGES)).otherwise(_message("assistant", pl.col(c)))
               for c in ANSWER_COLUMNS if c in frame.columns}
    out = frame.with_columns(prompt.cast(MESSAGES).alias("prompt"), **{c: e.cast(MESSAGES) for c, e in answers.items()})
    return out.drop("prompt_messages", strict=False)


def to_text(frame: pl.DataFrame) -> pl.DataFrame:
    """The contract's messages → the text curation scores (:func:`render_turns` for the prompt, the last
    message's content for an answer), keeping the prompt's messages as ``prompt_messages``."""
    prompts = frame["prompt"].to_list()
    answers = {c: pl.col(c).list.last().struct.field("content").alias(c) for c in ANSWER_COLUMNS if c in frame.columns}
    return frame.with_columns(
        pl.Series("prompt_messages", prompts, dtype=MESSAGES),
        pl.Series("prompt", [None if p is None else render_turns(p) for p in prompts], dtype=pl.String),
        *answers.values(),
    )
