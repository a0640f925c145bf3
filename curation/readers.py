"""Read raw JSONL into normalised rows; every line becomes a row or a reject with a reason.

Accepted shapes (``shared/design/mix-contract.md``): preference pair, conversational pair (TRL
style), hh-rlhf dialogue, single response, prompt only. Plain and gzip files and ``-`` (stdin).
Nothing is dropped silently: a line that cannot be used is yielded as a :class:`Reject`.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import os
import re
import sys
import zlib
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from equi.config import DEFAULT_MAX_LINE_BYTES
from equi.errors import UsageError
from equi.jsonl import BadJSON, loads_line
from equi.messages import hh_messages, render_turns

HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"


class InputError(UsageError):
    """An input problem the user must fix (missing file, bad line under --strict)."""


@dataclass
class RawRow:
    """One usable input line, normalised to the contract's text columns."""

    id: str
    source: str
    source_line: int
    shape: str
    prompt: str  # the text curation scores and the id hashes (several turns rendered by equi.messages.render_turns)
    chosen: str | None = None
    rejected: str | None = None
    response: str | None = None
    category: str | None = None
    severity: str | None = None
    is_safe: bool | None = None
    image: str | None = None  # path, URL or base64 of the image the prompt refers to (BeaverTails-V style)
    image_severity: str | None = None
    #: the prompt's turns in TRL's conversational format; None for a single user turn (``prompt`` is its content)
    prompt_messages: list[dict] | None = None


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


class ShapeError(UsageError):
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


def _shared_start(chosen: list[dict], rejected: list[dict]) -> int:
    """How many messages ``chosen`` and ``rejected`` share from the start, leaving at least one message on each side
    (TRL's implicit-prompt rule)."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    return shared


def _implicit_prompt(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """TRL's implicit-prompt pair (no ``prompt``): the messages ``chosen`` and ``rejected`` share from the start
    are the prompt, the rest are the answers."""
    shared = _shared_start(chosen, rejected)
    if shared == 0:
        raise ShapeError("no 'prompt' field, and 'chosen' and 'rejected' do not start with the same messages "
                         "(TRL's implicit prompt)")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _explicit_prompt(prompt: list[dict], chosen: list[dict],
                     rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """A pair with a ``prompt``: turns that ``chosen`` and ``rejected`` share before their answers belong to the
    prompt (the whole conversation, as TRL's implicit prompt would take it), except a repeat of the prompt itself
    (``prompt`` as a string and the answers as the full conversation, as in UltraFeedback binarized)."""
    shared = _shared_start(chosen, rejected)
    earlier = chosen[:shared]
    if earlier[:len(prompt)] == prompt:
        earlier = earlier[len(prompt):]
    return prompt + earlier, chosen[shared:], rejected[shared:]


def _single_answers(chosen: list[dict], rejected: list[dict]) -> tuple[dict, dict]:
    """The one assistant message on each side of a pair. A multi-turn completion (``chosen`` and ``rejected`` differ
    before their last message) is refused: keeping only the last messages would pair an answer with a question it
    does not answer (a refusal of a follow-up paired with the first request)."""
    for key, messages in (("chosen", chosen), ("rejected", rejected)):
        if len(messages) > 1:
            raise ShapeError(f"chosen/rejected hold a multi-turn completion ({key!r} has {len(messages)} messages "
                             "after the turns both share): equi pairs single assistant answers; put the earlier "
                             "turns in 'prompt'")
    if chosen[0]["role"] != "assistant" or rejected[0]["role"] != "assistant":
        raise ShapeError("the last message of 'chosen' and 'rejected' must be the assistant's")
    return chosen[0], rejected[0]


def _kept_turns(messages: list[dict]) -> list[dict] | None:
    """The prompt's turns as the row keeps them: only ``role`` and ``content``; None for a single user turn."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return None
    return [{"role": m["role"], "content": m["content"]} for m in messages]


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
    chosen = rejected = response = prompt_msgs = None
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
            prompt_msgs, chosen_msgs, rejected_msgs = _explicit_prompt(prompt_msgs, chosen_msgs, rejected_msgs)
        chosen_msg, rejected_msg = _single_answers(chosen_msgs, rejected_msgs)
        prompt = render_turns(prompt_msgs)
        prompt_msgs = _kept_turns(prompt_msgs)
        chosen, rejected = chosen_msg["content"], rejected_msg["content"]
    elif shape == "hh":
        c_prefix, chosen = _split_hh(_text(obj, "chosen"), "chosen")
        r_prefix, rejected = _split_hh(_text(obj, "rejected"), "rejected")
        if c_prefix != r_prefix:
            raise ShapeError("'chosen' and 'rejected' transcripts do not share the same conversation before "
                             "the last answer")
        prompt = _hh_prompt(c_prefix)
        prompt_msgs = _kept_turns(hh_messages(c_prefix)) if prompt == c_prefix.strip() else None  # several turns
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
        # Always the content hash (the contract's "stable content hash of the source row"): an id given in the row
        # could repeat across rows or files. The pool has no column to keep it in, so it is not kept.
        id=content_id(prompt, chosen, rejected, response) if image is None
        else content_id(prompt, chosen, rejected, response, image),
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
        prompt_messages=prompt_msgs,
    )


def missing_input_reason(path: str) -> str:
    """Why ``path`` cannot be opened although it was named: a symlink loop and a dangling symlink say so (both
    look like "no such file" to :meth:`Path.exists`)."""
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symlink loop (the link leads back to itself): point it at the JSONL file"
        if Path(path).is_symlink():
            return f"broken symlink (it points to {os.readlink(path)!r}, which does not exist)"
        if exc.errno == errno.EACCES:
            return "permission denied"
        return "no such file"
    return "cannot be opened"


#: Formats an input may be in that equi does not read, by their first bytes: (pattern, what it is, what to do).
#: ``FILE`` in the advice is replaced by the file's name. Gzip is read as it is; a UTF-8 byte-order mark is skipped.
_TO_UTF8 = "convert it to UTF-8 first (iconv -f {enc} -t UTF-8 FILE > FILE.utf8.jsonl)"
_FOREIGN_FORMATS: tuple[tuple[re.Pattern, str, str], ...] = tuple(
    (re.compile(pattern, re.DOTALL), what, advice) for pattern, what, advice in (
        (rb"\x00\x00\xfe\xff", "UTF-32 text (byte-order mark 00 00 FE FF)", _TO_UTF8.format(enc="UTF-32")),
        (rb"\xff\xfe\x00\x00", "UTF-32 text (byte-order mark FF FE 00 00)", _TO_UTF8.format(enc="UTF-32")),
        (rb"\xff\xfe", "UTF-16 text (byte-order mark FF FE)", _TO_UTF8.format(enc="UTF-16")),
        (rb"\xfe\xff", "UTF-16 text (byte-order mark FE FF)", _TO_UTF8.format(enc="UTF-16")),
        (rb"[\x01-\x7f]\x00\x00\x00", "UTF-32LE text (no byte-order mark)", _TO_UTF8.format(enc="UTF-32LE")),
        (rb"\x00\x00\x00[\x01-\x7f]", "UTF-32BE text (no byte-order mark)", _TO_UTF8.format(enc="UTF-32BE")),
        (rb"[\x01-\x7f]\x00[\x01-\x7f]\x00", "UTF-16LE text (no byte-order mark)", _TO_UTF8.format(enc="UTF-16LE")),
        (rb"\x00[\x01-\x7f]\x00[\x01-\x7f]", "UTF-16BE text (no byte-order mark)", _TO_UTF8.format(enc="UTF-16BE")),
        (rb"BZh[1-9]", "bzip2-compressed", "decompress it first (bunzip2 -k FILE), or recompress it with gzip, "
                                          "which equi reads as it is"),
        (rb"\x28\xb5\x2f\xfd", "zstd-compressed", "decompress it first (zstd -d FILE), or recompress it with gzip, "
                                                "which equi reads as it is"),
        (rb"\xfd7zXZ\x00", "xz-compressed", "decompress it first (xz -dk FILE), or recompress it with gzip, which "
                                          "equi reads as it is"),
        (rb"PK(\x03\x04|\x05\x06)", "a zip archive", "unzip it and pass the JSONL files in it"),
        (rb"7z\xbc\xaf\x27\x1c", "a 7-Zip archive", "extract it and pass the JSONL files in it"),
        (rb"PAR1", "a Parquet file", "equi curate reads JSONL: write it out as JSON lines first (e.g. "
                                     "pandas.read_parquet(FILE).to_json(OUT, orient='records', lines=True))"),
    ))
_GZIP_MAGIC = b"\x1f\x8b"
_UTF8_BOM = b"\xef\xbb\xbf"


def foreign_format(head: bytes, name: str, gunzipped: bool = False) -> str | None:
    """What is wrong with an input whose first bytes are ``head`` (a compressed file, an archive, UTF-16 text …), as
    one sentence naming ``name`` and what to do; None for what may be UTF-8 JSONL. Read per line, such a file would
    give one puzzling "not valid UTF-8" reject per line instead. ``gunzipped``: ``head`` is the start of the gzip
    file ``name``'s content."""
    for pattern, what, advice in _FOREIGN_FORMATS:
        if pattern.match(head):
            if not gunzipped:
                return f"{name}: is {what}, not UTF-8 JSONL: {advice.replace('FILE', name)}"
            inner = name[:-3] if name.endswith(".gz") else f"{name}.gunzipped"
            return f"{name}: once gunzipped, is {what}, not UTF-8 JSONL: gunzip it, then {advice.replace('FILE', inner)}"
    return None


def _peek(handle: IO[bytes], n: int) -> bytes:
    """Up to ``n`` first bytes of a buffered handle, not consumed (fewer where a pipe has not sent them yet)."""
    peek = getattr(handle, "peek", None)
    return peek(n)[:n] if peek is not None else b""


def _text_stream(handle: IO[bytes], name: str, stack: ExitStack) -> IO[bytes]:
    """``handle`` ready to be read as JSONL bytes: gunzipped when it is gzip (by magic number, not by name), past a
    UTF-8 byte-order mark; :class:`InputError` for a format equi does not read (:func:`foreign_format`)."""
    head = _peek(handle, 8)
    gunzipped = head.startswith(_GZIP_MAGIC)
    if gunzipped:
        # GzipFile is buffered already; a second buffer on top would lose its lines at a truncation.
        handle = stack.enter_context(gzip.GzipFile(fileobj=handle, mode="rb"))
        head = _peek(handle, 8)
    problem = foreign_format(head, name, gunzipped)
    if problem:
        raise InputError(problem)
    if head.startswith(_UTF8_BOM):
        handle.read(len(_UTF8_BOM))
    return handle


def check_input(path: str) -> None:
    """Raise :class:`InputError` for an input file that cannot be read as JSONL at all (missing, a directory, a
    symlink loop, compressed other than with gzip, UTF-16 …), before any line of any input is read: a bad second
    file is then named at once, not after the first one was curated. A gzip stream that breaks this early is left
    to the reader, which rejects its broken tail like any other."""
    if path == "-":
        return
    p = Path(path)
    if not p.exists():
        raise InputError(f"{path}: {missing_input_reason(path)}")
    if p.is_dir():
        raise InputError(f"{path}: is a directory, expected a JSONL file")
    try:
        with ExitStack() as stack:
            _text_stream(stack.enter_context(open(p, "rb")), path, stack)
    except (EOFError, zlib.error, gzip.BadGzipFile):
        pass
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None


def _open_lines(path: str, max_line_bytes: int) -> Iterator[bytes | _LongLine]:
    """Raw lines of a file or stdin, as bytes (see :func:`_text_stream` and :func:`_bounded_lines`)."""
    with ExitStack() as stack:
        if path == "-":
            handle, name = sys.stdin.buffer, "<stdin>"
            if not hasattr(handle, "peek"):  # a replaced stdin (a BytesIO): buffered, so its head can be sniffed
                handle = io.BufferedReader(handle)
        else:
            check_input(path)
            handle, name = stack.enter_context(open(path, "rb")), path
        yield from _bounded_lines(_text_stream(handle, name, stack), max_line_bytes)


#: How much of a line over ``max_line_bytes`` its reject keeps (characters), and the chunk it is read past in.
REJECT_RAW_CHARS = 1_000
_SKIP_CHUNK = 1 << 20
_HEAD_BYTES = 4 * REJECT_RAW_CHARS  # a UTF-8 character is at most 4 bytes


@dataclass(frozen=True)
class _LongLine:
    """A line over the byte limit: its length in bytes (newline not counted) and its first bytes only."""

    size: int
    head: bytes


def _bounded_lines(handle: IO[bytes], limit: int) -> Iterator[bytes | _LongLine]:
    """The lines of ``handle``; one longer than ``limit`` bytes comes as a :class:`_LongLine`, read past in chunks
    and never held whole, so one huge line costs no more memory than ``limit``."""
    while True:
        line = handle.readline(limit + 1)
        if not line:
            return
        if len(line) <= limit or line.endswith(b"\n"):
            yield line
            continue
        size, head = len(line), line[:_HEAD_BYTES]
        while line and not line.endswith(b"\n"):
            line = handle.readline(_SKIP_CHUNK)
            size += len(line)
            if len(head) < _HEAD_BYTES:
                head += line[:_HEAD_BYTES - len(head)]
        newline = 1 if line.endswith(b"\n") else 0
        yield _LongLine(size - newline, head[:size - newline])


def _long_line_reject(item: _LongLine, name: str, line_no: int, limit: int) -> Reject:
    """The reject of a line over ``--max-line-bytes``: not parsed, its raw text cut so rejects.jsonl stays small."""
    text = item.head.decode("utf-8", errors="replace")[:REJECT_RAW_CHARS]
    return Reject(name, line_no, f"line is {item.size:,} bytes, over --max-line-bytes {limit:,}: not read "
                                 "(raise --max-line-bytes to take it)",
                  f"{text}… [cut: first {len(text):,} characters of {item.size:,} bytes]")


@dataclass(frozen=True)
class RawLine:
    """One input line as read, not yet parsed (what a worker process is handed)."""

    file: str
    line: int
    raw: bytes


def read_rows(paths: list[str], shape: str = "auto", strict: bool = False, stats: ReadStats | None = None,
              max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> Iterator[RawRow | Reject]:
    """Yield a :class:`RawRow` or a :class:`Reject` for every line of every input.

    With ``strict`` the first bad line raises :class:`InputError` (``file:line: reason``).
    ``stats.lines_by_file`` counts the lines seen per file (a truncated gzip counts its broken tail as one).
    A line over ``max_line_bytes`` is a Reject, never parsed.
    """
    return parse_lines(read_lines(paths, strict, stats, max_line_bytes), shape, strict)


def read_lines(paths: list[str], strict: bool = False, stats: ReadStats | None = None,
               max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> Iterator[RawLine | Reject]:
    """:func:`read_rows` without the parsing: every line as a :class:`RawLine` (a corrupt gzip tail and a line over
    ``max_line_bytes`` as a Reject). Every input file is checked (:func:`check_input`) before the first line."""
    stats = stats if stats is not None else ReadStats()
    for path in paths:
        check_input(path)
    for path in paths:
        name = "<stdin>" if path == "-" else path
        line_no = 0
        stats.lines_by_file[name] = 0
        lines = _open_lines(path, max_line_bytes)
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
            if isinstance(raw, _LongLine):
                reject = _long_line_reject(raw, name, line_no, max_line_bytes)
                if strict:
                    raise InputError(f"{name}:{line_no}: {reject.reason}")
                yield reject
                continue
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


_READ_FIELDS = ("source", "prompt", "chosen", "rejected", "response", "category", "severity", "image",
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
