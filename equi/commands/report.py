"""``equi report``: curves, mix charts, an HTML page and a summary in words."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from equi.commands._console import console, reported_errors

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
    ) -> None:
        from equi.reporting import ReportConfig, build_report
        if runs is None and mix is None and Path("runs").is_dir():
            runs = Path("runs")
        with reported_errors():
            config = ReportConfig(out=str(out), runs=str(runs) if runs else None, mix=str(mix) if mix else None,
                                  title=title)
            result = build_report(config)
        if not quiet:
            console.print(result.summary.read_text(encoding="utf-8"), markup=False)
            console.print(f"report: {result.html}")
