"""Read raw JSONL into normalised rows; every line becomes a row or a reject with a reason.

Accepted shapes (``shared/design/mix-contract.md``): preference pair, conversational pair (TRL
style), hh-rlhf dialogue, single response, prompt only. Plain and gzip files and ``-`` (stdin).
Nothing is dropped silently: a line that cannot be used is yielded as a :class:`Reject`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from equi.jsonl import BadJSON, loads_line

HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"


class InputError(ValueError):
    """An input problem the user must fix (missing file, bad line under --strict)."""


@dataclass
class RawRow:
    """One usable input line, normalised to the contract's text columns."""

    id: str
    source: str
    source_line: int
    shape: str
    prompt: str
    chosen: str | None = None
    rejected: str | None = None
    response: str | None = None
    category: str | None = None
    severity: str | None = None
    is_safe: bool | None = None
    image: str | None = None  # path, URL or base64 of the image the prompt refers to (BeaverTails-V style)
    image_severity: str | None = None


@dataclass
class Reject:
    """One input line that could not be used, and why."""

    file: str
    line: int
    reason: str
    raw: str

    def to_json(self) -> str:
        return json.dumps({"file": self.file, "line": self.line, "reason": self.reason, "raw": self.raw},
                          ensure_ascii=False)


@dataclass
class ReadStats:
    lines_by_file: dict[str, int] = field(default_factory=dict)


def content_id(*parts: str | None) -> str:
    """Stable content hash of a row's texts: equal content, equal id."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(b"\x1f" if part is None else b"\x1e" + part.encode("utf-8"))
    return digest.hexdigest()[:20]


class ShapeError(ValueError):
    """A JSON object that matches none of the accepted shapes."""


def _text(obj: dict, key: str, required: bool = True) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise ShapeError(f"missing field {key!r}")
        return None
    if not isinstance(value, str):
        raise ShapeError(f"field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ShapeError(f"field {key!r} is empty")
    return value


def _messages_text(messages: Any, key: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ShapeError(f"field {key!r} must be a non-empty list of {{role, content}} messages")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ShapeError(f"field {key!r} must hold {{role: str, content: str}} messages")
    return messages


def _render_turns(messages: list[dict]) -> str:
    """A multi-turn prompt as one string; a single user turn stays as it is."""
    if len(messages) == 1:
        return messages[0]["content"]
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "\n\n".join(f"{names.get(m['role'], m['role'].title())}: {m['content']}" for m in messages)


def _implicit_prompt(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """TRL's implicit-prompt pair (no ``prompt``): the messages ``chosen`` and ``rejected`` share from the start
    are the prompt, the rest are the answers."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise ShapeError("no 'prompt' field, and 'chosen' and 'rejected' do not start with the same messages "
                         "(TRL's implicit prompt)")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _split_hh(transcript: str, key: str) -> tuple[str, str]:
    cut = transcript.rfind(HH_ASSISTANT)
    if cut < 0 or HH_HUMAN not in transcript[:cut + 1]:
        raise ShapeError(f"field {key!r} is not a 'Human: … Assistant: …' transcript")
    return transcript[:cut], transcript[cut + len(HH_ASSISTANT):].strip()


def _hh_prompt(prefix: str) -> str:
    """``\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c`` → ``a`` for one turn, a 'Human:/Assistant:' transcript otherwise."""
    text = prefix.strip()
    if text.count("Human:") == 1 and "Assistant:" not in text:
        return text[len("Human:"):].strip()
    return text


def detect_shape(obj: dict) -> str:
    if "chosen" in obj and "rejected" in obj:
        if isinstance(obj.get("chosen"), list) or isinstance(obj.get("prompt"), list):
            return "conversation"
        if "prompt" in obj:
            return "pair"
        return "hh"
    if "response" in obj:
        return "single"
    if "prompt" in obj:
        return "prompt"
    raise ShapeError("no known shape: expected prompt/chosen/rejected, chosen/rejected transcripts, "
                     "prompt/response or prompt")


def normalise(obj: Any, shape: str, source: str, line: int) -> RawRow:
    """Turn one parsed JSON line into a :class:`RawRow`, or raise :class:`ShapeError`."""
    if not isinstance(obj, dict):
        raise ShapeError(f"line is JSON {type(obj).__name__}, not an object")
    if shape == "auto":
        shape = detect_shape(obj)
    chosen = rejected = response = None
    if shape == "pair":
        prompt, chosen, rejected = _text(obj, "prompt"), _text(obj, "chosen"), _text(obj, "rejected")
    elif shape == "conversation":
        raw_prompt = obj.get("prompt")
        chosen_msgs = _messages_text(obj.get("chosen"), "chosen")
        rejected_msgs = _messages_text(obj.get("rejected"), "rejected")
        if raw_prompt is None:  # TRL's implicit prompt: the conversation both answers share
            prompt_msgs, chosen_msgs, rejected_msgs = _implicit_prompt(chosen_msgs, rejected_msgs)
        else:
            prompt_msgs = [{"role": "user", "content": raw_prompt}] if isinstance(raw_prompt, str) else \
                _messages_text(raw_prompt, "prompt")
        prompt = _render_turns(prompt_msgs)
        chosen, rejected = chosen_msgs[-1]["content"], rejected_msgs[-1]["content"]
        if chosen_msgs[-1]["role"] != "assistant" or rejected_msgs[-1]["role"] != "assistant":
            raise ShapeError("the last message of 'chosen' and 'rejected' must be the assistant's")
    elif shape == "hh":
        c_prefix, chosen = _split_hh(_text(obj, "chosen"), "chosen")
        r_prefix, rejected = _split_hh(_text(obj, "rejected"), "rejected")
        if c_prefix != r_prefix:
            raise ShapeError("'chosen' and 'rejected' transcripts do not share the same conversation before "
                             "the last answer")
        prompt = _hh_prompt(c_prefix)
    elif shape == "single":
        prompt, response = _text(obj, "prompt"), _text(obj, "response")
    elif shape == "prompt":
        prompt = _text(obj, "prompt")
    else:  # pragma: no cover - guarded by CurateConfig
        raise ShapeError(f"unknown shape {shape!r}")
    if not prompt or not prompt.strip():
        raise ShapeError("prompt is empty")
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if shape in ("pair", "conversation", "hh") and not (value and value.strip()):
            raise ShapeError(f"{name} answer is empty")
    is_safe = obj.get("is_safe")
    if is_safe is not None and not isinstance(is_safe, bool):
        raise ShapeError(f"field 'is_safe' must be true/false, got {is_safe!r}")
    extras = {}
    for key in ("category", "severity", "image", "image_severity"):
        value = obj.get(key)
        if value is not None and not isinstance(value, str):
            raise ShapeError(f"field {key!r} must be a string, got {type(value).__name__}")
        extras[key] = value or None
    severity = extras["severity"]
    if severity is not None:
        severity = severity.strip().lower()
        if severity not in ("minor", "moderate", "severe"):
            raise ShapeError(f"field 'severity' must be minor, moderate or severe, got {extras['severity']!r}")
    image, image_severity = extras["image"], extras["image_severity"]
    if image is not None and not image.strip():
        image = None
    if image_severity is not None:
        image_severity = image_severity.strip().lower()
        if image_severity not in ("minor", "moderate", "severe"):
            raise ShapeError(f"field 'image_severity' must be minor, moderate or severe, got {extras['image_severity']!r}")
    return RawRow(
        id=str(obj["id"]) if isinstance(obj.get("id"), (str, int)) and str(obj["id"]).strip()
        else (content_id(prompt, chosen, rejected, response) if image is None
              else content_id(prompt, chosen, rejected, response, image)),
        source=obj["source"] if isinstance(obj.get("source"), str) and obj["source"].strip() else source,
        source_line=line,
        shape=shape,
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        response=response,
        category=extras["category"],
        severity=severity,
        is_safe=is_safe,
        image=image,
        image_severity=image_severity,
    )


def _open_lines(path: str) -> Iterator[bytes]:
    """Raw lines of a file (gzip by magic number) or stdin, as bytes."""
    if path == "-":
        yield from sys.stdin.buffer
        return
    p = Path(path)
    if not p.exists():
        raise InputError(f"{path}: no such file")
    if p.is_dir():
        raise InputError(f"{path}: is a directory, expected a JSONL file")
    with open(p, "rb") as fh:
        magic = fh.read(2)
    if magic == b"\x1f\x8b":
        with gzip.open(p, "rb") as fh:  # buffered already; a second buffer would lose its lines at a truncation
            yield from fh
    else:
        with open(p, "rb") as fh:
            yield from fh


@dataclass(frozen=True)
class RawLine:
    """One input line as read, not yet parsed (what a worker process is handed)."""

    file: str
    line: int
    raw: bytes


def read_rows(paths: list[str], shape: str = "auto", strict: bool = False,
              stats: ReadStats | None = None) -> Iterator[RawRow | Reject]:
    """Yield a :class:`RawRow` or a :class:`Reject` for every line of every input.

    With ``strict`` the first bad line raises :class:`InputError` (``file:line: reason``).
    ``stats.lines_by_file`` counts the lines seen per file (a truncated gzip counts its broken tail as one).
    """
    return parse_lines(read_lines(paths, strict, stats), shape, strict)


def read_lines(paths: list[str], strict: bool = False, stats: ReadStats | None = None) -> Iterator[RawLine | Reject]:
    """:func:`read_rows` without the parsing: every line as a :class:`RawLine` (a corrupt gzip tail as a Reject)."""
    stats = stats if stats is not None else ReadStats()
    for path in paths:
        name = "<stdin>" if path == "-" else path
        line_no = 0
        stats.lines_by_file[name] = 0
        lines = _open_lines(path)
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                break
            except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
                line_no += 1
                stats.lines_by_file[name] = line_no
                reject = Reject(name, line_no, f"truncated or corrupt gzip stream: {exc}", "")
                if strict:
                    raise InputError(f"{name}:{line_no}: {reject.reason}") from None
                yield reject
                break
            line_no += 1
            stats.lines_by_file[name] = line_no
            yield RawLine(name, line_no, raw)


def parse_lines(lines: Iterable[RawLine | Reject], shape: str = "auto",
                strict: bool = False) -> Iterator[RawRow | Reject]:
    """Each :class:`RawLine` parsed into a :class:`RawRow` or a :class:`Reject`; Rejects pass through.

    With ``strict`` the first line that cannot be used raises :class:`InputError` (``file:line: reason``).
    """
    for item in lines:
        if isinstance(item, RawLine):
            item = _parse_line(item.raw, item.file, item.line, shape)
            if strict and isinstance(item, Reject):
                raise InputError(f"{item.file}:{item.line}: {item.reason}")
        yield item


def _parse_line(raw: bytes, name: str, line_no: int, shape: str) -> RawRow | Reject:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Reject(name, line_no, f"not valid UTF-8 ({exc.reason} at byte {exc.start})",
                      raw.decode("utf-8", errors="replace").rstrip("\r\n"))
    text = text.rstrip("\r\n")
    if not text.strip():
        return Reject(name, line_no, "empty line", text)
    try:
        obj = loads_line(text)
    except BadJSON as exc:
        where = f" (column {exc.column})" if exc.column is not None else ""
        return Reject(name, line_no, f"invalid JSON: {exc.reason}{where}", text)
    try:
        if _ESCAPED_SURROGATE.search(text):
            _check_unicode(obj)
        return normalise(obj, shape, name, line_no)
    except ShapeError as exc:
        return Reject(name, line_no, str(exc), text)


#: A JSON escape of a UTF-16 surrogate (\ud800-\udfff): the only way a line that is valid UTF-8 can hold one.
_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


def _check_unicode(obj: Any) -> None:
    """Refuse a line whose fields hold a lone surrogate (half of an escaped UTF-16 pair, e.g. a cut emoji): no
    encoder, hash or Parquet file takes it. A whole pair (``\\ud83d\\ude00``) decodes to one character and passes;
    fields equi does not read (``meta`` …) are not looked at."""
    if not isinstance(obj, dict):
        return
    for key in _READ_FIELDS:
        for value in _strings(obj.get(key)):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ShapeError(f"field {key!r} holds a lone surrogate {value[exc.start]!r} at character {exc.start} "
                                 "(half of an escaped UTF-16 pair): not valid Unicode") from None


_READ_FIELDS = ("id", "source", "prompt", "chosen", "rejected", "response", "category", "severity", "image",
                "image_severity")


def _strings(value: Any) -> Iterator[str]:
    """Every string in a field's value (a text, or messages as lists of dicts)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
