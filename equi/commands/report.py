"""``equi report``: curves, mix charts, an HTML page and a summary in words."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from equi.commands._console import JSON_HELP, json_output, print_json, reported_errors
from equi.commands._console import out as stdout

HELP = """Draw data-scaling curves and mix charts; write report.html (self-contained) and summary.md.

Reads only directories: run directories under --runs (config.json, summary.json from equi train, ladder.json from equi scale, eval/metrics.json + eval/answers.parquet from equi eval) and a mix directory (--mix). Runs that are not evaluated, or whose data size is unknown, are listed with the reason instead of failing.

Writes into --out: curve_safety.png, curve_over_refusal.png, curve_balanced.png (percent vs number of safety training pairs, one line per group, or per group and algorithm, e.g. 'EHD · dpo', when the runs used several; the untrained baseline at 0), tradeoff.png, mix_composition.png, mix_severity.png, mix_clusters.png, report.html, summary.md, report.json (the numbers behind every chart).

\b
Example (the whole loop, raw data to curves):
    equi curate raw.jsonl --out mix/
    equi scale --mix mix/ --scales 0.1,0.3,1.0 --groups EHD,IHD,MHD --out runs/ --eval-limit 50
    equi report --runs runs/ --mix mix/ --out report/
    xdg-open report/report.html
"""


def register(app: typer.Typer) -> None:
    @app.command("report", help=HELP)
    def report_command(
        runs: Optional[Path] = typer.Option(None, "--runs", help="Directory of run directories (or one run) \\[default: ./runs when neither --runs nor --mix is given]."),
        mix: Optional[Path] = typer.Option(None, "--mix", help="Mix directory to chart."),
        out: Path = typer.Option(Path("report"), "--out", "-o", help="Report directory."),
        title: str = typer.Option("equi report: safety vs over-refusal", "--title", help="Page title."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No summary on the terminal."),
        as_json: bool = typer.Option(False, "--json", help=JSON_HELP + " The object: paths of report.html, "
                                     "summary.md, report.json and each plot; each curve's points (runs, n, rates)."),
    ) -> None:
        from equi.reporting import ReportConfig, build_report
        if runs is None and mix is None and Path("runs").is_dir():
            runs = Path("runs")
        with reported_errors(), json_output(as_json):
            config = ReportConfig(out=str(out), runs=str(runs) if runs else None, mix=str(mix) if mix else None,
                                  title=title)
            result = build_report(config)
        if as_json:
            print_json(report_json(result))
        elif not quiet:
            stdout.print(result.summary.read_text(encoding="utf-8"), markup=False)
            stdout.print(f"report: {result.html}")


#: The keys of a curve point in ``equi report --json`` (report.json has the rest: intervals, suites, …).
_POINT_KEYS = ("run", "n_safety", "safety", "over_refusal", "balanced")


def report_json(result) -> dict:
    """The ``equi report --json`` object: where everything was written and the points of each curve, read back from
    the report.json the report just wrote (one source for both)."""
    import json

    from equi.reporting.build import DATA_FILE

    data_path = Path(result.out_dir) / DATA_FILE
    data = json.loads(data_path.read_text(encoding="utf-8"))
    curves = {label: [_point_json(point) for point in points] for label, points in data.get("series", {}).items()}
    runs = data.get("runs", [])
    return {
        "ok": True,
        "out_dir": str(result.out_dir),
        "html": str(result.html),
        "summary": str(result.summary),
        "data": str(data_path),
        "plots": {name: str(Path(result.out_dir) / name) for name in result.plots},
        "curves": curves,
        "runs": {"total": len(runs), "evaluated": sum(1 for r in runs if r.get("summary")),
                 "with_problems": {r["name"]: r["problems"] for r in runs if r.get("problems")}},
    }


def _point_json(point: dict) -> dict:
    """One curve point: the run, its data size, its rates, and per rate the prompts behind it (n) and the Wilson 95%
    interval [lo, hi] (None where the metrics file does not let the report count them)."""
    rates = {m: point.get(f"{m}_rate") or {} for m in ("safety", "over_refusal")}
    ci95 = {m: [rate["lo"], rate["hi"]] if "lo" in rate else None for m, rate in rates.items()}
    ci95["balanced"] = list(point["balanced_ci"]) if point.get("balanced_ci") else None
    return {**{k: point.get(k) for k in _POINT_KEYS}, "n": {m: rate.get("n") for m, rate in rates.items()},
            "ci95": ci95}
