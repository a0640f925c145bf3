"""Resumable curation: an interrupted `equi curate`, run again with the same command, finishes the work
and writes shards byte-identical to an uninterrupted run (issue 6). Real data from ../shared/data."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from equi.config import CurateConfig
from equi.manifest import Interrupted
from tests.realdata import advbench_rows, hh_lines, write_jsonl, xstest_single_responses

BATCH = 64


@pytest.fixture(scope="module")
def raw(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume-raw")
    rows = hh_lines(shared_data, 200)
    path = write_jsonl(root / "hh.jsonl", rows)
    with open(path, "ab") as fh:
        fh.write(b"{not json\n")  # synthetic damage: one reject
    singles = [r for m in ("llama2new", "gpt4") for r in xstest_single_responses(shared_data, m, n=80)]
    return [str(path), str(write_jsonl(root / "xs.jsonl", singles)),
            str(write_jsonl(root / "adv.jsonl", advbench_rows(shared_data, 30)))]


def _config(raw, out, **kw) -> CurateConfig:
    return CurateConfig(**{"inputs": raw, "out": str(out), "quiet": True, "batch_size": BATCH, "seed": 5,
                           "embedding_cache": False, **kw})


def _same_within_tolerance(mix: Path, reference: Path, atol: float = 1e-3) -> None:
    """The same files, rows, ids, groups and texts as ``reference``; float scores equal within ``atol``.

    What is promised across worker counts (each worker runs torch with fewer threads), where the encoder's
    float32 output may move in its last digits on some CPUs.
    """
    import polars as pl
    from polars.testing import assert_frame_equal

    assert sorted(_shards(mix)) == sorted(_shards(reference))
    for name in _shards(reference):
        if name.endswith(".parquet"):
            assert_frame_equal(pl.read_parquet(mix / name), pl.read_parquet(reference / name), check_exact=False,
                               abs_tol=atol, rel_tol=0)
        else:
            assert (mix / name).read_bytes() == (reference / name).read_bytes(), name


def _shards(mix: Path) -> dict[str, str]:
    """Every file of a mix but the manifest and card (they hold the creation time): path → sha256."""
    files = [p for p in mix.rglob("*") if p.is_file() and p.name not in ("manifest.json", "README.md")]
    return {p.relative_to(mix).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def uninterrupted(raw, tmp_path_factory):
    from curation.pipeline import curate

    out = tmp_path_factory.mktemp("resume-ref") / "mix"
    result = curate(_config(raw, out))
    assert result.resumed_batches == 0
    return out


def test_the_embedding_cache_does_not_change_the_mix(raw, uninterrupted, tmp_path, monkeypatch):
    """A cold cache, a partly warm one, a warm one and no cache write the same bytes: the cache stores float16,
    the pipeline scores float16, and a text's vector does not depend on which other texts it was encoded with
    (a cold cache encodes only a batch's misses, deduplicated)."""
    from curation.pipeline import curate

    monkeypatch.setenv("EQUI_CACHE", str(tmp_path / "cache"))
    curate(_config(raw[1:2], tmp_path / "part", embedding_cache=True))  # warms the cache with one input only
    for run in ("partly-warm", "warm"):
        curate(_config(raw, tmp_path / run, embedding_cache=True))
        assert _shards(tmp_path / run) == _shards(uninterrupted), run
    assert list((tmp_path / "cache" / "embeddings").glob("*.sqlite"))


def _interrupt_after(monkeypatch, batches: int, error=KeyboardInterrupt):
    import curation.steps

    real, calls = curation.steps.score_rows, []

    def score_rows(*args, **kwargs):
        calls.append(1)
        if len(calls) > batches:
            raise error()
        return real(*args, **kwargs)

    monkeypatch.setattr(curation.steps, "score_rows", score_rows)


def test_interrupted_run_resumes_and_matches_an_uninterrupted_one(raw, uninterrupted, tmp_path, monkeypatch):
    from curation.pipeline import curate

    out = tmp_path / "mix"
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 3)
        with pytest.raises(Interrupted) as info:
            curate(_config(raw, out))
    assert info.value.work == tmp_path / ".mix.partial" and not out.exists()
    assert len(list(info.value.work.glob(".stage/batch-*.parquet"))) == 3

    result = curate(_config(raw, out))
    assert result.resumed_batches == 3
    assert _shards(out) == _shards(uninterrupted)
    assert not (tmp_path / ".mix.partial").exists()


def test_no_resume_and_a_changed_input_start_afresh(raw, tmp_path, monkeypatch):
    from curation.pipeline import curate

    out = tmp_path / "mix"
    for fresh_start in ({"resume": False}, {}):
        with monkeypatch.context() as patch:
            _interrupt_after(patch, 2)
            with pytest.raises(Interrupted):
                curate(_config(raw, out, overwrite=True))
        if not fresh_start:  # the same command, but an input grew since: its fingerprint changed
            changed = tmp_path / "adv.jsonl"
            changed.write_text(Path(raw[2]).read_text() + Path(raw[2]).read_text().splitlines()[0] + "\n")
            inputs = raw[:2] + [str(changed)]
        else:
            inputs = raw
        result = curate(_config(inputs, out, overwrite=True, **fresh_start))
        assert result.resumed_batches == 0


def test_a_second_run_on_the_same_out_is_refused_while_one_is_running(raw, tmp_path):
    import fcntl

    out = tmp_path / "mix"
    with open(tmp_path / ".mix.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running `equi curate` holds
        from curation.pipeline import curate

        with pytest.raises(FileExistsError, match="another run is writing"):
            curate(_config(raw, out))


@pytest.mark.slow
# kill -9 of a one-process run is covered by these two together (a killed process stages nothing half-written:
# test_adversarial_resume's truncated staged file; the kill: kill-9-workers); each CLI case costs ~40 s.
@pytest.mark.parametrize("sig,workers", [(signal.SIGINT, 1), (signal.SIGKILL, 2)], ids=["ctrl-c", "kill-9-workers"])
def test_a_killed_cli_run_resumes_byte_identically(raw, uninterrupted, tmp_path, sig, workers):
    """The real thing: the CLI in a child process, stopped by a signal once a few batches are staged."""
    out = tmp_path / "mix"
    cmd = [sys.executable, "-m", "equi.cli", "curate", *raw, "--out", str(out), "--quiet", "--no-cache",
           "--batch-size", str(BATCH), "--seed", "5", "--workers", str(workers)]
    import torch

    # The child runs torch with this process's thread count (EQUI_TEST_THREADS), as the reference run did: the
    # byte-identity promise holds for one thread count, and torch's default is the machine's core count.
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stage = tmp_path / ".mix.partial" / ".stage"
    deadline = time.monotonic() + 300
    while len(list(stage.glob("batch-*.parquet"))) < 2 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert child.poll() is None, "the run finished before it could be interrupted"
    child.send_signal(sig)
    output, _ = child.communicate(timeout=120)
    if sig == signal.SIGINT:
        assert child.returncode == 130, output
        assert "run the same command again to resume" in output
    else:  # --quiet: no progress or model-loading bars, from this process or its workers (after a kill -9,
        # multiprocessing's resource tracker may still warn about the workers' semaphores)
        assert "it/s]" not in output and "Loading weights" not in output, output
    assert not out.exists()

    again = subprocess.run([a for a in cmd if a != "--quiet"], env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resumed: " in again.stdout + again.stderr
    if workers == 1:
        assert _shards(out) == _shards(uninterrupted)
    else:  # worker processes run torch with fewer threads each: equal within tolerance (README, Reliability)
        _same_within_tolerance(out, uninterrupted)


@pytest.mark.parametrize("chunks", [[700], [1, 699], [300, 300, 100], [64] * 10 + [60]])
def test_shard_bytes_depend_on_the_rows_not_on_how_they_were_written(tmp_path, chunks):
    import pyarrow as pa

    from curation.staging import ShardWriter

    schema = pa.schema([("i", pa.int64()), ("text", pa.string())])
    table = pa.table({"i": list(range(700)), "text": [f"row {i}" for i in range(700)]}, schema=schema)

    def write(folder: Path, sizes: list[int]) -> dict[str, str]:
        writer, offset = ShardWriter(folder, "pool", schema, rows_per_shard=250, row_group_rows=100), 0
        for size in sizes:
            writer.write(table.slice(offset, size))
            offset += size
        shards = writer.close()
        assert [rows for _, rows, _ in shards] == [250, 250, 200]
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p, _, _ in shards}

    assert write(tmp_path / "a", chunks) == write(tmp_path / "b", [700])


def test_worker_processes_write_the_same_mix(raw, uninterrupted, tmp_path):
    from curation.pipeline import curate

    out = tmp_path / "mix"
    curate(_config(raw, out, workers=2))
    _same_within_tolerance(out, uninterrupted)


def test_worker_processes_resume_what_an_interrupted_run_staged(raw, uninterrupted, tmp_path, monkeypatch):
    from curation.pipeline import curate

    out = tmp_path / "mix"
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 2)
        with pytest.raises(Interrupted):
            curate(_config(raw, out))
    result = curate(_config(raw, out, workers=2))  # workers read the staged batches back
    assert result.resumed_batches == 2
    _same_within_tolerance(out, uninterrupted)
