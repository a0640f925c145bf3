"""`equi curate --engine ray` on a local in-process Ray instance writes the same mix as `--engine local`."""

from __future__ import annotations

import json
import sys

import polars as pl
import pytest
from typer.testing import CliRunner

from equi.cli import app
from tests.realdata import advbench_rows, hh_lines, write_jsonl, xstest_prompts, xstest_single_responses

runner = CliRunner()

# Synthetic broken lines (not data), in the middle of the input so that one batch holds rejects.
BROKEN = [b"{not json", b'{"prompt": 7}', b""]
# Small batches: several reader batches, more than the two actors, so order across actors is exercised.
BATCH = 50


def _curate(*args):
    return runner.invoke(app, ["curate", *[str(a) for a in args]], catch_exceptions=False)


@pytest.fixture(scope="module")
def raw_inputs(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    hh = write_jsonl(root / "hh.jsonl", hh_lines(shared_data, 120))
    with open(hh, "ab") as fh:
        fh.write(b"\n".join(BROKEN) + b"\n")
    singles = [row for model in ("llama2new", "gpt4") for row in xstest_single_responses(shared_data, model, n=50)]
    xs = write_jsonl(root / "xstest_completions.jsonl", singles)
    prompts = write_jsonl(root / "prompts.jsonl", xstest_prompts(shared_data)[:20] + advbench_rows(shared_data, 20))
    return [hh, xs, prompts]


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def mixes(raw_inputs, local_ray, tmp_path_factory):
    """The same input, seed and batches curated by both engines, without the embedding cache so both encode."""
    import torch

    root = tmp_path_factory.mktemp("mixes")
    common = [*raw_inputs, "--quiet", "--seed", "3", "--batch-size", BATCH, "--no-cache"]
    result = _curate(*common, "--out", root / "ray", "--engine", "ray")
    assert result.exit_code == 0, result.output
    # Ray gives each CPU actor one torch thread; float sums depend on the thread count, so match it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = _curate(*common, "--out", root / "local")
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return root / "local", root / "ray"


def _manifest(mix):
    return json.loads((mix / "manifest.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("part", ["pool", "data"])
def test_engines_write_identical_rows_in_the_same_order(mixes, part):
    local, ray = (pl.read_parquet(mix / part / "*.parquet") for mix in mixes)
    assert local.height > 0
    assert local.equals(ray)


@pytest.mark.slow
def test_engines_reject_and_account_identically(mixes):
    local, ray = mixes
    assert (local / "rejects.jsonl").read_text() == (ray / "rejects.jsonl").read_text()
    rejected = [json.loads(line) for line in (ray / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["raw"]) for r in rejected if r["line"] > 120] == [(121, "{not json"), (122, '{"prompt": 7}'),
                                                                          (123, "")]
    a, b = _manifest(local), _manifest(ray)
    for key in ("accounting", "counts", "inputs", "shards", "clusters", "ratios", "warnings", "config_hash"):
        assert a[key] == b[key], key
    assert a["accounting"]["input_lines"] == a["accounting"]["pooled"] + a["accounting"]["rejected"]
    assert (a["config"]["engine"], b["config"]["engine"]) == ("local", "ray")


@pytest.mark.slow
def test_no_stage_or_partial_directory_is_left(mixes):
    for mix in mixes:
        assert not (mix / ".stage").exists()
        assert not list(mix.parent.glob(".*partial*"))


def test_without_ray_the_engine_says_how_to_install_it(raw_inputs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray → ImportError
    result = _curate(raw_inputs[2], "--out", tmp_path / "mix", "--quiet", "--engine", "ray")
    assert result.exit_code == 2
    assert "pip install 'equi[ray]'" in result.output
    assert not (tmp_path / "mix").exists()


def test_unknown_engine_is_a_usage_error(raw_inputs, tmp_path):
    result = _curate(raw_inputs[2], "--out", tmp_path / "mix", "--engine", "spark")
    assert result.exit_code == 2
    assert "--engine" in result.output


def test_one_actor_per_gpu_else_one_per_cpu():
    from curation.engine_ray import actor_pool

    assert actor_pool({"CPU": 32.0, "GPU": 4.0}) == (4, {"num_gpus": 1})
    assert actor_pool({"CPU": 8.0}) == (8, {"num_cpus": 1})


def test_scored_blocks_are_staged_a_batch_per_file(shared_data, tmp_path):
    """The driver later gathers the mixture's rows one staged file at a time: the staged files must stay batch-sized
    (one file held the whole input, all of which the driver then read into memory at once)."""
    import numpy as np
    import pyarrow.parquet as pq

    from curation.categorise import Categoriser
    from curation.embed import get_embedder
    from curation.engine_ray import EMBEDDING, collect, embedding_column
    from curation.readers import RawRow, read_rows
    from curation.staging import STAGE_SCHEMA, to_table
    from curation.steps import stage_batch
    from tests.realdata import write_jsonl, xstest_single_responses

    raw = write_jsonl(tmp_path / "raw.jsonl", xstest_single_responses(shared_data, "gpt4", n=50))
    rows = [r for r in read_rows([str(raw)]) if isinstance(r, RawRow)]
    embedder, categoriser = get_embedder(None), Categoriser.load_default()
    blocks = []
    for start in (0, 20, 40):  # three scored blocks of 20, 20 and 10 rows, as Ray's actors return them
        frame, vectors = stage_batch(rows[start:start + 20], embedder.encode, categoriser, 0.0)
        blocks.append(to_table(frame, STAGE_SCHEMA).append_column(EMBEDDING, embedding_column(vectors)))
    work = tmp_path / "work"
    work.mkdir()
    _, stage_files, embeddings, meta_parts = collect(blocks, work, embedder.dim, rows_per_file=16)
    assert [n for _, n, _ in stage_files] == [16, 16, 16, 2]
    staged = [pq.read_table(path) for path, _, _ in stage_files]
    assert [t.num_rows for t in staged] == [16, 16, 16, 2]
    assert sum((t.column("id").to_pylist() for t in staged), []) == [r.id for r in rows]
    assert np.concatenate(list(embeddings)).shape == (50, embedder.dim)
