"""Every training algorithm on a real mini-mix made by `equi curate` (not the synthetic-label fixture).

The mix: real HH-RLHF harmless-base pairs plus three models' real XSTest completions (paired by the mixer),
curated with the bundled embedder, categoriser, refusal detector and segment scorer. The model is the tiny
Llama of ``train_fixtures`` (trained tokenizer, 2 layers).
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from equi.cli import app
from tests.realdata import hh_lines, write_jsonl, xstest_single_responses
from train_fixtures import build_tiny_model

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("private_equi_cache")


@pytest.fixture(scope="module")
def curated(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("curated")
    hh = write_jsonl(root / "hh.jsonl", hh_lines(shared_data, 160))
    xs = write_jsonl(root / "xs.jsonl", [r for m in ("llama2new", "mistralinstruct", "gpt4")
                                          for r in xstest_single_responses(shared_data, m, n=60)])
    mix = root / "mix"
    result = runner.invoke(app, ["curate", str(hh), str(xs), "--out", str(mix), "--quiet", "--eval-fraction", "0.15"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    manifest = json.loads((mix / "manifest.json").read_text())
    assert manifest["accounting"]["mixture_rows"] >= 16
    return mix, build_tiny_model(root / "model")




ONLINE = ["--num-generations", "2", "--max-completion-length", "12"]


@pytest.mark.slow
@pytest.mark.parametrize("algo,extra", [
    ("dpo", []), ("ama-dpo", ["--epochs", "1"]), ("dual", ["--rounds", "2"]),
    ("ppo", ONLINE), ("ama-ppo", ONLINE), ("repo", ONLINE), ("ppo-lag", ONLINE + ["--lambda-update-every", "1"]),
    ("reward-model", []), ("cost-model", []),
])
def test_every_algorithm_trains_on_a_curated_mix(curated, tmp_path, algo, extra):
    mix, model = curated
    out = tmp_path / algo
    steps = [] if "--epochs" in extra else ["--max-steps", "2"]
    result = runner.invoke(app, ["train", "--mix", str(mix), "--model", str(model), "--out", str(out), "--algo", algo,
                                 "--batch-size", "4", "--lr", "1e-3", *steps, "--max-length", "128",
                                 "--quiet", *extra])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["train_config"]["algo"] == algo and len(config["mix_manifest_hash"]) == 16
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in m for m in metrics)
    assert (out / "final" / "config.json").is_file() and (out / "summary.json").is_file()
    if algo == "ama-dpo":  # over a whole epoch, the curated spans mask part of the answers
        import polars as pl

        train = pl.read_parquet(mix / "data" / "train-*.parquet")
        masking = sum(any(s["sign"] == -1 for s in spans or []) for spans in train["chosen_spans"].to_list()) + sum(
            any(s["sign"] == 1 for s in spans or []) for spans in train["rejected_spans"].to_list())
        assert masking > 0, "the curated mix should hold spans that AMA masks"
        assert any(0 < m.get("ama/masked_fraction", 0) < 1 for m in metrics)


def test_dual_swapped_pairs_do_not_reuse_the_cached_reference_of_the_unswapped_pair(curated, tmp_path):
    """dual swaps chosen and rejected but keeps the row id: the reference cache must not hand it the other order."""
    mix, model = curated

    def train(name, *extra):
        # lr 1e-20: the policy stays the reference, so with right reference log-probs every margin is 0.
        return runner.invoke(app, ["train", "--mix", str(mix), "--model", str(model), "--out", str(tmp_path / name),
                                   "--batch-size", "4", "--lr", "1e-20", "--epochs", "1", "--max-length", "128",
                                   "--quiet", *extra])

    assert train("dpo", "--algo", "dpo").exit_code == 0  # fills the reference cache with the pairs as curated
    result = train("dual", "--algo", "dual", "--rounds", "1", "--lambda-init", "10",
                   "--severity-weights", "minor=50,moderate=50,severe=50")
    assert result.exit_code == 0, result.output
    metrics = [json.loads(line) for line in (tmp_path / "dual" / "metrics.jsonl").read_text().splitlines()]
    assert [m for m in metrics if m.get("dual")][0]["swapped_pairs"] > 0
    margins = [m["rewards/margins"] for m in metrics if "rewards/margins" in m]
    assert margins and max(abs(v) for v in margins) < 1e-4
