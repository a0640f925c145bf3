"""Fault injection on `equi curate` (issue 14): a truncated staged file, a full disk, a read-only output, an input
edited in place, an interrupt in every phase. Scored work survives a failed run and the next run resumes it into
the same bytes as an uninterrupted run. Real data from ../shared/data."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest

from equi.config import CurateConfig
from equi.manifest import Interrupted, WorkKept
from tests.realdata import advbench_rows, hh_lines, write_jsonl, xstest_single_responses

BATCH = 32


@pytest.fixture(scope="module")
def raw(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults-raw")
    return [str(write_jsonl(root / "hh.jsonl", hh_lines(shared_data, 60))),
            str(write_jsonl(root / "xs.jsonl", xstest_single_responses(shared_data, "gpt4", n=40))),
            str(write_jsonl(root / "adv.jsonl", advbench_rows(shared_data, 20)))]


def _config(raw, out, **kw) -> CurateConfig:
    return CurateConfig(**{"inputs": raw, "out": str(out), "quiet": True, "batch_size": BATCH, "seed": 3,
                           "embedding_cache": False, **kw})


def _files(mix: Path) -> dict[str, str]:
    """Every file of a mix but the manifest and card (they hold the creation time and timings): path → sha256."""
    return {p.relative_to(mix).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in mix.rglob("*") if p.is_file() and p.name not in ("manifest.json", "README.md")}


@pytest.fixture(scope="module")
def reference(raw, tmp_path_factory):
    from curation.pipeline import curate

    out = tmp_path_factory.mktemp("faults-ref") / "mix"
    curate(_config(raw, out))
    return out


def _fail_on_call(monkeypatch, module, name: str, after: int, error: BaseException) -> None:
    """``module.<name>`` works ``after`` times, then raises ``error``."""
    real, calls = getattr(module, name), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) > after:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


def test_a_truncated_staged_file_is_scored_again_and_costs_no_other_batch(raw, reference, tmp_path, monkeypatch):
    import curation.steps
    from curation.pipeline import curate

    out = tmp_path / "mix"
    with monkeypatch.context() as patch:
        _fail_on_call(patch, curation.steps, "score_rows", 3, KeyboardInterrupt())
        with pytest.raises(Interrupted):
            curate(_config(raw, out))
    stage = tmp_path / ".mix.partial" / ".stage"
    damaged = stage / "batch-000001.parquet"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # a power loss mid-write
    npy = stage / "batch-000002.npy"
    npy.write_bytes(npy.read_bytes()[:200])

    result = curate(_config(raw, out))
    assert result.resumed_batches == 1  # batch 0 whole; batches 1 and 2 scored again
    assert _files(out) == _files(reference)


def test_a_full_disk_keeps_the_scored_batches_and_the_next_run_resumes_them(raw, reference, tmp_path, monkeypatch):
    import curation.staging
    from curation.pipeline import curate

    out = tmp_path / "mix"
    with monkeypatch.context() as patch:
        _fail_on_call(patch, curation.staging, "save_npy", 2, OSError(errno.ENOSPC, "No space left on device"))
        with pytest.raises(WorkKept, match="No space left on device.*run the same command again") as info:
            curate(_config(raw, out))
    assert info.value.work == tmp_path / ".mix.partial" and not out.exists()
    assert len(list(info.value.work.glob(".stage/batch-*.parquet"))) == 2
    assert not list(info.value.work.glob(".stage/.*.tmp"))  # the half-written file is gone

    result = curate(_config(raw, out))
    assert result.resumed_batches == 2
    assert _files(out) == _files(reference)


def test_a_full_disk_is_one_line_on_the_command_line(raw, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import curation.staging
    from equi.cli import app

    _fail_on_call(monkeypatch, curation.staging, "save_npy", 1, OSError(errno.ENOSPC, "No space left on device"))
    result = CliRunner().invoke(app, ["curate", *raw, "--out", str(tmp_path / "mix"), "--quiet", "--no-cache",
                                      "--batch-size", str(BATCH)])
    assert result.exit_code == 1, result.output
    assert "No space left on device" in result.output and "Traceback" not in result.output
    assert "run the same command again to resume" in result.output


@pytest.mark.parametrize("phase", ["fit_assign_clusters", "write_pool", "write_mixture"])
def test_an_interrupt_in_any_later_phase_resumes_every_batch(raw, reference, tmp_path, monkeypatch, phase):
    import curation.pipeline
    from curation.pipeline import curate

    out = tmp_path / "mix"
    with monkeypatch.context() as patch:
        patch.setattr(curation.pipeline, phase, _raises(KeyboardInterrupt()))
        with pytest.raises(Interrupted):
            curate(_config(raw, out))
    result = curate(_config(raw, out))
    assert result.resumed_batches == 4  # 120 lines in batches of 32
    assert _files(out) == _files(reference)


def _raises(error: BaseException):
    def fail(*args, **kwargs):
        raise error

    return fail


def test_an_input_edited_in_place_with_its_size_and_time_kept_is_not_resumed(raw, tmp_path, monkeypatch):
    import curation.steps
    from curation.pipeline import curate

    edited = tmp_path / "adv.jsonl"
    edited.write_bytes(Path(raw[2]).read_bytes())
    inputs = raw[:2] + [str(edited)]
    out = tmp_path / "mix"
    with monkeypatch.context() as patch:
        _fail_on_call(patch, curation.steps, "score_rows", 2, KeyboardInterrupt())
        with pytest.raises(Interrupted):
            curate(_config(inputs, out))
    stat = edited.stat()
    text = edited.read_text()
    edited.write_text(text.replace("a", "e", 1))  # same size
    os.utime(edited, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same modification time
    assert edited.stat().st_size == stat.st_size and edited.stat().st_mtime_ns == stat.st_mtime_ns

    result = curate(_config(inputs, out))
    assert result.resumed_batches == 0
    recorded = {Path(i["path"]).name: i["sha256"] for i in result.manifest["inputs"]}
    assert recorded["adv.jsonl"] == hashlib.sha256(edited.read_bytes()).hexdigest()


def test_an_input_that_changes_during_the_run_writes_nothing(raw, tmp_path, monkeypatch):
    import curation.pipeline
    from curation.pipeline import curate
    from curation.readers import InputError

    grown = tmp_path / "adv.jsonl"
    grown.write_bytes(Path(raw[2]).read_bytes())
    real = curation.pipeline.write_pool

    def write_pool_while_the_input_grows(*args, **kwargs):
        with open(grown, "a") as fh:
            fh.write('{"prompt": "synthetic: a line appended while curate runs"}\n')
        return real(*args, **kwargs)

    monkeypatch.setattr(curation.pipeline, "write_pool", write_pool_while_the_input_grows)
    with pytest.raises(InputError, match="changed while it was being curated"):
        curate(_config(raw[:2] + [str(grown)], tmp_path / "mix"))
    assert not (tmp_path / "mix").exists()


def test_a_read_only_output_is_refused_before_the_models_load(raw, monkeypatch):
    """/proc stands in for a read-only file system (root may write anywhere else)."""
    import curation.pipeline
    from typer.testing import CliRunner

    from equi.cli import app

    monkeypatch.setattr(curation.pipeline, "load_models", _raises(AssertionError("models loaded")))
    result = CliRunner().invoke(app, ["curate", *raw, "--out", "/proc/equi-mix", "--quiet", "--no-cache"])
    assert result.exit_code == 2, result.output
    assert "cannot write --out /proc/equi-mix" in result.output and "Traceback" not in result.output
