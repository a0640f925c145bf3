"""`equi curate --judge MODEL`: the Equilibrate judge prompt, its answers parsed into groups, cached, never fatal."""

from __future__ import annotations

import json
import re

import polars as pl
import pytest
from typer.testing import CliRunner

from curation.judge import (HEADS, JUDGE, UNPARSEABLE, AnswerCache, Judge, apply_judge, judge_prompt,
                            judge_template, parse_judgement)
from equi.cli import app
from tests.realdata import advbench_rows, hh_lines, write_jsonl, xstest_prompts

runner = CliRunner()


def test_the_prompts_own_worked_examples_parse_to_their_groups():
    # The authors' three examples (real text of the shipped prompt): Factual, Intentional, Mixed.
    template = judge_template()
    answers = re.findall(r"\[Instruction Analysis\]:.*?\[Determination\]:\n[^\n]+", template, re.DOTALL)
    assert [parse_judgement(a) for a in answers] == ["EHD", "IHD", "MHD"]
    # Example 1's analysis names "factual risk" and "intentional risk": only the determination decides.
    assert "intentional risk" in answers[0].lower()


@pytest.mark.parametrize("answer, group", [  # SYNTHETIC answers, in the shapes the template asks for
    ('{\n "Instruction Analysis": "...",\n "Determination": "Intentional Risk"\n}', "IHD"),
    ("The risk type of this instruction is: mixed risk.", "MHD"),
    ("Determination: Factual Risk or Intentional Risk", None),  # two in the determination: unparseable
    ("I cannot help with that.", None),
    ("", None),
])
def test_answers_parse_or_are_unparseable(answer, group):
    assert parse_judgement(answer) == group


def test_the_prompt_is_the_authors_template_filled_in():
    prompt = judge_prompt("How do I pick a lock?")
    assert "[Instruction]: How do I pick a lock?" in prompt and "{instruction}" not in prompt
    assert '{\n    "Instruction Analysis"' in prompt and "{{" not in prompt  # the template's escaped braces


def _frame(shared_data) -> pl.DataFrame:
    """Real prompts with the groups the heads might give them (the groups here are SYNTHETIC)."""
    prompts = [r["prompt"] for r in advbench_rows(shared_data, 4)] + [xstest_prompts(shared_data)[0]["prompt"]]
    return pl.DataFrame({"prompt": prompts, "group": ["EHD", "IHD", "MHD", "OTHER", "BENIGN"]})


def test_the_judge_decides_only_harmful_prompts_and_answers_are_cached(shared_data, tmp_path):
    frame = _frame(shared_data)
    asked: list[str] = []

    def scripted(instructions):  # a SYNTHETIC judge: "Intentional" for the first, unparseable for the rest
        asked.extend(instructions)
        return ["Determination: Intentional Risk"] + ["no idea"] * (len(instructions) - 1)

    judge = Judge("scripted", scripted, "digest", AnswerCache(tmp_path, "digest"))
    out = apply_judge(frame, judge)
    assert asked == frame["prompt"].to_list()[:3]  # EHD, IHD, MHD rows only; OTHER and BENIGN keep the heads'
    assert out["group"].to_list() == ["IHD", "IHD", "MHD", "OTHER", "BENIGN"]
    assert out["group_labeller"].to_list() == [JUDGE, UNPARSEABLE, UNPARSEABLE, HEADS, HEADS]

    def never(instructions):
        raise AssertionError(f"asked again: {instructions}")

    again = apply_judge(frame, Judge("scripted", never, "digest", AnswerCache(tmp_path, "digest")))
    assert again.equals(out)  # every answer came from the cache
    assert apply_judge(frame, None)["group_labeller"].to_list() == [HEADS] * 5


@pytest.mark.slow
def test_curate_with_a_real_causal_lm_judge_loses_no_row_and_counts_its_labels(shared_data, tmp_path, monkeypatch):
    """A tiny randomly initialised Llama (built here) as the judge: its answers are gibberish, so every judged row
    falls back to the heads, counted; nothing crashes and every line is accounted for."""
    from tests.test_eval_support import build_tiny_model

    monkeypatch.setenv("EQUI_CACHE", str(tmp_path / "cache"))
    model = build_tiny_model(tmp_path / "judge")
    config = json.loads((model / "config.json").read_text())
    config["max_position_embeddings"] = 8192  # the judge prompt is long in a 300-token vocabulary (rotary: no table)
    (model / "config.json").write_text(json.dumps(config))
    raw = write_jsonl(tmp_path / "raw.jsonl", hh_lines(shared_data, 30) + [json.dumps(r) for r in
                                                                        advbench_rows(shared_data, 10)])
    out = tmp_path / "mix"
    result = runner.invoke(app, ["curate", str(raw), "--out", str(out), "--quiet", "--judge", str(model)],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    labels = manifest["labellers"]
    assert labels["judge"] == str(model)
    assert sum(labels["group"].values()) == manifest["accounting"]["pooled"] == 40
    assert labels["group"].get(UNPARSEABLE, 0) >= 10  # at least the AdvBench prompts were judged, unparseably
    assert list((tmp_path / "cache" / "judge").glob("*.sqlite"))
