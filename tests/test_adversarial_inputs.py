"""Adversarial inputs to `equi curate`'s reader (issue 14): multi-turn completions, huge lines, files that are not
UTF-8 JSONL (compressed, archived, UTF-16), symlink loops, and user-given ids. Each is a clear reject or a one-line
error, never a silent drop, a garbled reject per line or a run that eats the machine.

Every JSONL row and every file here is synthetic (shapes and formats only, not data) unless it comes from
tests.realdata.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import os
import sys
import tracemalloc
import zipfile

import pytest
from typer.testing import CliRunner

from curation.readers import InputError, RawRow, ReadStats, Reject, content_id, read_rows
from equi.cli import app
from equi.config import DEFAULT_MAX_LINE_BYTES, ConfigError, CurateConfig
from tests.realdata import write_jsonl, xstest_prompts

runner = CliRunner()


def _read(paths, **kw):
    stats = ReadStats()
    items = list(read_rows([str(p) for p in paths], stats=stats, **kw))
    return items, stats


def _msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


# -------------------------------------------------------------------------------------------------------------
# 1. Multi-turn completions: only single assistant answers are paired
# -------------------------------------------------------------------------------------------------------------

KNIFE = _msg("user", "How do I make a knife?")
FOLLOW_UP = [_msg("assistant", "Sure"), _msg("user", "how do I stab someone with it?")]


def test_multi_turn_completion_with_implicit_prompt_is_rejected(tmp_path):
    # Synthetic: the refusal answers the follow-up, not "How do I make a knife?"; keeping only the last messages
    # would pair it with the first request.
    row = {"chosen": [KNIFE, *FOLLOW_UP, _msg("assistant", "I can't help")],
           "rejected": [KNIFE, _msg("assistant", "x")]}
    items, _ = _read([write_jsonl(tmp_path / "s.jsonl", [row])])
    assert isinstance(items[0], Reject), items[0]
    assert "multi-turn completion ('chosen' has 3 messages" in items[0].reason
    assert "put the earlier turns in 'prompt'" in items[0].reason


def test_multi_turn_completion_with_explicit_prompt_is_rejected(tmp_path):
    # Synthetic, the brief's example: explicit prompt, chosen holds three messages, rejected one.
    rows = [{"prompt": [KNIFE], "chosen": [*FOLLOW_UP, _msg("assistant", "I can't help")],
             "rejected": [_msg("assistant", "x")]},
            {"prompt": "How do I make a knife?", "chosen": [_msg("assistant", "x")],
             "rejected": [*FOLLOW_UP, _msg("assistant", "Stab like so")]}]
    items, _ = _read([write_jsonl(tmp_path / "s.jsonl", rows)])
    assert [type(i) for i in items] == [Reject, Reject], items
    assert "'chosen' has 3 messages" in items[0].reason and "'rejected' has 3 messages" in items[1].reason


def test_turns_both_sides_share_move_into_the_prompt(tmp_path):
    # Synthetic: the extra turns are identical on both sides, so they are the prompt (TRL's implicit-prompt rule),
    # and the pair reads exactly like the same conversation given with the turns in 'prompt'.
    rows = [{"prompt": [KNIFE], "chosen": [*FOLLOW_UP, _msg("assistant", "I can't help")],
             "rejected": [*FOLLOW_UP, _msg("assistant", "Stab like so")]},
            {"prompt": [KNIFE, *FOLLOW_UP], "chosen": [_msg("assistant", "I can't help")],
             "rejected": [_msg("assistant", "Stab like so")]}]
    moved, given = _read([write_jsonl(tmp_path / "s.jsonl", rows)])[0]
    assert isinstance(moved, RawRow), moved
    assert "how do I stab someone with it?" in moved.prompt and moved.chosen == "I can't help"
    assert (moved.prompt, moved.chosen, moved.rejected, moved.id) == (given.prompt, given.chosen, given.rejected,
                                                                      given.id)


def test_answers_that_repeat_the_prompt_keep_it_once(tmp_path):
    # Synthetic, UltraFeedback-binarized layout: 'prompt' a string, 'chosen'/'rejected' the whole conversation.
    row = {"prompt": "How do I make a knife?", "chosen": [KNIFE, _msg("assistant", "Forge it")],
           "rejected": [KNIFE, _msg("assistant", "x")]}
    (item,), _ = _read([write_jsonl(tmp_path / "s.jsonl", [row])])
    assert isinstance(item, RawRow), item
    assert (item.prompt, item.chosen, item.rejected) == ("How do I make a knife?", "Forge it", "x")


# -------------------------------------------------------------------------------------------------------------
# 2. A bounded cost per line
# -------------------------------------------------------------------------------------------------------------

def _with_long_line(path, size: int, gzipped: bool = False):
    """A synthetic file: a good line, one prompt line of about ``size`` bytes, a good line."""
    long_line = b'{"prompt": "' + b"a" * (size - 14) + b'"}'
    blob = b'{"prompt": "first"}\n' + long_line + b'\n{"prompt": "last"}\n'
    path.write_bytes(gzip.compress(blob) if gzipped else blob)
    return path, len(long_line)


@pytest.mark.parametrize("gzipped", [False, True], ids=["plain", "gzip"])
def test_a_line_over_max_line_bytes_is_rejected_unparsed_and_cut(tmp_path, monkeypatch, gzipped):
    import curation.readers

    parsed_sizes = []
    real_loads = curation.readers.loads_line
    monkeypatch.setattr(curation.readers, "loads_line", lambda text: parsed_sizes.append(len(text)) or real_loads(text))
    path, size = _with_long_line(tmp_path / ("big.jsonl.gz" if gzipped else "big.jsonl"), 2 << 20)
    items, stats = _read([path])
    assert [type(i) for i in items] == [RawRow, Reject, RawRow] and items[2].prompt == "last"
    reject = items[1]
    assert reject.line == 2 and stats.lines_by_file[str(path)] == 3
    assert reject.reason.startswith(f"line is {size:,} bytes, over --max-line-bytes {DEFAULT_MAX_LINE_BYTES:,}")
    assert reject.raw.startswith('{"prompt": "aaa') and len(reject.raw) < 1_100 and f"{size:,} bytes" in reject.raw
    assert len(reject.to_json()) < 1_500  # rejects.jsonl stays small (the path and reason besides the cut text)
    assert max(parsed_sizes) < 100  # only the two short lines were parsed


def test_max_line_bytes_bounds_memory_and_counts_exactly(tmp_path):
    path, size = _with_long_line(tmp_path / "huge.jsonl", 24 << 20)
    tracemalloc.start()
    try:
        items, _ = _read([path])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(items[1], Reject) and f"line is {size:,} bytes" in items[1].reason
    assert peak < 8 << 20, f"peak {peak:,} bytes while reading past a {size:,}-byte line"
    # The limit is exact: a line of max_line_bytes passes, one byte more does not (its newline never counts).
    exact = tmp_path / "exact.jsonl"
    exact.write_bytes(b'{"prompt": "abc"}\n{"prompt": "abcd"}')
    items, _ = _read([exact], max_line_bytes=len(b'{"prompt": "abc"}'))
    assert isinstance(items[0], RawRow) and isinstance(items[1], Reject) and "line is 18 bytes" in items[1].reason


def test_strict_stops_at_a_line_over_max_line_bytes(tmp_path):
    path, _ = _with_long_line(tmp_path / "big.jsonl", 4_000)
    with pytest.raises(InputError, match=r"big\.jsonl:2: line is 4,000 bytes, over --max-line-bytes 1,000"):
        _read([path], strict=True, max_line_bytes=1_000)


def test_max_line_bytes_is_a_validated_config_field_and_cli_option(tmp_path, monkeypatch):
    import curation.pipeline

    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "synthetic"}])
    with pytest.raises(ConfigError, match="--max-line-bytes must be at least 1"):
        CurateConfig(inputs=[str(good)], out=str(tmp_path / "out"), max_line_bytes=0)
    seen = []
    monkeypatch.setattr(curation.pipeline, "curate", lambda config: seen.append(config) or 1 / 0)
    runner.invoke(app, ["curate", str(good), "--out", str(tmp_path / "out"), "--max-line-bytes", "4096"])
    assert seen and seen[0].max_line_bytes == 4096


def test_curate_rejects_lines_over_the_given_limit(shared_data, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", xstest_prompts(shared_data)[:20])
    with open(prompts, "ab") as fh:
        fh.write(b'{"prompt": "' + b"b" * 500 + b'"}\n')  # synthetic long line
    out = tmp_path / "mix"
    result = runner.invoke(app, ["curate", str(prompts), "--out", str(out), "--quiet", "--max-line-bytes", "300"])
    assert result.exit_code == 0, result.output
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejects] == [21] and "over --max-line-bytes 300" in rejects[0]["reason"]


def test_curate_rejects_a_2_mib_line_by_default_and_accounts_for_it(shared_data, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", xstest_prompts(shared_data)[:20])
    with open(prompts, "ab") as fh:
        fh.write(b'{"prompt": "' + b"c" * (2 << 20) + b'"}\n')  # synthetic 2 MiB line
    out = tmp_path / "mix"
    result = runner.invoke(app, ["curate", str(prompts), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    rejects_text = (out / "rejects.jsonl").read_text()
    (reject,) = [json.loads(line) for line in rejects_text.splitlines()]
    assert reject["line"] == 21 and "over --max-line-bytes 1,048,576" in reject["reason"]
    assert len(rejects_text) < 1_500
    accounting = json.loads((out / "manifest.json").read_text())["accounting"]
    assert (accounting["input_lines"], accounting["pooled"], accounting["rejected"]) == (21, 20, 1)


# -------------------------------------------------------------------------------------------------------------
# 3. Files that are not UTF-8 JSONL, and symlinks that lead nowhere
# -------------------------------------------------------------------------------------------------------------

JSONL = b'{"prompt": "synthetic one"}\n{"prompt": "synthetic two"}\n'


def _zip(data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("data.jsonl", data)
    return buffer.getvalue()


FOREIGN = [
    ("utf16le.jsonl", JSONL.decode().encode("utf-16"), "UTF-16 text (byte-order mark FF FE)", "convert it to UTF-8"),
    ("utf16be.jsonl", b"\xfe\xff" + JSONL.decode().encode("utf-16-be"), "UTF-16 text (byte-order mark FE FF)",
     "iconv -f UTF-16 -t UTF-8"),
    ("nobom.jsonl", JSONL.decode().encode("utf-16-le"), "UTF-16LE text (no byte-order mark)", "convert it to UTF-8"),
    ("data.jsonl.bz2", bz2.compress(JSONL), "bzip2-compressed", "decompress it first (bunzip2 -k"),
    ("data.jsonl.zst", b"\x28\xb5\x2f\xfd" + b"\x00" * 16, "zstd-compressed", "decompress it first (zstd -d"),
    ("data.jsonl.xz", lzma.compress(JSONL), "xz-compressed", "decompress it first (xz -dk"),
    ("data.zip", _zip(JSONL), "a zip archive", "unzip it"),
    ("utf16.jsonl.gz", gzip.compress(JSONL.decode().encode("utf-16")), "once gunzipped, is UTF-16 text",
     "gunzip it, then convert it to UTF-8 first (iconv -f UTF-16 -t UTF-8 "),
]


@pytest.mark.parametrize("name,blob,what,advice", FOREIGN, ids=[f[0] for f in FOREIGN])
def test_a_file_that_is_not_utf8_jsonl_is_named_with_what_to_do(tmp_path, name, blob, what, advice):
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "synthetic"}])
    bad = tmp_path / name
    bad.write_bytes(blob)
    with pytest.raises(InputError) as caught:
        _read([good, bad])  # refused before the good file's lines are read, not after
    message = str(caught.value)
    assert message.startswith(f"{bad}: ") and what in message and advice in message, message
    assert "\n" not in message


def test_a_bz2_beside_a_good_file_exits_2_with_a_one_line_error(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "synthetic"}])
    bad = tmp_path / "more.jsonl.bz2"
    bad.write_bytes(bz2.compress(JSONL))
    out = tmp_path / "out"
    result = runner.invoke(app, ["curate", str(good), str(bad), "--out", str(out), "--quiet"])
    assert result.exit_code == 2, result.output
    assert "is bzip2-compressed, not UTF-8 JSONL" in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_a_utf8_byte_order_mark_is_skipped(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + JSONL)  # synthetic: as Windows tools write UTF-8
    items, _ = _read([path])
    assert [getattr(i, "prompt", i) for i in items] == ["synthetic one", "synthetic two"]


def test_gzip_on_stdin_is_read(monkeypatch):
    stdin = io.TextIOWrapper(io.BytesIO(gzip.compress(JSONL)))
    monkeypatch.setattr(sys, "stdin", stdin)
    items, stats = _read(["-"])
    assert [getattr(i, "prompt", i) for i in items] == ["synthetic one", "synthetic two"]
    assert stats.lines_by_file["<stdin>"] == 2


def test_bz2_on_stdin_is_named(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(bz2.compress(JSONL))))
    with pytest.raises(InputError, match="<stdin>: is bzip2-compressed"):
        _read(["-"])


def test_symlink_loop_and_broken_symlink_say_so(tmp_path):
    os.symlink(tmp_path / "b.jsonl", tmp_path / "a.jsonl")
    os.symlink(tmp_path / "a.jsonl", tmp_path / "b.jsonl")
    os.symlink(tmp_path / "gone.jsonl", tmp_path / "dangling.jsonl")
    with pytest.raises(InputError, match="a.jsonl: symlink loop"):
        _read([tmp_path / "a.jsonl"])
    with pytest.raises(InputError, match="dangling.jsonl: broken symlink .*gone.jsonl"):
        _read([tmp_path / "dangling.jsonl"])
    result = runner.invoke(app, ["curate", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 2 and "symlink loop" in result.output and "no such file" not in result.output


# -------------------------------------------------------------------------------------------------------------
# 4. Ids are content hashes
# -------------------------------------------------------------------------------------------------------------

def test_ids_are_content_hashes_whatever_id_a_row_gives(tmp_path):
    # Synthetic: two different rows claiming one id, and one row's content under two ids.
    rows = [{"id": "dup", "prompt": "p1", "response": "a"},
            {"id": "dup", "prompt": "p2", "response": "a"},
            {"id": 7, "prompt": "p3", "chosen": "c", "rejected": "r"},
            {"id": "other", "prompt": "p3", "chosen": "c", "rejected": "r"}]
    items, _ = _read([write_jsonl(tmp_path / "ids.jsonl", rows)])
    assert [i.id for i in items] == [content_id("p1", None, None, "a"), content_id("p2", None, None, "a"),
                                     content_id("p3", "c", "r", None), content_id("p3", "c", "r", None)]
