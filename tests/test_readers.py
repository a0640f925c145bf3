"""The reader: every input shape, and every kind of bad line becoming a reject with a reason."""

from __future__ import annotations

import gzip
import json
import zlib

import pytest

from curation.readers import InputError, RawRow, ReadStats, Reject, read_rows
from tests.realdata import hh_lines, write_jsonl


def _read(paths, **kw):
    stats = ReadStats()
    items = list(read_rows([str(p) for p in paths], stats=stats, **kw))
    return items, stats


def test_hh_rlhf_dialogues_split_into_prompt_and_last_answers(shared_data, tmp_path):
    lines = hh_lines(shared_data, 50)
    items, stats = _read([write_jsonl(tmp_path / "hh.jsonl", lines)])
    rows = [i for i in items if isinstance(i, RawRow)]
    assert len(items) == 50 == stats.lines_by_file[str(tmp_path / "hh.jsonl")]
    assert len(rows) >= 48  # real hh-rlhf has the odd malformed pair; those are rejects with reasons
    first = json.loads(lines[0])
    row = rows[0]
    assert row.shape == "hh" and row.source_line == 1
    assert first["chosen"].endswith(row.chosen) and first["rejected"].endswith(row.rejected)
    assert "Assistant:" not in row.chosen and row.prompt.startswith("Human:")  # multi-turn kept as transcript
    assert all(r.chosen and r.rejected and r.prompt for r in rows)


def test_all_shapes_are_detected(tmp_path):
    # Synthetic rows (shapes only, not data): one per accepted shape.
    rows = [
        {"prompt": "p1", "chosen": "c", "rejected": "r"},
        {"prompt": [{"role": "user", "content": "p2"}], "chosen": [{"role": "assistant", "content": "c"}],
         "rejected": [{"role": "assistant", "content": "r"}]},
        {"chosen": "\n\nHuman: p3\n\nAssistant: c", "rejected": "\n\nHuman: p3\n\nAssistant: r"},
        {"prompt": "p4", "response": "a", "is_safe": False, "severity": "Severe", "category": "violence"},
        {"prompt": "p5"},
    ]
    items, _ = _read([write_jsonl(tmp_path / "s.jsonl", rows)])
    assert [i.shape for i in items] == ["pair", "conversation", "hh", "single", "prompt"]
    assert items[2].prompt == "p3" and items[2].chosen == "c"
    assert items[3].is_safe is False and items[3].severity == "severe" and items[3].category == "violence"
    assert len({i.id for i in items}) == 5


def test_trl_implicit_prompt_pairs_read_like_explicit_ones(tmp_path):
    # Synthetic rows (shapes only): TRL's conversational pair without "prompt" shares the prompt turns.
    user = [{"role": "user", "content": "p1"}, {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "p2"}]
    answer = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    rows = [{"prompt": user, "chosen": answer("c"), "rejected": answer("r")},
            {"chosen": user + answer("c"), "rejected": user + answer("r")}]
    explicit, implicit = _read([write_jsonl(tmp_path / "s.jsonl", rows)])[0]
    assert isinstance(implicit, RawRow), implicit
    assert (implicit.prompt, implicit.chosen, implicit.rejected, implicit.id) == \
        (explicit.prompt, explicit.chosen, explicit.rejected, explicit.id)


BAD_LINES = [
    (b'{"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}], '
     b'"rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}]}',
     "do not start with the same messages"),
    (b"{not json", "invalid JSON"),
    (b"[1, 2]", "not an object"),
    (b'{"prompt": 5}', "must be a string"),
    (b'{"prompt": "   "}', "is empty"),
    (b'{"chosen": "a", "rejected": "b"}', "not a 'Human"),
    (b'{"prompt": "p", "chosen": "", "rejected": "r"}', "is empty"),
    (b'{"foo": 1}', "no known shape"),
    (b"\xff\xfe{}", "not valid UTF-8"),
    (b"   ", "empty line"),
    (b'{"prompt": "p", "response": "a", "is_safe": "yes"}', "is_safe"),
    (b'{"prompt": "p", "response": "a", "severity": "catastrophic"}', "severity"),
    (b'{"chosen": "\\n\\nHuman: a\\n\\nAssistant: x", "rejected": "\\n\\nHuman: b\\n\\nAssistant: y"}',
     "do not share"),
    # Valid JSON that Python cannot take as text or read at all (synthetic, like every line here):
    (b'{"prompt": "a cut emoji \\ud83d here", "response": "ok"}', "lone surrogate"),
    (b'{"id": "r1", "prompt": "p", "chosen": "fine", "rejected": "half \\udc00"}', "field 'rejected' holds a lone"),
    (b'{"prompt": "p", "meta": ' + b"9" * 5000 + b"}", "invalid JSON: Exceeds the limit"),
    (b'{"prompt": "p", "meta": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
]


@pytest.mark.parametrize("raw,reason", BAD_LINES, ids=[reason for _, reason in BAD_LINES])
def test_bad_lines_become_rejects_with_reasons(tmp_path, raw, reason):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n' + raw + b"\n")
    items, stats = _read([path])
    assert isinstance(items[0], RawRow)
    assert isinstance(items[1], Reject) and items[1].line == 2 and items[1].file == str(path)
    assert reason in items[1].reason
    assert stats.lines_by_file[str(path)] == 2


def test_strict_stops_at_first_bad_line_with_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n{oops\n{"prompt": "later"}\n')
    with pytest.raises(InputError, match=r"bad\.jsonl:2: invalid JSON"):
        _read([path], strict=True)


def test_truncated_gzip_keeps_complete_lines_and_rejects_the_tail(shared_data, tmp_path):
    lines = hh_lines(shared_data, 1500)
    blob = gzip.compress(("\n".join(lines) + "\n").encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(blob[: len(blob) // 2])
    # Every line that is whole in what is left of the stream must be read (a second buffer lost a few).
    recoverable = zlib.decompressobj(wbits=31).decompress(blob[: len(blob) // 2]).count(b"\n")
    items, stats = _read([path])
    assert isinstance(items[-1], Reject) and "gzip" in items[-1].reason
    assert 0 < len(items) - 1 == recoverable < 1500
    whole, _ = _read([write_jsonl(tmp_path / "whole.jsonl", lines[:recoverable])])
    assert [getattr(x, "prompt", None) for x in items[:-1]] == [getattr(x, "prompt", None) for x in whole]
    assert stats.lines_by_file[str(path)] == len(items)


def test_missing_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        _read([tmp_path / "nope.jsonl"])
