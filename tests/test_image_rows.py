"""Multimodal rows (BeaverTails-V style): `image` passes through curation; text-only training refuses or skips them.

The texts are real (XSTest completions); the `image` values are SYNTHETIC file names: no image data is read.
"""

from __future__ import annotations

import json

import polars as pl
import pytest
from typer.testing import CliRunner

from equi.cli import app
from equi.manifest import verify_mix
from tests.realdata import write_jsonl, xstest_single_responses
from train_fixtures import build_tiny_model

runner = CliRunner()


@pytest.fixture(scope="module")
def image_mix(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rows = [r for m in ("llama2new", "mistralinstruct", "gpt4") for r in xstest_single_responses(shared_data, m, n=40)]
    for i, row in enumerate(rows):
        # prompts 20-29 of each model come with a (synthetic) image: prompts whose answers differ enough in safety
        # to be paired (most of XSTest's first prompts are safe homonyms, answered equally safely by all three)
        if 20 <= i % 40 < 30:
            row["image"] = f"images/synthetic-{i % 40}.png"
            row["image_severity"] = "Moderate"
    raw = write_jsonl(root / "raw.jsonl", rows)
    out = root / "mix"
    result = runner.invoke(app, ["curate", str(raw), "--out", str(out), "--quiet", "--eval-fraction", "0",
                                 "--ratios", "EHD=1,IHD=1,MHD=1", "--benign-share", "0.5"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out, build_tiny_model(root / "model")


def test_image_and_its_severity_pass_through_pool_and_mixture(image_mix):
    mix, _ = image_mix
    assert verify_mix(mix) == []
    pool = pl.read_parquet(mix / "pool" / "*.parquet")
    with_image = pool.filter(pl.col("image").is_not_null())
    assert with_image.height == 30 and set(with_image["image_severity"].to_list()) == {"moderate"}
    mixture = pl.read_parquet(mix / "data" / "*.parquet")
    assert mixture["image"].is_not_null().any() and mixture["image"].is_null().any()


def test_answers_to_one_question_about_different_images_are_never_paired(shared_data, tmp_path):
    """BeaverTails-V asks "What is happening in this image?" of many images: a pair must share its image. Here each
    model's answer to the first twenty prompts is about its own (SYNTHETIC) image, so none of them may pair."""
    rows = []
    for model in ("llama2new", "mistralinstruct", "gpt4"):
        for i, row in enumerate(xstest_single_responses(shared_data, model, n=40)):
            if i < 20:
                row["image"] = f"images/synthetic-{i}-{model}.png"
            rows.append(row)
    out = tmp_path / "mix"
    result = runner.invoke(app, ["curate", str(write_jsonl(tmp_path / "raw.jsonl", rows)), "--out", str(out),
                                 "--quiet", "--eval-fraction", "0", "--ratios", "EHD=1,IHD=1,MHD=1",
                                 "--benign-share", "0.5"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    mixture = pl.read_parquet(out / "data" / "*.parquet")
    assert mixture.height > 0 and mixture["image"].is_null().all()  # pairs only from the prompts without an image
    about_images = pl.read_parquet(out / "pool" / "*.parquet").filter(pl.col("image").is_not_null())
    assert about_images.height == 60
    answers = {m[0]["content"] for m in mixture["chosen"].to_list() + mixture["rejected"].to_list()}
    assert not {m[0]["content"] for m in about_images["response"].to_list()} & answers


def test_bad_image_severity_is_a_reject(tmp_path):
    raw = write_jsonl(tmp_path / "raw.jsonl", [{"prompt": "p", "response": "r", "image": "x.png",
                                                "image_severity": "huge"},
                                               {"prompt": "q", "response": "r"}])  # synthetic lines
    out = tmp_path / "mix"
    assert runner.invoke(app, ["curate", str(raw), "--out", str(out), "--quiet"]).exit_code == 0
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert "image_severity" in rejects[0]["reason"]


def test_text_only_training_refuses_image_rows_unless_told_to_skip_them(image_mix, tmp_path, monkeypatch):
    monkeypatch.setenv("EQUI_CACHE", str(tmp_path / "cache"))
    mix, model = image_mix
    common = ["train", "--mix", str(mix), "--model", str(model), "--algo", "dpo", "--max-steps", "1",
              "--batch-size", "2", "--max-length", "96", "--quiet"]
    refused = runner.invoke(app, common + ["--out", str(tmp_path / "a")])
    assert refused.exit_code == 2 and "--skip-images" in refused.output
    skipped = runner.invoke(app, common + ["--out", str(tmp_path / "b"), "--skip-images"])
    assert skipped.exit_code == 0, skipped.output
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert any("image" in reason for reason in summary["rows_left_out"])
