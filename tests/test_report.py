"""equi report: curve data from run directories, the data behind each PNG, the HTML embedding, words.

Run directories here are SYNTHETIC: their eval labels are made up in the test so the expected numbers
are known; the metrics are still computed by equi's own code from those labels.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from equi.evaluation.audit import write_answers, write_metrics
from equi.evaluation.metrics import compute_metrics
from equi.reporting import ReportConfig, build_report, collect_runs, curve_series, summarise_mix
from equi.schema import MIX_SCHEMA, POOL_SCHEMA

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _labels(n_harmful_refused: int, n_benign_refused: int, n: int = 10) -> list[dict]:
    """n harmful + n benign audit rows with the given numbers of refusals (synthetic)."""
    rows = []
    for i in range(n):
        rows.append({"suite": "advbench", "prompt_id": f"h{i}", "prompt": f"harmful {i}", "expected": "refuse",
                     "subtype": None, "answer": "…", "label": "refuse" if i < n_harmful_refused else "comply",
                     "refusal_score": 0.5, "new_tokens": 3, "truncated": False})
        rows.append({"suite": "xstest-safe", "prompt_id": f"b{i}", "prompt": f"benign {i}", "expected": "comply",
                     "subtype": "homonyms", "answer": "…", "label": "refuse" if i < n_benign_refused else "comply",
                     "refusal_score": 0.5, "new_tokens": 3, "truncated": False})
    return rows


def _make_run(root: Path, name: str, group: str | None, n_safety: int | None, refused: tuple[int, int] | None,
              baseline: bool = False, algo: str = "ama-dpo") -> Path:
    run = root / name
    run.mkdir(parents=True)
    groups = None if group in (None, "ALL") else [group, "BENIGN"]
    (run / "config.json").write_text(json.dumps({"train_config": {"algo": algo, "groups": groups, "scale": 7}}))
    if n_safety is not None or baseline:
        (run / "ladder.json").write_text(json.dumps({"n_safety": 0 if baseline else n_safety, "baseline": baseline,
                                                     "group": "baseline" if baseline else group, "scale": 7}))
    if refused is not None:
        rows = _labels(*refused)
        write_answers(run / "eval", rows)
        write_metrics(run / "eval", compute_metrics(rows))
    return run


@pytest.fixture()
def runs_dir(tmp_path) -> Path:
    root = tmp_path / "runs"
    _make_run(root, "base", None, None, (2, 0), baseline=True)
    _make_run(root, "ehd-small", "EHD", 40, (5, 1))
    _make_run(root, "ehd-big", "EHD", 400, (9, 6))
    _make_run(root, "ihd-small", "IHD", 12, (4, 0))
    _make_run(root, "ihd-big", "IHD", 120, (7, 2))
    _make_run(root, "mhd-pending", "MHD", 4, None)  # trained, not evaluated
    _make_run(root, "loose", "EHD", None, (3, 3))  # evaluated, data size unknown
    return root


def test_curve_series_come_from_run_directories(runs_dir):
    records = collect_runs(runs_dir)
    assert {r.name for r in records} == {"base", "ehd-small", "ehd-big", "ihd-small", "ihd-big", "mhd-pending", "loose"}
    series = curve_series(records)
    assert list(series) == ["EHD", "IHD"]  # MHD not evaluated, loose has no size, baseline joins each line
    assert [(p.run, p.n_safety) for p in series["EHD"]] == [("base", 0), ("ehd-small", 40), ("ehd-big", 400)]
    assert [p.safety for p in series["EHD"]] == pytest.approx([0.2, 0.5, 0.9])
    assert [p.over_refusal for p in series["IHD"]] == pytest.approx([0.0, 0.0, 0.2])
    assert series["IHD"][-1].balanced == pytest.approx((0.7 + 0.8) / 2)
    pending = next(r for r in records if r.name == "mhd-pending")
    assert pending.summary is None and any("not evaluated" in p for p in pending.problems)


def test_runs_of_several_algorithms_get_one_series_per_group_and_algorithm(runs_dir, tmp_path):
    """AMA-DPO vs DPO: a `--algo dpo` ladder next to the ama-dpo one must not merge into the same lines."""
    _make_run(runs_dir / "dpo", "ehd-small", "EHD", 40, (3, 0), algo="dpo")  # same names, another --out
    _make_run(runs_dir / "dpo", "ehd-big", "EHD", 400, (6, 1), algo="dpo")
    _make_run(runs_dir / "dpo", "ihd-big", "IHD", 120, (5, 0), algo="dpo")
    series = curve_series(collect_runs(runs_dir))
    assert list(series) == ["EHD · ama-dpo", "EHD · dpo", "IHD · ama-dpo", "IHD · dpo"]
    assert [(p.run, p.n_safety) for p in series["EHD · ama-dpo"]] == [("base", 0), ("ehd-small", 40), ("ehd-big", 400)]
    assert [p.safety for p in series["EHD · dpo"]] == pytest.approx([0.2, 0.3, 0.6])
    assert [p.safety for p in series["IHD · dpo"]] == pytest.approx([0.2, 0.5])

    out = tmp_path / "report"
    result = build_report(ReportConfig(out=str(out), runs=str(runs_dir)))
    data = json.loads((out / "report.json").read_text())
    assert list(data["series"]) == list(series)
    for name in ("curve_safety.png", "curve_over_refusal.png", "curve_balanced.png", "tradeoff.png"):
        assert set(data["plots"][name]["series"]) == set(series), name
    assert data["plots"]["curve_safety.png"]["series"]["EHD · dpo"] == {"x": [0, 40, 400],
                                                                        "y": pytest.approx([20.0, 30.0, 60.0])}
    by_run = {(Path(r["path"]).parent.name, r["name"]): r["series"] for r in data["runs"]}
    assert by_run[("dpo", "ehd-big")] == "EHD · dpo" and by_run[("runs", "ehd-big")] == "EHD · ama-dpo"
    assert by_run[("runs", "loose")] is None and by_run[("runs", "base")] is None
    summary = result.summary.read_text()
    # 10 prompts per rate: 2/10 → 6/10 is inside the Wilson intervals, so it is noise, not a rise.
    assert ("**EHD · dpo**: safety is within noise (n=10 prompts): from 20.0% [5.7, 51.0] of 10 prompts at 0 safety "
            "examples to 60.0% [31.3, 83.2] of 10 prompts at 400, +40.0 points") in summary
    assert "**EHD · ama-dpo**: safety rises from 20.0% [5.7, 51.0] of 10 prompts" in summary  # 2/10 → 9/10: apart
    assert "With **ama-dpo**, no group clearly drives over-refusal" in summary  # 6/10 vs 2/10: overlap
    assert "With **dpo**, no group clearly drives over-refusal" in summary
    assert ("**EHD** at each algorithm's largest size: ama-dpo safety 90.0% [59.6, 98.2] of 10 prompts, over-refusal "
            "60.0% [31.3, 83.2] of 10 prompts, balanced 65.0% [38.2, 83.5] of 20 prompts (400 safety examples); dpo "
            "safety 60.0% [31.3, 83.2] of 10 prompts, over-refusal 10.0% [1.8, 40.4] of 10 prompts, balanced 75.0% "
            "[45.4, 90.7] of 20 prompts (400 safety examples). No algorithm balances clearly best: their 95% "
            "intervals overlap.") in summary
    assert "Best balance" not in summary and "drives over-refusal most" not in summary
    html = result.html.read_text()
    assert "<th class=\"l\">curve</th>" in html and "<td class=\"l\">EHD · dpo</td>" in html
    # One algorithm: the labels stay the groups alone (existing reports do not change).
    assert list(curve_series(collect_runs(runs_dir / "dpo"))) == ["EHD", "IHD"]


def test_a_plain_train_run_is_placed_by_the_rows_its_summary_counts(runs_dir):
    """`equi train` + `equi eval` without `equi scale` (the quickstart): summary.json gives the data size."""
    run = _make_run(runs_dir, "ihd-trained", "IHD", None, (6, 1))
    (run / "summary.json").write_text(json.dumps({"train_rows": 70, "n_safety": 60, "n_benign": 10}))
    series = curve_series(collect_runs(runs_dir))
    assert [(p.run, p.n_safety) for p in series["IHD"]] == [("base", 0), ("ihd-small", 12), ("ihd-trained", 60),
                                                           ("ihd-big", 120)]


def test_report_pngs_hold_the_expected_series_and_html_embeds_them(runs_dir, tmp_path):
    out = tmp_path / "report"
    result = build_report(ReportConfig(out=str(out), runs=str(runs_dir)))
    plots = json.loads((out / "report.json").read_text())["plots"]
    for name in ("curve_safety.png", "curve_over_refusal.png", "curve_balanced.png", "tradeoff.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000
    safety = plots["curve_safety.png"]
    assert safety["xlabel"] == "safety training examples (preference pairs)" and "%" in safety["ylabel"]
    assert safety["series"] == {"EHD": {"x": [0, 40, 400], "y": pytest.approx([20.0, 50.0, 90.0])},
                                "IHD": {"x": [0, 12, 120], "y": pytest.approx([20.0, 40.0, 70.0])}}
    assert plots["curve_over_refusal.png"]["series"]["EHD"]["y"] == pytest.approx([0.0, 10.0, 60.0])
    assert plots["tradeoff.png"]["series"]["IHD"]["x"] == pytest.approx([0.0, 0.0, 20.0])
    # The plot data is what the matplotlib artists hold: it matches the image's size too.
    import matplotlib.image as mpimg

    height, width, _ = mpimg.imread(out / "curve_safety.png").shape
    assert width > 400 and height > 300
    html = result.html.read_text()
    embedded = [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]
    assert sorted(embedded) == sorted((out / n).read_bytes() for n in
                                      ("curve_safety.png", "curve_over_refusal.png", "curve_balanced.png", "tradeoff.png"))
    assert "<img" in html and 'src="http' not in html  # self-contained
    links = re.findall(r'href="([^"]+answers\.parquet)"', html)
    assert len(links) == 6 and all((out / link).resolve().is_file() for link in links)
    summary = result.summary.read_text()
    assert "mhd-pending" in summary and "not evaluated" in summary
    assert "No group clearly drives over-refusal" in summary and "drives over-refusal most" not in summary
    assert "60.0% [31.3, 83.2] of 10 prompts" in summary


def test_report_with_one_unevaluated_run_says_so(tmp_path):
    root = tmp_path / "runs"
    _make_run(root, "only", "EHD", 10, None)
    out = tmp_path / "report"
    result = build_report(ReportConfig(out=str(out), runs=str(root / "only")))
    assert [r.name for r in result.records] == ["only"]
    assert not list(out.glob("curve_*.png"))
    assert "not evaluated yet" in result.summary.read_text()
    assert "only" in result.html.read_text()


def _write_synthetic_mix(mix: Path) -> None:
    """A tiny SYNTHETIC mix directory in the contract's layout (no real data involved)."""
    (mix / "data").mkdir(parents=True)
    (mix / "pool").mkdir()
    groups = ["EHD"] * 5 + ["IHD"] * 2 + ["BENIGN"] * 3
    splits = ["train"] * 4 + ["test"] + ["train"] * 2 + ["train"] * 3
    severities = ["severe", "severe", "minor", None, "moderate", "minor", None, None, None, None]
    rows = [{name: None for name in MIX_SCHEMA.names} | {"id": str(i), "group": g, "split": s, "severity": v,
                                                            "rank": i, "cluster": i % 3}
            for i, (g, s, v) in enumerate(zip(groups, splits, severities))]
    pq.write_table(pa.Table.from_pylist(rows, schema=MIX_SCHEMA), mix / "data" / "train-00000-of-00001.parquet")
    pool_rows = [{k: v for k, v in r.items() if k != "rank"} for r in rows] + [
        {name: None for name in POOL_SCHEMA.names} | {"id": "x", "group": "OTHER", "cluster": 0}]
    pq.write_table(pa.Table.from_pylist(pool_rows, schema=POOL_SCHEMA), mix / "pool" / "pool-00000-of-00001.parquet")
    (mix / "rejects.jsonl").write_text('{"reason": "not valid JSON"}\n{"reason": "not valid JSON"}\n{"reason": "no prompt"}\n')
    (mix / "manifest.json").write_text(json.dumps({"accounting": {
        "input_lines": 14, "pooled": 11, "rejected": 3, "mixed": 10, "mixture_rows": 10,
        "not_selected": {"over the group's ratio": 1}}}))


def test_mix_summary_and_charts(tmp_path):
    mix = tmp_path / "mix"
    _write_synthetic_mix(mix)
    summary = summarise_mix(mix)
    assert summary.composition == {"EHD": {"train": 4, "test": 1}, "IHD": {"train": 2}, "BENIGN": {"train": 3}}
    assert summary.severity["EHD"] == {"minor": 1, "moderate": 1, "severe": 2, "unknown": 1}
    assert summary.cluster_sizes == [5, 3, 3]
    assert summary.rejects == 3 and summary.reject_reasons == {"not valid JSON": 2, "no prompt": 1}
    assert summary.accounting_problems == []
    out = tmp_path / "report"
    result = build_report(ReportConfig(out=str(out), mix=str(mix)))
    comp = result.plots["mix_composition.png"]
    assert comp["categories"] == ["EHD", "IHD", "BENIGN"]
    assert comp["series"] == {"train": [4.0, 2.0, 3.0], "test": [1.0, 0.0, 0.0]}
    assert result.plots["mix_severity.png"]["series"]["severe"] == [2.0, 0.0, 0.0]
    assert result.plots["mix_clusters.png"]["series"]["rows per cluster"] == [5.0, 3.0, 3.0]
    text = result.summary.read_text()
    assert "Accounting balances: 14 input lines = 11 pooled + 3 rejected" in text
    html = result.html.read_text()
    assert html.count("data:image/png;base64,") == 3 and "not valid JSON" in html


def test_report_command_errors_and_help(tmp_path, runs_dir):
    from equi.cli import app

    runner = CliRunner()
    missing = runner.invoke(app, ["report", "--runs", str(tmp_path / "nope"), "--out", str(tmp_path / "r")])
    assert missing.exit_code == 2 and "is not a directory" in missing.output
    not_a_mix = runner.invoke(app, ["report", "--mix", str(runs_dir), "--out", str(tmp_path / "r")])
    assert not_a_mix.exit_code == 2 and "not a mix directory" in not_a_mix.output
    ok = runner.invoke(app, ["report", "--runs", str(runs_dir), "--out", str(tmp_path / "r"), "--quiet"])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "r" / "report.html").is_file()
    help_text = runner.invoke(app, ["report", "--help"]).output
    assert "Example" in help_text and "equi curate" in help_text and "equi scale" in help_text


def test_summary_names_no_culprit_when_over_refusal_is_tied():
    from equi.reporting.runs import CurvePoint
    from equi.reporting.summary import findings

    # Synthetic curve points (numbers only): both groups end at 0% over-refusal.
    series = {g: [CurvePoint("baseline", 0, 0.03, 0.0, 0.515), CurvePoint(f"{g}-1", n, s, 0.0, 0.5 + s / 2)]
              for g, n, s in (("EHD", 57, 0.067), ("IHD", 18, 0.033))}
    text = "\n".join(findings(series))
    assert "drives over-refusal most" not in text and "no group drives it" in text
    series["IHD"][-1] = CurvePoint("IHD-1", 18, 0.033, 0.25, 0.39)
    assert "**IHD** drives over-refusal most" in "\n".join(findings(series))
