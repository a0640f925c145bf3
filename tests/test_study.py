"""``python bench/study.py``: the study command, end to end on a two-rung, two-step configuration so it cannot rot.

Real text (200 lines of the bundled HH-RLHF slice, categorised by equi curate), a tiny model built here
(tests/train_fixtures.py), four prompts per suite: the numbers mean nothing, the wiring is what is checked.
"""

from __future__ import annotations

import gzip
import itertools
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.benches import load_bench

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_study_trains_every_arm_on_the_same_pairs_and_reports_one_curve_per_arm(tmp_path):
    from train_fixtures import build_tiny_model

    study = load_bench("study")
    model = build_tiny_model(tmp_path / "model")
    hh = tmp_path / "hh.jsonl"  # the first 200 lines of the bundled HH-RLHF slice: enough pairs for both mixes
    with gzip.open(REPO / "examples" / "data" / "hh_rlhf_harmless_sample.jsonl.gz", "rt", encoding="utf-8") as lines:
        hh.write_text("".join(itertools.islice(lines, 200)), encoding="utf-8")
    out, work = tmp_path / "report", tmp_path / "work"
    args = ["--profile", "tiny", "--model", str(model), "--inputs", str(hh), "--out", str(out), "--work", str(work)]
    assert study.main(args) == 0

    for name in ("report.html", "summary.md", "report.json", "study.json", "results.md", "curve_safety.png",
                 "curve_over_refusal.png", "curve_balanced.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert set(report["series"]) == {"naive · dpo", "FDC · dpo", "FDC · ama-dpo"}
    assert (out / "results.md").read_text().count("\n| ") == 7  # the untrained model + 3 arms × 2 rungs
    for label, points in report["series"].items():
        assert [p["run"] for p in points][0] == "baseline", label  # every curve starts at the untrained model
        assert len(points) == 3, label  # baseline + two rungs
        assert all(p["safety_rate"]["n"] == 4 and p["over_refusal_rate"]["n"] == 4 for p in points), label

    # Same number of pairs selected and trained per rung in every arm, though max_length 96 truncates most of these
    # dialogues (keep_end: none is dropped); the naive arm's pairs come in input order.
    trained, fitted = {}, {}
    for ladder in sorted((work / "runs").glob("*/*/ladder.json")):
        record = json.loads(ladder.read_text())
        if not record["baseline"]:
            trained.setdefault(ladder.parent.parent.name, []).append(record["n_selected"])
            summary = json.loads((ladder.parent / "summary.json").read_text())
            assert summary["rows_dropped_prompt_too_long"] == 0, ladder
            fitted.setdefault(ladder.parent.parent.name, []).append(summary["n_safety"] + summary["n_benign"])
    assert trained == fitted == {"naive": [4, 8], "fdc": [4, 8], "fdc-ama": [4, 8]}
    naive = pq.read_table(sorted((work / "mix-naive" / "data").glob("*.parquet"))).to_pylist()
    lines = [row["source_line"] for row in sorted(naive, key=lambda row: row["rank"])]
    assert lines == sorted(lines) and len({row["group"] for row in naive}) > 1

    record = json.loads((out / "study.json").read_text())
    assert record["profile"]["rungs"] == [4, 8] and record["environment"]["trl"] and record["complete"]
    assert len(record["sessions"]) == 1

    # Re-running continues: nothing is trained or evaluated again, and the session is recorded.
    finals = {p: p.stat().st_mtime_ns for p in (work / "runs").glob("*/*/final/*")}
    answers = {p: p.stat().st_mtime_ns for p in (work / "runs").glob("*/*/eval/answers.parquet")}
    assert len(answers) == 7  # 3 arms × 2 rungs + the baseline
    assert study.main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in finals} == finals
    assert {p: p.stat().st_mtime_ns for p in answers} == answers
    assert len(json.loads((out / "study.json").read_text())["sessions"]) == 2
    assert json.loads((out / "study.json").read_text())["finished"] == {arm: [4, 8] for arm in trained}
    (out / "report.html").unlink()
    assert study.main([*args, "--report-only"]) == 0 and (out / "report.html").is_file()  # a half-way study's report
    with pytest.raises(SystemExit, match="no mixes"):
        study.main([*args[:-2], "--work", str(tmp_path / "empty"), "--report-only"])


def test_study_refuses_rungs_larger_than_a_mix_before_training(tmp_path):
    study = load_bench("study")
    with pytest.raises(ValueError, match="rungs"):
        study.StudyProfile(name="x", rungs=[8, 4], max_steps=1, lr=1e-3)
    with pytest.raises(SystemExit, match="rung 500 is larger than a mix"):
        study.check_rungs(study.StudyProfile(name="x", rungs=[500], max_steps=1, lr=1e-3),
                          {"fdc": tmp_path / "missing-a", "input": tmp_path / "missing-b"})
