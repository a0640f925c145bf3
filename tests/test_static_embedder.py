"""``--embedder static`` (issue 6): a model2vec embedder distilled offline from the bundled MiniLM, a categoriser
fit for it on real labelled prompts, and the same mix whatever ``--workers``. Real data from ../shared/data."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from equi.cli import app
from tests.realdata import advbench_rows, hh_lines, write_jsonl, xstest_single_responses

pytest.importorskip("model2vec")  # the `fast` extra, which the README's install command installs
runner = CliRunner()


@pytest.fixture(scope="module")
def static_categoriser(shared_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("static") / "categoriser.json"
    labelled = shared_data / "equilibrate_relabel_dev" / "beavertails_relabelled_dev.jsonl"
    result = runner.invoke(app, ["fit-categoriser", str(labelled), "--embedder", "static", "--folds", "0",
                                 "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def raw(shared_data, tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("static-raw")
    return [str(write_jsonl(root / "hh.jsonl", hh_lines(shared_data, 150))),
            str(write_jsonl(root / "xs.jsonl", xstest_single_responses(shared_data, "gpt4", n=60))),
            str(write_jsonl(root / "adv.jsonl", advbench_rows(shared_data, 30)))]


def _curate(raw: list[str], out: Path, *args: str):
    return runner.invoke(app, ["curate", *raw, "--out", str(out), "--quiet", "--no-cache", "--batch-size", "64",
                               "--embedder", "static", *args])


def _files(mix: Path) -> dict[str, str]:
    return {p.relative_to(mix).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(mix.rglob("*")) if p.is_file() and p.name not in ("manifest.json", "README.md")}


@pytest.mark.slow
def test_static_mix_is_byte_identical_for_any_number_of_workers(raw, static_categoriser, tmp_path):
    from equi.manifest import verify_mix

    one, two = tmp_path / "one", tmp_path / "two"
    for out, workers in ((one, "1"), (two, "2")):
        result = _curate(raw, out, "--categoriser", str(static_categoriser), "--workers", workers)
        assert result.exit_code == 0, result.output
        assert verify_mix(out) == []
    assert _files(one) == _files(two)
    manifest = json.loads((one / "manifest.json").read_text())
    assert manifest["embedder"] == "static"
    accounting = manifest["accounting"]
    assert accounting["input_lines"] == 240 == accounting["pooled"] + accounting["rejected"]
    assert manifest["counts"]["mixture"], "the static mix holds no pairs"


def test_static_embedder_refuses_the_minilm_categoriser(raw, tmp_path):
    result = _curate(raw, tmp_path / "mix")
    assert result.exit_code == 2, result.output
    assert "fit-categoriser" in result.output and "--embedder static" in result.output
    assert not (tmp_path / "mix").exists()


def test_static_vectors_are_each_a_function_of_their_own_text(shared_data):
    """Each distinct text of a batch is embedded once; its vector is the one it gets alone or in any batch."""
    import numpy as np

    from curation.embed import get_embedder

    embedder = get_embedder("static")
    prompts = [r["prompt"] for r in advbench_rows(shared_data, 40)]
    repeated = prompts + prompts[::-1] + prompts[:7]
    together = embedder.encode(repeated)
    assert together.shape == (len(repeated), embedder.dim) and together.dtype == np.float32
    alone = np.stack([embedder.encode([p])[0] for p in prompts])
    assert np.array_equal(together[:40], alone) and np.array_equal(together[40:80], alone[::-1])
    assert np.array_equal(together[80:], alone[:7])
